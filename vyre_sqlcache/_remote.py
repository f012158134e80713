"""The shared tier: a Redis server behind the local file, never fatal, every value verified.

`RemoteTier` is what a cache object holds when a remote is configured. Reads ask it
only for what the local file missed (`fetch`, one MGET for a whole `get_many`);
commits hand it their entries (`upload`), which a bounded queue takes without ever
blocking and a background thread sends in pipelined SETs. Every remote call goes
through `_guarded`: an error is counted and logged (the kinds that do not fix
themselves, authentication and permissions, once), never raised, and a circuit
breaker stops asking a server that failed `breaker_failures` times in a row (or timed
out once) until `breaker_cooldown_s` has passed; then one call probes it.

redis-py is imported only when a tier is made (the `remote` extra). Its client is
built with short connect and socket timeouts, no retries and RESP2 (no HELLO round trip
on connecting), so a dead server costs one timeout, not redis-py's 4 s of retries.

Reads and uploads have a breaker each: a server that refuses writes (full, a replica,
too few replicas, a value over its bulk length) is still read. Only a failure to get an
answer (a timeout, a connection refused or dropped) or a refused login counts towards a
breaker; an error the server answers with is counted and logged once, by its kind.

Fork: the child must not share the parent's socket or thread. A hook registered with
`os.register_at_fork` gives every tier in the child a new lock, an empty queue, no
thread and no client (made again on first use); the parent keeps and sends its own.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import _remote_format, _wakeup
from ._remote_settings import (
    ENV_REMOTE,
    ENV_REMOTE_KEY,
    ENV_REMOTE_MAX_BLOB,
    ENV_REMOTE_MODE,
    ENV_REMOTE_PREFIX,
    ENV_REMOTE_TIMEOUT,
    RemoteSettings,
    remote_from_environment,
)
from ._rows import NewEntry
from .errors import CacheError

__all__ = [
    "ENV_REMOTE",
    "ENV_REMOTE_KEY",
    "ENV_REMOTE_MAX_BLOB",
    "ENV_REMOTE_MODE",
    "ENV_REMOTE_PREFIX",
    "ENV_REMOTE_TIMEOUT",
    "FetchedEntry",
    "RemoteSettings",
    "RemoteStats",
    "RemoteTier",
    "remote_from_environment",
]

log = logging.getLogger("vyre_sqlcache")

#: The upload thread's socket timeout (at least): a large SET is one `sendall`.
UPLOAD_TIMEOUT_S: Final = 2.0
#: How many locally invalidated entry keys an object remembers not to fetch again.
MAX_FENCED: Final = 100_000
EXTRA_HINT: Final = "pip install 'vyre-sqlcache[remote]'"


@dataclass(frozen=True, slots=True)
class FetchedEntry(NewEntry):
    """An entry admitted from the remote: stored locally, never uploaded back."""


@dataclass(frozen=True)
class RemoteStats:
    """The shared tier's counters for this cache object."""

    where: str
    mode: str
    #: 'closed' (asking), 'open' (not asking until a probe) or 'half-open' (probing)
    breaker: str
    hits: int
    misses: int
    errors: int
    timeouts: int
    #: values refused by a check (size, key, checksum, signature): misses, never admitted
    rejected: int
    bytes_down: int
    bytes_up: int
    uploads: int
    #: writes not shared because the upload queue was full
    queue_drops: int
    #: writes not shared because the blob is over max_blob_bytes
    too_large: int
    #: writes whose upload failed (an error, or still queued when close() gave up)
    unsent: int
    queued: int
    #: the upload thread's breaker: 'open' while it waits before sending again
    upload_breaker: str = "closed"


