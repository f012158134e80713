"""Read-only layers: cache files searched after the user's own on every read.

An application ships a cache compiled on its CI (`vyre-sqlcache bundle`) and opens
the user's cache with `layers=[...]`. A layer is opened read-only (immutable where
this process cannot write its folder, so no -shm is needed and no lock taken),
never migrated and never written; a file that is missing, damaged, of another
schema version or not a cache is skipped with one warning. Every entry served from
a layer is checksum-verified like the user's own; a damaged one is a miss (the
layer is read-only, so nothing is dropped).

What the user's invalidations and deletes reach in a layer is recorded in the
user's file (`layer_masks`, schema 5): a layer entry whose key and checksum are
masked is never served. This module holds that SQL and the layers' own.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from os import PathLike, fspath
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import apsw

from . import _rows
from ._cachefile import CacheFile, header_damage, is_not_sqlite, read_head
from ._connections import ConnectionPool, connect, transaction
from ._rows import Fetched
from ._schema import (
    OLDEST_READABLE,
    _checked_version,
    latest_version,
    readable,
    schema_version,
)
from .config import expand_home
from .errors import CacheError, ReadOnlyCacheError, SchemaTooNewError
from .keys import DeviceFingerprint, entry_id

__all__ = [
    "LAYER_SETTING",
    "Layer",
    "Layers",
    "check_layer_paths",
    "is_layer_file",
    "is_masked",
    "mask",
    "open_layers",
    "refuse_layer_for_writes",
]

log = logging.getLogger("vyre_sqlcache")
_T = TypeVar("_T")

#: The meta setting (`setting:layer` = 1) that marks a file made by `bundle`.
LAYER_SETTING = "layer"

_LIVE = "e.id NOT IN (SELECT id FROM tombstones)"
_BY_KEYS = (
    "SELECT e.entry_key, b.checksum FROM entries e JOIN blobs b ON b.id = e.id "
    f"WHERE e.id IN carray(?1) AND e.entry_key IN carray(?2) AND {_LIVE}"
)
# The rows `_rows.invalidate` reaches, with the key guard a row-id match needs here
# (a layer row sharing the row id of another key is not that key's).
_IMPACTED = (
    "SELECT e.entry_key, b.checksum FROM entries e JOIN blobs b ON b.id = e.id "
    "WHERE ((e.id IN carray(?1) AND e.entry_key IN carray(?6)) OR (e.key_version IS NOT NULL "
    "AND e.program_digest IS NOT NULL AND e.program_digest IN carray(?2) "
    f"AND e.vendor = ?3 AND e.device = ?4 AND e.driver_digest = ?5)) AND {_LIVE}"
)

#: (entry key, checksum) of a layer entry.
Found = tuple[bytes, bytes]


def check_layer_paths(name: str, value: object) -> tuple[Path, ...]:
    """`value` as a tuple of paths; raises TypeError naming `name` for anything but a
    list or tuple of str / os.PathLike."""
    if isinstance(value, (str, bytes, PathLike)) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of cache file paths (str or os.PathLike), got "
            f"{type(value).__name__} {value!r:.80}; for one layer write [path]"
        )
    paths = []
    for index, item in enumerate(value):
        if not isinstance(item, (str, PathLike)) or not fspath(item):
            raise TypeError(
                f"{name}[{index}] must be a non-empty str or os.PathLike path, got "
                f"{type(item).__name__} {item!r:.80}"
            )
        paths.append(expand_home(fspath(item), name=f"{name}[{index}]"))
    return tuple(paths)


# -- the user's file: masks and the layer marker --------------------------------------


def is_masked(cursor: apsw.Cursor, entry_key: bytes, checksum: bytes) -> bool:
    """Whether the user's file hides this layer entry (invalidated or deleted)."""
    row = cursor.execute(
        "SELECT 1 FROM layer_masks WHERE entry_key = ? AND checksum = ?", (entry_key, checksum)
    ).fetchall()
    return bool(row)


