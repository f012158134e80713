"""Settings from the environment, in the spirit of MESA_SHADER_CACHE_* and CUDA_CACHE_*."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._remote_settings import RemoteSettings

__all__ = [
    "DEFAULT_COMPRESSION",
    "DEFAULT_MAX_BYTES",
    "ENV_COMPRESSION",
    "ENV_DISABLE",
    "ENV_LAYERS",
    "ENV_LOG_MISSES",
    "ENV_MAX_SIZE",
    "ENV_PATH",
    "Settings",
    "check_compression",
    "expand_home",
    "parse_size",
]

ENV_PATH = "VYRE_SQLCACHE_PATH"
ENV_MAX_SIZE = "VYRE_SQLCACHE_MAX_SIZE"
ENV_DISABLE = "VYRE_SQLCACHE_DISABLE"
ENV_COMPRESSION = "VYRE_SQLCACHE_COMPRESSION"
ENV_LAYERS = "VYRE_SQLCACHE_LAYERS"
ENV_LOG_MISSES = "VYRE_SQLCACHE_LOG_MISSES"

#: Default size cap on blob bytes: 1 GiB, as Mesa's shader cache.
DEFAULT_MAX_BYTES = 1 << 30

#: Default compression, chosen by the measurements in README "Compression": zstd where
#: it pays, with trained dictionaries (raw without the zstandard package).
DEFAULT_COMPRESSION = "auto"

_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def expand_home(path: str | os.PathLike[str], *, name: str = "path") -> Path:
    """`path` with a leading `~` or `~user` expanded; raise ValueError naming `name` where
    that home folder cannot be found (HOME unset for a user id without an entry in the
    password database, as in a container; an unknown user)."""
    try:
        return Path(path).expanduser()
    except RuntimeError as error:
        raise ValueError(
            f"{name} is {os.fspath(path)!r}, which starts with ~, but that home folder "
            f"cannot be found ({error}); give an absolute path, or set HOME"
        ) from None


def parse_size(text: str, *, name: str = "size") -> int:
    """Bytes from `123`, `512K`, `512M`, `2G`, `1T` (binary units; `MiB`/`MB` also read).

    Raises ValueError naming `name` for anything else.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"{name} must be a byte count such as 1073741824, 512M or 2G, got {text!r}"
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


#: The variable of each field `Settings.from_environment` may be told to ignore.
_VARIABLES = {
    "path": ENV_PATH,
    "max_bytes": ENV_MAX_SIZE,
    "compression": ENV_COMPRESSION,
    "layers": ENV_LAYERS,
    "log_misses": ENV_LOG_MISSES,
}


@dataclass(frozen=True)
class Settings:
    """What the environment asks for; None where it says nothing."""

    path: Path | None = None
    max_bytes: int | None = None
    disabled: bool = False
    #: 'auto', 'off' or a zstd level as text, checked; None where it says nothing
    compression: str | None = None
    #: the shared tier of VYRE_SQLCACHE_REMOTE and its companions (see `_remote`)
    remote: RemoteSettings | None = None
    #: read-only layer files searched after the cache, in order (os.pathsep-separated)
    layers: tuple[Path, ...] = ()
    #: whether misses are logged in the file (see `PipelineCache.misses`)
    log_misses: bool = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, ignore: Collection[str] = ()
    ) -> Settings:
        """Read the VYRE_SQLCACHE_* variables, but those of the fields named in `ignore`
        (given explicitly: they win, so they are not read, and their variables may be
        anything); raise ValueError naming a malformed one."""
        env = os.environ if environ is None else environ
        skipped = {_VARIABLES[field] for field in ignore if field in _VARIABLES}

        def get(name: str) -> str:
            return "" if name in skipped else env.get(name, "")

        path = get(ENV_PATH).strip() or None
        size = get(ENV_MAX_SIZE).strip()  # blank, as each variable: unset
        disable = get(ENV_DISABLE).strip().lower()
        if disable not in _TRUE | _FALSE:
            raise ValueError(f"{ENV_DISABLE} must be 1 or 0 (or true/false), got {disable!r}")
        log_misses = get(ENV_LOG_MISSES).strip().lower()
        if log_misses not in _TRUE | _FALSE:
            raise ValueError(f"{ENV_LOG_MISSES} must be 1 or 0 (or true/false), got {log_misses!r}")
        compression = get(ENV_COMPRESSION).strip() or None
        if compression is not None:
            check_compression(compression, name=ENV_COMPRESSION)
        from ._remote_settings import remote_from_environment

        return cls(
            remote=None if "remote" in ignore else remote_from_environment(env),
            path=None if path is None else expand_home(path, name=ENV_PATH),
            max_bytes=None if not size else parse_size(size, name=ENV_MAX_SIZE),
            disabled=disable in _TRUE,
            compression=compression,
            layers=tuple(
                expand_home(part.strip(), name=ENV_LAYERS)
                for part in get(ENV_LAYERS).split(os.pathsep)
                if part.strip()
            ),
            log_misses=log_misses in _TRUE,
        )


def check_compression(setting: str | int, *, name: str = "compression") -> str | int:
    """`setting` if it is a compression setting ('auto', 'off' or a zstd level); raise
    TypeError/ValueError naming `name`, the value and what is allowed."""
    from ._codec import parse_compression

    parse_compression(setting, name)
    return setting