class _Breaker:
    """Closed, open for a cooldown after repeated failures, then one probe (half-open)."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._limit = failures
        self._base = cooldown_s
        self._cooldown = cooldown_s
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self._probing:
            return "half-open"
        return "open" if self._failures >= self._limit else "closed"

    def allow(self) -> bool:
        """Whether a call may go to the server now (one probe at a time once open)."""
        if self._failures < self._limit:
            return True
        with self._lock:
            if self._probing or time.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        if self._failures or self._probing:
            with self._lock:
                self._failures = 0
                self._probing = False
                self._cooldown = self._base

    def failed(self, *, at_once: bool) -> None:
        with self._lock:
            if self._probing:
                self._cooldown = min(self._cooldown * 2, self._base * 16)
            self._probing = False
            self._failures = self._limit if at_once else self._failures + 1
            if self._failures >= self._limit:
                self._open_until = time.monotonic() + self._cooldown

    def abandon(self) -> None:
        """A call ended without an answer (Ctrl-C): a probe it was lets the next call probe."""
        self._probing = False

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._probing = False


def _redis() -> Any:
    try:
        import redis
    except ImportError as error:
        raise ImportError(f"a remote cache tier needs the redis package: {EXTRA_HINT}") from error
    return redis


def make_client(settings: RemoteSettings, socket_timeout: float) -> Any:
    """A redis-py client: short timeouts, no retries, no handshake beyond connecting."""
    redis = _redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        client_name=None,
        # RESP3, redis-py 8's default, costs a HELLO round trip on every new connection
        # (a URL's `?protocol=3` still wins).
        protocol=2,
        **_no_setinfo(redis),
    )


def _no_setinfo(redis: Any) -> dict[str, Any]:
    """The arguments that turn off CLIENT SETINFO (a round trip on every connect):
    `driver_info=None` from redis-py 7, `lib_name`/`lib_version` before."""
    import inspect

    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


class RemoteTier:
    """One cache object's shared tier: reads, the upload queue and thread, counters."""

    def __init__(self, settings: RemoteSettings) -> None:
        """Check that redis-py is importable (ImportError naming the extra if not)."""
        _redis()
        # Imported here, not by the upload thread's first connection (a host name is
        # encoded with it): a fork while that import held its module lock left the lock
        # taken in the child, whose every connection then waited for it for ever.
        codecs.lookup("idna")
        self.settings = settings
        self._key = settings.key
        self._breaker = _Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self._upload_breaker = _Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self._warned: set[str] = set()
        self._counts: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "errors", "timeouts", "rejected", "bytes_down", "bytes_up",
             "uploads", "queue_drops", "too_large", "unsent"),
            0,
        )  # fmt: skip
        self._compress = settings.compress
        #: entry keys this object invalidated locally and has not written since: not
        #: fetched again (the shared tier still holds the bytes the invalidation dropped)
        self._fenced: dict[bytes, None] = {}
        self._reset()
        _tiers.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[NewEntry] = deque()
        self._queued_bytes = 0
        self._sending = 0  # entries taken by the thread and not yet sent
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._clients: dict[str, Any] = {}
        self._client_lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------

    @property
    def reads(self) -> bool:
        return self.settings.mode != "write-only"

    def name(self, entry_key: bytes) -> str:
        """The Redis key of an entry."""
        return self.settings.prefix + entry_key.hex()

    def fetch(self, entry_keys: Sequence[bytes]) -> list[bytes | None]:
        """The verified blobs of these entries (None for a miss, a refused value or any
        error), in one round trip; never raises."""
        misses: list[bytes | None] = [None] * len(entry_keys)
        if not self.reads or not entry_keys:
            return misses
        if self._fenced:
            asked = [i for i, key in enumerate(entry_keys) if key not in self._fenced]
            if len(asked) < len(entry_keys):
                fetched = self.fetch([entry_keys[i] for i in asked]) if asked else []
                for i, blob in zip(asked, fetched, strict=True):
                    misses[i] = blob
                return misses
        names = [self.name(key) for key in entry_keys]
        values = self._guarded("reading", lambda c: _values(c, names))
        if values is None:  # not asked (the breaker is open) or no answer: misses too
            self._count("misses", len(names))
            return misses
        found: list[bytes | None] = []
        limit = self.settings.max_blob_bytes
        largest = limit + _remote_format.HEADER.size + _remote_format.MAC_BYTES
        hits = rejected = down = 0
        for entry_key, value in zip(entry_keys, values, strict=True):
            if value is None:
                found.append(None)
                continue
            down += len(value)
            try:
                if len(value) > largest:
                    raise _remote_format.Rejected(f"{len(value)} bytes, over the size limit")
                found.append(_remote_format.decode(value, entry_key, self._key, limit))
                hits += 1
            except _remote_format.Rejected as why:
                rejected += 1
                self._warn_once(
                    "rejected",
                    f"refused a remote entry {entry_key.hex()} from {self.settings.where}: {why} "
                    "(it is a miss; later refusals are logged at debug level)",
                )
                log.debug("vyre-sqlcache: refused remote entry %s: %s", entry_key.hex(), why)
                found.append(None)
        with self._lock:  # once a call, not once a key
            self._counts["hits"] += hits
            self._counts["rejected"] += rejected
            self._counts["misses"] += len(values) - hits - rejected
            self._counts["bytes_down"] += down
        return found

    # -- writing ---------------------------------------------------------------------

    def fence(self, entry_keys: Sequence[bytes]) -> None:
        """Fetch these entries no more until this object writes them again (bounded)."""
        with self._lock:
            for key in entry_keys:
                self._fenced[key] = None
            while len(self._fenced) > MAX_FENCED:
                del self._fenced[next(iter(self._fenced))]

    def upload(self, entries: Sequence[NewEntry]) -> None:
        """Queue committed entries for the thread to send; never blocks, never raises.
        Entries admitted from the remote, over the size limit or finding the queue full
        are not sent (the last two counted)."""
        if self.settings.mode == "read-only":
            if self._fenced:
                with self._lock:
                    for entry in entries:
                        self._fenced.pop(entry.entry_key, None)
            return
        limit = self.settings.max_blob_bytes
        start = False
        with self._lock:
            if self._stopped:
                return
            for entry in entries:
                if isinstance(entry, FetchedEntry):
                    continue
                self._fenced.pop(entry.entry_key, None)
                size = len(entry.blob)
                if size > limit:
                    self._counts["too_large"] += 1
                elif (
                    len(self._queue) >= self.settings.queue_entries
                    or self._queued_bytes + size > self.settings.queue_bytes
                ):
                    self._counts["queue_drops"] += 1
                else:
                    self._queue.append(entry)
                    self._queued_bytes += size
                    start = True
            if start:
                self._wake.notify()
                start = self._thread is None
        if start:
            self._start()

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="vyre-sqlcache remote", daemon=True)
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = thread
        try:
            _wakeup.start(thread)
        except _wakeup.CannotStart as error:
            with self._lock:
                self._thread = None  # the next upload tries again; the entries stay queued
            _wakeup.cannot_start("uploads to the shared tier wait in their queue", error)

    def _take(self, limit_entries: int = 128, limit_bytes: int = 8 << 20) -> list[NewEntry]:
        """Up to a batch of queued entries (called with the lock held)."""
        batch: list[NewEntry] = []
        size = 0
        while self._queue and len(batch) < limit_entries and size < limit_bytes:
            entry = self._queue.popleft()
            batch.append(entry)
            size += len(entry.blob)
            self._queued_bytes -= len(entry.blob)
        self._sending = len(batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = self._take()
            try:
                self._send(batch)
            except BaseException as error:  # never let the thread die silently
                log.warning("vyre-sqlcache: the remote upload thread stopped: %r", error)
                return
            finally:
                with self._lock:
                    self._sending = 0
                    self._wake.notify_all()

    def _send(self, batch: list[NewEntry]) -> None:
        """Encode and SET a batch in one pipeline; while the breaker is open, wait for a
        probe (the queue fills and drops meanwhile), dropping the batch if stopped."""
        values = [
            (
                self.name(e.entry_key),
                _remote_format.encode(e.entry_key, e.blob, self._key, compress=self._compress),
            )
            for e in batch
        ]

        def send(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, value in values:
                pipe.set(name, value)
            # Each SET's own result: a full server refuses some of a pipeline and stores
            # the rest, which are shared (and counted) all the same.
            return list(pipe.execute(raise_on_error=False))

        while True:
            if not self._upload_breaker.allow():
                if self._stopped:
                    self._count("unsent", len(values))
                    return
                time.sleep(min(0.05, self.settings.breaker_cooldown_s))
                continue
            largest = max(len(v) for _, v in values)
            count = f"{len(values)} entries" if len(values) > 1 else "an entry"
            what = f"uploading {count} (the largest {largest:,} bytes) to"
            results = self._guarded(what, send, checked=False, kind="upload")
            if results is None:
                results = [None] * len(values)
            stored = [r is True for r in results]
            refused = next((r for r in results if isinstance(r, Exception)), None)
            if refused is not None:
                self._refused(what, refused)
            with self._lock:
                self._counts["unsent"] += stored.count(False)
                self._counts["uploads"] += stored.count(True)
                self._counts["bytes_up"] += sum(
                    len(v) for (_, v), ok in zip(values, stored, strict=True) if ok
                )
            return

    def close(self) -> None:
        """Send what is queued for up to `drain_s`, then stop the thread; never raises."""
        deadline = time.monotonic() + self.settings.drain_s
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
            alone = self._thread is None  # none could start (the process's thread limit)
        while alone and time.monotonic() < deadline:
            with self._lock:
                batch = self._take() if self._queue else []
            if not batch:
                break
            try:
                self._send(batch)  # from here, then
            finally:
                with self._lock:
                    self._sending = 0
        with self._lock:
            while (
                (self._queue or self._sending)
                and self._thread is not None
                and self._thread.is_alive()
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            lost = len(self._queue)
            self._counts["unsent"] += lost
            self._queue.clear()
            thread, clients = self._thread, list(self._clients.values())
            self._clients = {}
        if lost:
            log.warning(
                "vyre-sqlcache: %d entries were not shared with %s before close",
                lost,
                self.settings.where,
            )
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
        for client in clients:
            try:
                client.close()
            except Exception as error:
                log.debug("vyre-sqlcache: closing the remote client: %r", error)

    # -- calls ------------------------------------------------------------------------

    def _client_now(self, kind: str = "read") -> Any:
        """The client of reads (the short timeout) or of uploads, made on first use.

        Uploads have a client of their own with a longer socket timeout: Python bounds a
        whole `sendall` by it, and an 8 MiB SET takes 67 ms at 1 Gbit/s. The upload
        thread can wait; a reader cannot."""
        client = self._clients.get(kind)
        if client is None:
            with self._client_lock:
                client = self._clients.get(kind)
                if client is None:
                    timeout = self.settings.timeout_s
                    if kind == "upload":
                        timeout = max(timeout, UPLOAD_TIMEOUT_S)
                    client = self._clients[kind] = make_client(self.settings, timeout)
        return client

    def _guarded(
        self, what: str, call: Callable[[Any], Any], *, checked: bool = True, kind: str = "read"
    ) -> Any:
        """`call(client)`'s result, or None after any error (counted, logged, fed to the
        breaker of `kind`) or while that breaker is open; never raises."""
        breaker = self._upload_breaker if kind == "upload" else self._breaker
        if checked and not breaker.allow():
            return None
        redis = _redis()
        client = None
        try:
            client = self._client_now(kind)
            result = call(client)
        except redis.exceptions.TimeoutError as error:
            self._failed(breaker, what, "timeouts", error, at_once=True)
            return None
        except redis.exceptions.AuthenticationError as error:
            self._failed(breaker, what, "errors", error, at_once=True, once=True)
            return None
        except redis.exceptions.ResponseError as error:
            if _is_login_refused(error):
                self._failed(breaker, what, "errors", error, at_once=True, once=True)
            else:
                breaker.succeeded()  # the server answered: asking it again is fine
                self._refused(what, error)
            return None
        except Exception as error:  # never fatal: a cache may only miss
            self._drop_client(kind, client)
            if _from_a_signal_handler(error):
                breaker.abandon()  # the application's (a timeout's), not the server's
                raise
            self._failed(breaker, what, "errors", error, at_once=False)
            return None
        except BaseException:
            self._drop_client(kind, client)
            breaker.abandon()  # Ctrl-C: the probe, if this was one, never answered
            raise
        breaker.succeeded()
        return result

    def _refused(self, what: str, error: Exception) -> None:
        """Count and log (once for each kind: OOM, READONLY, WRONGTYPE...) an error the
        server answered a command with."""
        self._count("errors")
        # redis-py's classes of known codes drop the code from the text (OOM, READONLY);
        # for the others (NOREPLICAS, MISCONF...) it is the text's first word.
        kind = type(error).__name__
        if kind == "ResponseError":
            kind = str(error).split(" ", 1)[0]
        self._warn_once(
            kind,
            f"{what} {self.settings.where} refused: {_described(error)}; further refusals "
            "of this kind are counted, not logged",
        )

    def _drop_client(self, kind: str, client: Any) -> None:
        """Make the next call of `kind` use a new client: an exception that is not the
        server's answer may have landed between redis-py sending a command and reading
        its reply (which the connection, back in its pool, would give the next command)
        or before it took the connection back (100 such, and the pool had none left)."""
        with self._client_lock:
            if client is not None and self._clients.get(kind) is client:
                del self._clients[kind]  # (closed when the last call using it ends)

    def _failed(
        self,
        breaker: _Breaker,
        what: str,
        counter: str,
        error: BaseException,
        *,
        at_once: bool,
        once: bool = False,
    ) -> None:
        self._count(counter)
        before = breaker.state
        breaker.failed(at_once=at_once)
        message = f"{what} {self.settings.where} failed: {_described(error)}"
        if once:
            self._warn_once(type(error).__name__, message)
        elif before != "open" and breaker.state == "open":
            log.warning(
                "vyre-sqlcache: %s; not %s the remote for %.1f s",
                message,
                "sending to" if breaker is self._upload_breaker else "asking",
                breaker._cooldown,
            )
        else:
            log.debug("vyre-sqlcache: %s", message)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("vyre-sqlcache: %s", message)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def stats(self) -> RemoteStats:
        """This object's counters and the breaker's state."""
        with self._lock:
            counts = dict(self._counts)
            queued = len(self._queue) + self._sending
        return RemoteStats(
            where=self.settings.where,
            mode=self.settings.mode,
            breaker=self._breaker.state,
            queued=queued,
            upload_breaker=self._upload_breaker.state,
            **counts,
        )

    # -- looking at and cleaning the remote (the command line) -------------------------

    def _direct(self, call: Callable[[Any], Any]) -> Any:
        """`call(client)`, raising CacheError with the server's error (for commands)."""
        redis = _redis()
        try:
            return call(self._client_now())
        except redis.exceptions.RedisError as error:
            raise CacheError(f"the remote {self.settings.where}: {error}") from error

    def ping(self) -> float:
        """Seconds one PING took; raises CacheError if the server does not answer."""
        start = time.perf_counter()
        self._direct(lambda c: c.ping())
        return time.perf_counter() - start

    def scan(self) -> Iterator[tuple[bytes, int]]:
        """(entry key, value bytes) of every entry under this prefix, a page of SCAN at a
        time; raises CacheError."""
        # Every character the server's glob gives a meaning to is escaped: a prefix
        # `ci?:` matched `ci1:`'s entries.
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", self.settings.prefix) + "*"
        prefix = self.settings.prefix.encode()
        cursor = 0
        while True:

            def page(client: Any, at: int = cursor) -> tuple[int, list[bytes]]:
                found = client.scan(at, match=pattern, count=1000)
                return int(found[0]), list(found[1])

            cursor, names = self._direct(page)
            # Only names of entries: another tool's keys under a shared prefix (a list, a
            # hash) made the STRLEN below fail the whole listing (WRONGTYPE).
            keys = [key for key in map(_entry_key_of, names, [prefix] * len(names)) if key]

            def sizes(client: Any, chunk: list[bytes] = keys) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for key in chunk:
                    pipe.strlen(self.name(key))
                return list(pipe.execute(raise_on_error=False))

            for entry_key, size in zip(keys, self._direct(sizes) if keys else [], strict=True):
                if isinstance(size, int):  # (an error: not a string, so not an entry)
                    yield entry_key, size
            if not cursor:
                return

    def delete(self, entry_keys: Sequence[bytes]) -> int:
        """Delete these entries from the remote; how many were there. Raises CacheError."""
        if not entry_keys:
            return 0
        return int(self._direct(lambda c: c.delete(*(self.name(k) for k in entry_keys))))

    # -- fork --------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        # The parent sends its own queue on its own socket; the child starts afresh.
        self._reset()
        self._breaker.reset_after_fork()


def _entry_key_of(name: bytes, prefix: bytes) -> bytes | None:
    """The entry key a Redis key under `prefix` names, or None if it is not an entry's."""
    hexed = name[len(prefix) :]
    if not name.startswith(prefix) or len(hexed) != 64:
        return None
    try:
        return bytes.fromhex(hexed.decode("ascii"))
    except ValueError:
        return None


def _values(client: Any, names: list[str]) -> list[bytes | None]:
    """The values of these Redis keys, in one round trip; raises redis' InvalidResponse
    for a reply of another shape (another command's, left on the connection)."""
    # MGET for one key too: GET of a key holding another type (another tool's hash under
    # the prefix) fails with WRONGTYPE, where MGET answers nil, a miss.
    values = client.mget(names)
    if not isinstance(values, list) or len(values) != len(names):
        raise _redis().exceptions.InvalidResponse(f"a reply of another shape: {values!r:.80}")
    if not all(value is None or isinstance(value, bytes) for value in values):
        raise _redis().exceptions.InvalidResponse("a reply holding values that are not strings")
    return values


def _described(error: BaseException) -> str:
    """`error`'s class and the server's text (redis-py 8's repr keeps only the class), with
    what to do where a login was refused."""
    text = f"{type(error).__name__}: {error}"
    hint = _HINTS.get(type(error).__name__)
    if hint is not None:
        text += f" ({hint})"
    elif _is_login_refused(error):
        text += (
            " (give the password in the URL, redis://:PASSWORD@host, or "
            "redis://USER:PASSWORD@host for an ACL user)"
        )
    return text


_HINTS: Final = {
    "OutOfMemoryError": "OOM: the server is full; it is still read. Raise its maxmemory, or "
    "let it evict (maxmemory-policy allkeys-lru)",
    "ReadOnlyError": "READONLY: a replica; it is still read. Send uploads to the primary",
}


def _is_login_refused(error: BaseException) -> bool:
    """Whether the server refused this client's login (no or a wrong password)."""
    if type(error).__name__ == "AuthenticationError":
        return True
    text = str(error)
    return text.startswith(("NOAUTH", "WRONGPASS")) or "authenticated" in text


def _from_a_signal_handler(error: BaseException) -> bool:
    """Whether `error` came out of a Python signal handler (an application's timeout that
    interrupted a remote call): it is the application's to see, not a remote error."""
    handlers = set()
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            handlers.add(code)
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code in handlers:
            return True
        trace = trace.tb_next
    return False


_tiers: weakref.WeakSet[RemoteTier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_tiers):
        tier._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def open_tier(
    argument: str | RemoteSettings | None, from_environment: RemoteSettings | None, *, given: bool
) -> RemoteTier | None:
    """The tier a cache object uses: the argument's (`given`; a URL stands for
    VYRE_SQLCACHE_REMOTE and takes the other variables: mode, key, timeout, prefix), else
    the environment's, else None. Without redis-py: an ImportError naming the extra for an
    argument, one warning for the environment."""
    if not given:
        if from_environment is None:
            return None
        try:
            return RemoteTier(from_environment)
        except ImportError as error:
            global _warned_missing
            if not _warned_missing:
                _warned_missing = True
                log.warning(
                    "vyre-sqlcache: %s is set, but %s; the cache stays local", ENV_REMOTE, error
                )
            return None
    if argument is None:
        return None
    if isinstance(argument, str):
        argument = remote_from_environment(os.environ, url=argument)
    if not isinstance(argument, RemoteSettings):
        raise TypeError(
            "remote must be a redis:// URL, a RemoteSettings or None, "
            f"got {type(argument).__name__}"
        )
    return RemoteTier(argument)


_warned_missing = False


#: What the reading call knows of an entry beside its key: (key, fingerprint, program
#: digest as given, a named entry's (namespace, name)), so that an admitted entry gets
#: the same columns as a written one.
Origin = tuple[Any, Any, Any, Any]
NO_ORIGIN: Final[Origin] = (None, None, None, None)


def admitted(entry_key: bytes, origin: Origin, blob: bytes) -> FetchedEntry:
    """The local entry of a verified remote hit."""
    key, fingerprint, digest, named = origin
    if digest is not None:
        from .keys import coerce_digest

        digest = coerce_digest("program_digest", digest)  # checked by the call already
    return FetchedEntry(entry_key, key, fingerprint, digest, blob, named=named)