#: A user's file with more masks than this is asked on every layer hit instead of
#: being copied into memory.
MASKS_IN_MEMORY = 256


#: `Connection.data_version` came with apsw 3.47; an older apsw asks the file each time.
_HAS_DATA_VERSION = hasattr(apsw.Connection, "data_version")


class MaskCopy:
    """Each thread's copy of the user's masks, kept while its connection's data version
    (SQLite's count of commits it has seen, read without a statement) stays the same.

    A layer hit would otherwise pay one more statement on the user's file (3.0 µs of
    the 17.7 µs a layer hit took, against 10.5 µs for a direct hit). The version is
    read right after the user's own lookup, so it stands for the snapshot that lookup
    saw: a mask committed by any connection since shows as a new version.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def masked(self, cursor: apsw.Cursor, entry_key: bytes, checksum: bytes) -> bool:
        connection = cursor.connection
        if not _HAS_DATA_VERSION:
            return is_masked(cursor, entry_key, checksum)
        local = self._local
        version = connection.data_version()
        if getattr(local, "connection", None) is not connection or local.version != version:
            rows = cursor.execute(
                "SELECT entry_key, checksum FROM layer_masks LIMIT ?", (MASKS_IN_MEMORY + 1,)
            ).fetchall()
            local.masks = (
                None
                if len(rows) > MASKS_IN_MEMORY
                else frozenset((bytes(k), bytes(c)) for k, c in rows)  # type: ignore[arg-type]
            )
            local.connection, local.version = connection, version
        if local.masks is None:
            return is_masked(cursor, entry_key, checksum)
        return (entry_key, checksum) in local.masks


def mask(connection: apsw.Connection, found: Iterable[Found], now_ms: int) -> int:
    """Hide these layer entries from the user (inside the caller's transaction); return how
    many distinct keys were newly hidden that the user's file does not hold live (those it
    holds are counted by the invalidation of the file itself)."""
    newly: set[bytes] = set()
    for entry_key, checksum in found:
        connection.execute(
            "INSERT OR IGNORE INTO layer_masks (entry_key, checksum, masked_ms) VALUES (?, ?, ?)",
            (entry_key, checksum, now_ms),
        )
        if connection.changes():
            newly.add(entry_key)
    return sum(_rows.owner(connection, key) != key for key in newly)


def copy_masks(source: apsw.Connection, target: apsw.Connection) -> int:
    """Copy the masks that can be read into a rebuilt file (a repair must not bring
    invalidated layer entries back); return how many."""
    try:
        rows = source.execute("SELECT entry_key, checksum, masked_ms FROM layer_masks").fetchall()
    except (apsw.CorruptError, apsw.NotADBError, apsw.IOError):
        return 0
    copied = 0
    for row in rows:
        with suppress(apsw.ConstraintError, apsw.MismatchError):
            target.execute("INSERT OR IGNORE INTO layer_masks VALUES (?, ?, ?)", row)
            copied += 1
    return copied


def is_layer_file(connection: apsw.Connection) -> bool:
    """Whether a cache file (of our schema) is marked as a layer."""
    return bool(_rows.setting(connection, LAYER_SETTING))


def refuse_layer_for_writes(connection: apsw.Connection, where: str) -> None:
    """Raise ReadOnlyCacheError if the file is a cache marked as a layer; a file that is
    not a cache of a known version is left for the schema check to judge."""
    try:
        with transaction(connection, "DEFERRED"):
            _checked_version(connection, where)
            layer = is_layer_file(connection)
    except (CacheError, apsw.Error):
        return
    if layer:
        raise ReadOnlyCacheError(
            f"{where} is a read-only layer (made by `vyre-sqlcache bundle`), not a cache "
            "to write to; open it with readonly=True to read it, or pass it as a layer: "
            f"PipelineCache.open(your_cache, layers=[{where!r}]) or VYRE_SQLCACHE_LAYERS"
        )


# -- the layers ----------------------------------------------------------------------------


class Lookup(NamedTuple):
    """A verified layer entry: its bytes and the index of the layer that served them
    (a named tuple: one is made for every layer hit)."""

    data: bytes
    layer: int


class Layer:
    """One read-only layer file, with a read-only connection per thread (its own pool:
    closed before fork and on close, like the user's file)."""

    def __init__(self, file: CacheFile, first: apsw.Connection, vfs: str | None) -> None:
        self.file = file
        self._vfs = vfs
        self._warned = False
        self.path = file.path
        self.pool = ConnectionPool(self._connect, file.path)
        with self.pool.call() as slot:
            self.pool.adopt(slot, first)

    def _connect(self, mmap: bool) -> apsw.Connection:
        connection = connect(
            self.path,
            readonly=True,
            query_only=True,
            immutable=self.file.immutable,
            mmap=mmap and _mappable(self.file),
            vfs=self._vfs,
            pool=self.pool,
        )
        hold_shared_lock(connection, self.path)
        return connection

    def fetch(self, entry_keys: Sequence[bytes]) -> list[Fetched | None]:
        """The stored blobs of these keys (None where absent), unverified, from one
        snapshot; a layer that cannot be read gives misses."""
        with self.pool.call() as slot:
            connection = self.pool.main(slot)
            cursor = self.pool.cursor(slot)
            found: list[Fetched | None] = []
            try:
                if len(entry_keys) == 1:
                    found = [_rows.fetch(cursor, lambda: self.pool.large(slot), entry_keys[0])]
                else:
                    with transaction(connection, "DEFERRED"):
                        for key in entry_keys:
                            found.append(_rows.fetch(cursor, lambda: self.pool.large(slot), key))
            except apsw.Error as error:
                self.failed(error)
            return found + [None] * (len(entry_keys) - len(found))

    def failed(self, error: apsw.Error) -> None:
        """Report a read of this layer that failed (a miss): once as a warning, then at
        debug level, so that a damaged layer does not flood the application's log."""
        if self._warned:
            log.debug("vyre-sqlcache: reading layer %s failed: %s", self.path, error)
            return
        self._warned = True
        log.warning(
            "vyre-sqlcache: reading layer %s failed: %s (its entries read as misses where "
            "this happens; later failures are logged at debug level)",
            self.path,
            error,
        )

    def fetch_one(self, entry_key: bytes) -> Fetched | None:
        """`fetch` of one key."""
        with self.pool.call() as slot:
            try:
                return _rows.fetch(self.pool.cursor(slot), lambda: self.pool.large(slot), entry_key)
            except apsw.Error as error:
                self.failed(error)
                return None

    def owner(self, entry_key: bytes) -> bytes | None:
        """The key of the row `entry_key` maps to in this layer, or None."""
        return self._run(lambda c: _rows.owner(c, entry_key), None)

    def find(self, sql: str, params: tuple[object, ...] | dict[str, Any]) -> list[Found]:
        """(entry key, checksum) of the rows a statement selects ([] if unreadable)."""

        def run(connection: apsw.Connection) -> list[Found]:
            rows = connection.execute(sql, params).fetchall()
            return [(bytes(k), bytes(c)) for k, c in rows]  # type: ignore[arg-type]

        return self._run(run, [])

    def _run(self, run: Callable[[apsw.Connection], _T], default: _T) -> _T:
        with self.pool.call() as slot:
            try:
                return run(self.pool.main(slot))
            except apsw.Error as error:
                self.failed(error)
                return default

    def close(self) -> None:
        self.pool.close()


class Layers:
    """The layers of one cache object, in search order, and their hit counter."""

    def __init__(self, layers: Sequence[Layer], on_damage: Callable[[], None]) -> None:
        self.layers = tuple(layers)
        self._on_damage = on_damage
        self._lock = threading.Lock()
        self.hits = 0
        self.masks = MaskCopy()

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(layer.path for layer in self.layers)

    def load(
        self, entry_keys: Sequence[bytes], masked: Callable[[bytes, bytes], bool]
    ) -> list[Lookup | None]:
        """The verified, unmasked entries of these keys from the first layer that has each
        (None: in no layer); `masked(key, checksum)` asks the user's file."""
        if len(entry_keys) == 1:
            return [self.load_one(entry_keys[0], masked)]
        results: list[Lookup | None] = [None] * len(entry_keys)
        wanted = list(range(len(entry_keys)))
        for number, layer in enumerate(self.layers):
            if not wanted:
                break
            fetched = layer.fetch([entry_keys[i] for i in wanted])
            still = []
            for index, got in zip(wanted, fetched, strict=True):
                key = entry_keys[index]
                if got is None or not self._sound(layer, key, got) or masked(key, got.checksum):
                    still.append(index)
                else:
                    results[index] = Lookup(got.data, number)
            wanted = still
        served = len(entry_keys) - len(wanted)
        if served:
            with self._lock:
                self.hits += served
        return results

    def load_one(self, key: bytes, masked: Callable[[bytes, bytes], bool]) -> Lookup | None:
        """`load` of one key: the read path's own, without the batch's lists."""
        found = self.peek(key, masked)
        if found is not None:
            with self._lock:
                self.hits += 1
        return found

    def peek(self, key: bytes, masked: Callable[[bytes, bytes], bool]) -> Lookup | None:
        """`load_one` without counting a hit."""
        for number, layer in enumerate(self.layers):
            got = layer.fetch_one(key)
            if got is not None and self._sound(layer, key, got) and not masked(key, got.checksum):
                return Lookup(got.data, number)
        return None

    def _sound(self, layer: Layer, entry_key: bytes, fetched: Fetched) -> bool:
        if _rows.verify(entry_key, fetched):
            return True
        if layer.owner(entry_key) not in (entry_key, None):
            return False  # another key's row sharing the row id: a miss, not damage
        self._on_damage()
        log.warning(
            "vyre-sqlcache: entry %s of layer %s failed its %s checksum; not served (the "
            "layer is read-only and keeps it)",
            entry_key.hex(),
            layer.path,
            fetched.algo,
        )
        return False

    def contains(self, entry_key: bytes, masked: Callable[[bytes, bytes], bool]) -> bool:
        """Whether a layer holds an unmasked entry under this key (bytes not verified)."""
        return any(not masked(key, checksum) for key, checksum in self.with_keys([entry_key]))

    def with_keys(self, entry_keys: Sequence[bytes]) -> list[Found]:
        """(entry key, checksum) of every layer entry with one of these keys."""
        if not entry_keys:
            return []
        params = (
            apsw.carray(array("q", map(entry_id, entry_keys))),
            apsw.carray(tuple(entry_keys)),
        )
        return [found for layer in self.layers for found in layer.find(_BY_KEYS, params)]

    def matching(self, entry_filter: _rows.EntryFilter) -> list[Found]:
        """(entry key, checksum) of every live layer entry that `entry_filter` selects (a
        layer's `pipelines_v` has every column a filter names: layers are of schema 6 on)."""
        where, params = entry_filter.where()
        sql = (
            "SELECT e.entry_key, b.checksum FROM entries e JOIN blobs b ON b.id = e.id "
            f"WHERE lower(hex(e.entry_key)) IN (SELECT entry_key FROM pipelines_v {where}) "
            f"AND {_LIVE}"
        )
        return [found for layer in self.layers for found in layer.find(sql, params)]

    def impacted(self, digests: Sequence[bytes], fingerprint: DeviceFingerprint) -> list[Found]:
        """(entry key, checksum) of the layer entries `invalidate_impacted` reaches."""
        keys = tuple(fingerprint.cache_key(d) for d in digests)
        params = (
            apsw.carray(array("q", map(entry_id, keys))),
            apsw.carray(tuple(digests)),
            fingerprint.vendor,
            fingerprint.device,
            fingerprint.driver_digest,
            apsw.carray(keys),
        )
        return [found for layer in self.layers for found in layer.find(_IMPACTED, params)]

    def close(self) -> None:
        for layer in self.layers:
            layer.close()


def _mappable(file: CacheFile) -> bool:
    """Whether a layer may be read through a memory map: not where SQLite stops looking at
    its size (opened immutable, or held in exclusive locking mode: a layer in
    rollback-journal mode, as `bundle` writes them). A layer cut short in place (`cp` of a
    smaller one over it; the host side of a read-only bind mount) then killed the process
    with SIGBUS at the next read of a page past its new end; read with `pread`, that is a
    damaged layer, a miss."""
    if file.immutable or not file.mappable:
        return False
    head = read_head(file.path)
    return head is not None and head[18:19] == b"\x02"


def hold_shared_lock(connection: apsw.Connection, path: Path) -> None:
    """Keep the shared lock of a layer in rollback-journal mode (as `bundle` writes
    them) from the first read on, instead of taking and dropping it (two fcntl calls
    and a look at the header) around every statement: a read that hits such a layer
    took 8.8 against 5.6 µs for the same statement on a WAL file. A layer is never
    written, and holding the lock keeps anyone from writing it through SQLite under
    us. A layer in WAL mode (a user's cache used as a layer) is left alone: there
    exclusive locking would take the write lock from its owner."""
    head = read_head(path)
    if head is not None and head[18:19] == b"\x01":
        connection.pragma("locking_mode", "exclusive")


def open_layers(
    paths: Sequence[Path], own: Path, on_damage: Callable[[], None], vfs: str | None = None
) -> Layers:
    """Open the usable layers among `paths`, in order; each one that cannot be used is
    skipped with one warning saying why. Never raises for a layer."""
    opened: list[Layer] = []
    seen = {own}
    for path in paths:
        layer = _open_layer(path, seen, vfs)
        if layer is not None:
            opened.append(layer)
            seen.add(layer.path)
    return Layers(opened, on_damage)


def _open_layer(path: Path, seen: set[Path], vfs: str | None) -> Layer | None:
    def skip(why: str) -> None:
        log.warning("vyre-sqlcache: skipping the layer %s: %s", path, why)

    if not path.exists():
        skip("there is no such file (a broken link, or a path that was never written)")
        return None
    try:
        file = CacheFile.locate(path, create=False)
    except CacheError as error:
        skip(str(error))
        return None
    if file.path in seen:
        skip("it is the cache itself or an earlier layer")
        return None
    head = read_head(file.path)
    if is_not_sqlite(head):
        skip("it is not a SQLite database (a damaged file, or not a cache)")
        return None
    damage = header_damage(head)
    if damage is not None:
        skip(f"its header is damaged: {damage}")
        return None
    connection: apsw.Connection | None = None
    try:
        connection = connect(
            file.path,
            readonly=True,
            query_only=True,
            immutable=file.immutable,
            mmap=_mappable(file),
            vfs=vfs,
        )
        hold_shared_lock(connection, file.path)
        with transaction(connection, "DEFERRED"):
            try:
                version = _checked_version(connection, str(file.path))
            except SchemaTooNewError:
                raise CacheError(
                    f"it was bundled by a newer vyre-sqlcache (schema version "
                    f"{schema_version(connection)}; this one reads layers of versions "
                    f"{OLDEST_READABLE} to {latest_version()}): upgrade vyre-sqlcache, or "
                    "bundle it with this version"
                ) from None
        if not readable(version):
            raise CacheError(
                f"it has schema version {version}, this vyre-sqlcache reads layers of "
                f"versions {OLDEST_READABLE} to {latest_version()} (bundle it again with "
                "this version)"
            )
        return Layer(file, connection, vfs)
    except (CacheError, apsw.Error) as error:
        if connection is not None:
            with suppress(apsw.Error):
                connection.close()
        skip(str(error))
        return None
