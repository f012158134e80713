"""The shared tier's settings: `RemoteSettings`, validated at construction, and the
VYRE_SQLCACHE_REMOTE* variables that give them (see README "Sharing a cache")."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, overload

__all__ = [
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT_S",
    "ENV_REMOTE",
    "ENV_REMOTE_KEY",
    "ENV_REMOTE_MAX_BLOB",
    "ENV_REMOTE_MODE",
    "ENV_REMOTE_PREFIX",
    "ENV_REMOTE_TIMEOUT",
    "MODES",
    "RemoteSettings",
    "remote_from_environment",
]

ENV_REMOTE = "VYRE_SQLCACHE_REMOTE"
ENV_REMOTE_MODE = "VYRE_SQLCACHE_REMOTE_MODE"
ENV_REMOTE_KEY = "VYRE_SQLCACHE_REMOTE_KEY"
ENV_REMOTE_TIMEOUT = "VYRE_SQLCACHE_REMOTE_TIMEOUT"
ENV_REMOTE_MAX_BLOB = "VYRE_SQLCACHE_REMOTE_MAX_BLOB"
ENV_REMOTE_PREFIX = "VYRE_SQLCACHE_REMOTE_PREFIX"

MODES: Final = ("read-write", "read-only", "write-only")
Mode = Literal["read-write", "read-only", "write-only"]
#: Connect and socket timeout: a dead or black-holed server adds at most about this
#: much to the first read, after which the breaker is open.
DEFAULT_TIMEOUT_S: Final = 0.04
#: Larger blobs are not shared: Redis keeps values in memory, and a large value delays
#: every small read queued behind it.
DEFAULT_MAX_BLOB_BYTES: Final = 8 << 20
DEFAULT_PREFIX: Final = "vyre-sqlcache:v1:"
MIN_KEY_BYTES: Final = 16


@dataclass(frozen=True)
class RemoteSettings:
    """Where the shared tier is and how to use it; validated at construction.

    `url` is redis-py's (`redis://[user:password@]host:port/db`, `rediss://` for TLS,
    `unix://`). `mode` is 'read-write', 'read-only' (never upload) or 'write-only'
    (never ask). `key` is the team's HMAC-SHA256 key (at least 16 bytes): entries are
    signed, and unsigned or wrongly signed ones refused. Raises ValueError/TypeError.
    """

    url: str
    mode: Mode = "read-write"
    key: bytes | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    prefix: str = DEFAULT_PREFIX
    #: zstd (where it saves 1/8) on what this object uploads: Redis keeps values in memory
    compress: bool = True
    #: consecutive failures that open the breaker (a timeout opens it at once)
    breaker_failures: int = 3
    #: how long the breaker stays open before one call probes the server (doubling,
    #: up to 16 times this, while probes fail)
    breaker_cooldown_s: float = 2.0
    #: the upload queue: a write that finds it full is not shared (counted)
    queue_entries: int = 1024
    queue_bytes: int = 64 << 20
    #: how long close() goes on sending what is queued
    drain_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise TypeError(f"remote must be a redis:// URL string, got {type(self.url).__name__}")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"remote must be a redis://, rediss:// or unix:// URL, got {_redacted(self.url)!r}"
            )
        _check_url(self.url)
        if self.mode not in MODES:
            raise ValueError(f"remote mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.key is not None and (not isinstance(self.key, bytes) or len(self.key) < 16):
            raise ValueError(f"the remote key must be at least {MIN_KEY_BYTES} bytes")
        for name, low, high in (("timeout_s", 0.001, 60.0), ("breaker_cooldown_s", 0.0, 3600.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"remote {name} must be from {low} to {high}, got {value!r}")
        for name, low, high in (
            ("max_blob_bytes", 1, 64 << 20),
            ("breaker_failures", 1, 1000),
            ("queue_entries", 1, 1 << 20),
            ("queue_bytes", 1, 1 << 40),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"remote {name} must be a whole number from {low} to {high}")
        _check_prefix(self.prefix)

    def __repr__(self) -> str:
        return f"RemoteSettings({self.where!r}, mode={self.mode!r}, signed={self.key is not None})"

    @property
    def where(self) -> str:
        """The URL with any password hidden, for messages."""
        return _redacted(self.url)


def _check_prefix(prefix: object) -> None:
    """Raise ValueError unless `prefix` is UTF-8 text of 1 to 200 characters."""
    if not isinstance(prefix, str) or not 1 <= len(prefix) <= 200:
        # Empty, the entries' names would be bare hex, which `remote rm --all` cannot
        # tell from another application's keys.
        raise ValueError(f"remote prefix must be text of 1 to 200 characters, got {prefix!r:.80}")
    try:
        prefix.encode()
    except UnicodeEncodeError:
        # (bytes that are not UTF-8, from the environment): every call would fail
        raise ValueError(f"remote prefix must be UTF-8 text, got {prefix!r:.80}") from None


def _check_url(url: str) -> None:
    """Raise ValueError for a URL redis-py would refuse only at the first call (a port
    that is not a number, a query argument of the wrong type), naming what is wrong."""
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - raises for a port that is not one
        import redis.connection

        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ImportError:
        return  # opening the tier says what to install
    except ValueError as error:
        raise ValueError(f"remote URL {_redacted(url)!r} is malformed: {error}") from None


#: Query arguments of a redis URL that hold a secret.
_SECRET_ARGUMENTS = frozenset({"password"})


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in _SECRET_ARGUMENTS for name, _ in pairs):
            query = urllib.parse.urlencode(
                [(n, "***" if n.lower() in _SECRET_ARGUMENTS else v) for n, v in pairs],
                safe="*",
            )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@overload
def remote_from_environment(env: Mapping[str, str]) -> RemoteSettings | None: ...
@overload
def remote_from_environment(env: Mapping[str, str], url: str) -> RemoteSettings: ...
def remote_from_environment(
    env: Mapping[str, str], url: str | None = None
) -> RemoteSettings | None:
    """The VYRE_SQLCACHE_REMOTE* variables as settings (None without a URL); `url`, given,
    stands for VYRE_SQLCACHE_REMOTE (which is then not read) and takes the others. Raises
    ValueError naming the malformed variable (or `remote`, for a bad `url`)."""
    where = ENV_REMOTE if url is None else "remote"
    if url is None:
        url = env.get(ENV_REMOTE, "").strip()
        if not url:
            return None
    values: dict[str, Any] = {"url": url}
    mode = env.get(ENV_REMOTE_MODE, "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"{ENV_REMOTE_MODE} must be one of {', '.join(MODES)}, got {mode!r}")
        values["mode"] = mode
    key = env.get(ENV_REMOTE_KEY)
    if key is not None and key.strip():  # (blanks are unset, as for every variable)
        # The variable's own bytes, also where they are not UTF-8 (a raw random secret).
        secret = key.encode("utf-8", "surrogateescape")
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(
                f"{ENV_REMOTE_KEY} must be at least {MIN_KEY_BYTES} bytes (a long random "
                f"secret shared by the team), got one of {len(secret)}"
            )
        values["key"] = secret
    timeout = env.get(ENV_REMOTE_TIMEOUT, "").strip()
    if timeout:
        try:
            values["timeout_s"] = float(timeout)
        except ValueError:
            values["timeout_s"] = None
        if values["timeout_s"] is None or not 0.001 <= values["timeout_s"] <= 60:
            raise ValueError(
                f"{ENV_REMOTE_TIMEOUT} must be seconds from 0.001 to 60 (e.g. 0.05), "
                f"got {timeout!r}"
            )
    size = env.get(ENV_REMOTE_MAX_BLOB, "").strip()
    if size:
        from .config import parse_size

        values["max_blob_bytes"] = parse_size(size, name=ENV_REMOTE_MAX_BLOB)
        if not 1 <= values["max_blob_bytes"] <= 64 << 20:
            raise ValueError(f"{ENV_REMOTE_MAX_BLOB} must be from 1 byte to 64M, got {size!r}")
    prefix = env.get(ENV_REMOTE_PREFIX)
    if prefix is not None and prefix.strip():
        values["prefix"] = prefix
        try:
            _check_prefix(prefix)
        except ValueError as error:
            raise ValueError(f"{ENV_REMOTE_PREFIX}: {error}") from None
    try:
        return RemoteSettings(**values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
