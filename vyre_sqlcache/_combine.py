"""Bundle and merge: the statements that copy entries between cache files.

`bundle` writes a compact, self-contained layer from a cache: every entry verified
on the way, stored bytes kept as they are (compressed entries with their
dictionaries, ids kept), written to a temporary file beside the output, VACUUMed,
left in rollback-journal mode (a reader of a read-only layer needs no -wal or -shm)
and marked as a layer, then renamed into place.

`copy` writes a snapshot of a whole cache file (every table, as it is) with SQLite's
`VACUUM INTO`, to a temporary file beside the output that is synced and renamed into
place: unlike a file copy while processes use the cache, it is never torn.

`merge` admits the entries of other cache files into a cache: sources are opened
read-only, every incoming entry is verified, and admitted through `_rows.insert`
(compressed with the destination's own codec and dictionaries, evicting by its
LRU for its cap), one transaction per source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from . import _codec, _rows
from ._cachefile import CacheFile, has_side_files, header_damage, is_not_sqlite, read_head
from ._codec import Codec
from ._connections import PAGE_SIZE, connect, stop_if_interrupted, transaction, vacuum
from ._layers import LAYER_SETTING
from ._rows import NewEntry, RawEntry
from ._schema import (
    OLDEST_READABLE,
    _checked_version,
    latest_version,
    migrations,
    readable,
    schema_version,
)
from .errors import CacheError, SchemaTooNewError
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey, named_entry_key

__all__ = [
    "BundleFilter",
    "BundleReport",
    "CopyReport",
    "MergeReport",
    "bundle_into",
    "copy_into",
    "merge_from",
    "sound_entry",
    "source",
]

log = logging.getLogger("vyre_sqlcache")

#: Merged entries are admitted in groups of at most this many bytes (and at most a
#: quarter of the cap), so that the destination's LRU can evict earlier groups of the
#: same source: one insert never evicts the entries it inserts.
MERGE_GROUP_BYTES = 8 << 20
MERGE_GROUP_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class BundleFilter:
    """Which entries a bundle takes; every field given must match (None: any)."""

    backend: str | None = None
    vendor: int | None = None
    device: int | None = None
    driver_digest: bytes | None = None
    key_version: int | None = None


@dataclass(frozen=True, slots=True)
class BundleReport:
    """What `PipelineCache.bundle` wrote: entries copied (verified), entries skipped
    because they failed their checksum or could not be read, the dictionaries copied
    along, and the output file and its size."""

    path: Path
    entries: int
    skipped_bad: int
    dictionaries: int
    blob_bytes: int
    file_bytes: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What `PipelineCache.copy` wrote: the output file, its live entries, their blob
    bytes (as the callers wrote them) and the file's size."""

    path: Path
    entries: int
    blob_bytes: int
    file_bytes: int


@dataclass(slots=True)
class MergeReport:
    """What `PipelineCache.merge` did, over every source.

    `added`: keys new to the destination; `replaced`: keys whose incoming entry was
    newer (`created_ms`) than the destination's; `kept_existing`: keys whose
    destination entry was as new or newer (a tie keeps the destination's);
    `skipped_bad`: incoming entries that failed their checksum or could not be read;
    `too_large`: entries larger than the destination's cap; `evicted`: entries the
    destination's cap evicted while admitting (earlier entries of this merge included).
    """

    sources: list[str] = field(default_factory=list)
    added: int = 0
    replaced: int = 0
    kept_existing: int = 0
    skipped_bad: int = 0
    too_large: int = 0
    evicted: int = 0


_LIVE = "id NOT IN (SELECT id FROM tombstones)"
_FILTERED_IDS = (
    f"SELECT id FROM entries WHERE {_LIVE} "
    "AND (:backend IS NULL OR backend = :backend) "
    "AND (:vendor IS NULL OR vendor = :vendor) "
    "AND (:device IS NULL OR device = :device) "
    "AND (:driver IS NULL OR driver_digest = :driver) "
    "AND (:key_version IS NULL OR key_version = :key_version) "
    "ORDER BY id"
)


def _raw(connection: apsw.Connection, rowid: int) -> RawEntry | None:
    """The entry with its decoded bytes if it is sound, else None (damaged, unreadable,
    or compressed without zstandard installed)."""
    try:
        raw = _rows.raw_entry(connection, rowid)
    except _codec.Unavailable:
        log.warning(
            "vyre-sqlcache: entry %d is zstd-compressed and the zstandard package is not "
            "installed: skipped (pip install 'vyre-sqlcache[zstd]')",
            rowid,
        )
        return None
    except apsw.Error as error:
        log.warning("vyre-sqlcache: entry %d cannot be read: %s", rowid, error)
        return None
    if raw is None or not raw.sound():
        return None
    return raw


# -- bundle -----------------------------------------------------------------------------


def bundle_into(source: apsw.Connection, target_path: Path, wanted: BundleFilter) -> BundleReport:
    """Write the sound entries of `source` that match into a new layer file at
    `target_path` (which must not exist; removed again if this raises)."""
    target = connect(target_path, mmap=False)
    try:
        target.pragma("page_size", PAGE_SIZE)
        # Built in one transaction with no journal: a failed bundle deletes the file.
        target.pragma("journal_mode", "off")
        target.execute("BEGIN")
        for migration in migrations():
            target.execute(migration.sql)
            target.execute(f"PRAGMA user_version = {migration.version:d}")
        copied = skipped = blob_bytes = 0
        dictionaries: set[int] = set()
        with transaction(source, "DEFERRED"):
            ids = [
                int(row[0])
                for row in source.execute(
                    _FILTERED_IDS,
                    {
                        "backend": wanted.backend,
                        "vendor": wanted.vendor,
                        "device": wanted.device,
                        "driver": wanted.driver_digest,
                        "key_version": wanted.key_version,
                    },
                )
            ]
            for rowid in ids:
                raw = _raw(source, rowid)
                if raw is None or raw.blob is None:
                    skipped += 1
                    continue
                dict_id = raw.blob[5]
                if dict_id is not None and dict_id not in dictionaries:
                    _copy_dictionary(source, target, int(dict_id))
                    dictionaries.add(int(dict_id))
                _rows.insert_raw(target, RawEntry(raw.entry, raw.blob, raw.blob_size))
                copied += 1
                blob_bytes += raw.blob_size
        _rows.store_setting(target, LAYER_SETTING, 1)
        target.execute("COMMIT")
        vacuum(target)
        # Rollback-journal mode: a reader of the layer needs no -wal or -shm beside it.
        target.pragma("journal_mode", "delete")
    finally:
        target.close()
    with open(target_path, "rb+") as written:
        os.fsync(written.fileno())
    return BundleReport(
        target_path, copied, skipped, len(dictionaries), blob_bytes, target_path.stat().st_size
    )


# -- copy -------------------------------------------------------------------------------


def copy_into(source: apsw.Connection, target_path: Path) -> CopyReport:
    """Write one snapshot of `source`'s file into a new file at `target_path` (which must
    not exist; the caller removes it if this raises), synced."""
    vacuum(source, into=target_path)
    with open(target_path, "rb+") as written:
        os.fsync(written.fileno())
    target = connect(target_path, readonly=True, query_only=True, mmap=False)
    try:
        entries = _rows.totals_value(target, "entries")
        blob_bytes = _rows.totals_value(target, "blob_bytes")
    finally:
        target.close()
    return CopyReport(target_path, entries, blob_bytes, target_path.stat().st_size)


def _copy_dictionary(source: apsw.Connection, target: apsw.Connection, dict_id: int) -> None:
    """Copy one dictionary, its id kept (its checksum covers the id)."""
    rows = source.execute("SELECT * FROM dictionaries WHERE id = ?", (dict_id,)).fetchall()
    for row in rows:
        marks = ", ".join("?" * len(row))
        target.execute(f"INSERT INTO dictionaries VALUES ({marks})", row)


def install(temporary: Path, out: Path) -> None:
    """Rename the finished file into place and sync its folder."""
    os.replace(temporary, out)
    with suppress(OSError):
        folder = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def discard(temporary: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with suppress(OSError):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)


# -- merge ------------------------------------------------------------------------------


@contextmanager
def source(path: Path) -> Iterator[apsw.Connection]:
    """A read-only connection to a cache file to merge from; never writes it (no
    migration, no checkpoint on close). Raises CacheError types naming the file."""
    if not path.exists():
        raise CacheError(f"{path} does not exist; give the path of a cache file to merge from")
    file = CacheFile.locate(path, create=False)
    head = read_head(file.path)
    if is_not_sqlite(head) or header_damage(head) is not None:
        raise CacheError(f"{file.path} is not a readable cache (not a SQLite database, or damaged)")
    # A source no process has open (no -wal or -shm beside it) is read immutable: no
    # -shm is created and no lock taken, so the folder is left exactly as it was. Bytes
    # changed under such a read fail their checksum or SQLite's checks: skipped, never
    # admitted.
    immutable = file.immutable or not has_side_files(file.path)
    try:
        connection = connect(
            file.path, readonly=True, query_only=True, immutable=immutable, mmap=False
        )
    except apsw.Error as error:
        raise CacheError(f"cannot open {file.path} to merge from it: {error}") from error
    try:
        connection.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        with transaction(connection, "DEFERRED"):
            try:
                version = _checked_version(connection, str(file.path))
            except SchemaTooNewError:
                raise SchemaTooNewError(
                    f"{file.path} was written by a newer vyre-sqlcache (schema version "
                    f"{schema_version(connection)}; merge reads versions {OLDEST_READABLE} "
                    f"to {latest_version()}): merge with that version, or upgrade this one "
                    "(the file was not modified)"
                ) from None
        if not readable(version):
            raise CacheError(
                f"{file.path} has schema version {version}; merge reads versions "
                f"{OLDEST_READABLE} to {latest_version()}: open it once with this "
                f"vyre-sqlcache to upgrade it (e.g. `vyre-sqlcache --path {file.path} "
                "compact`), then merge"
            )
        yield connection
    except apsw.Error as error:
        raise CacheError(f"reading {file.path} to merge from it failed: {error}") from error
    finally:
        with suppress(apsw.Error):
            connection.close()


def _new_entry(raw: RawEntry) -> NewEntry | None:
    """The entry as a write would make it, or None if its key columns are not valid."""
    (
        _id,
        entry_key,
        key_version,
        shader,
        layout,
        push,
        wx,
        wy,
        wz,
        flags,
        backend,
        vendor,
        device,
        driver,
        program,
        _size,
        created,
        _accessed,
        _hits,
        _stored,
        namespace,
        name,
    ) = raw.entry
    assert raw.decoded is not None
    named = None
    if namespace is not None or name is not None:
        # A named entry's key is the hash of its name: one that is not is not admitted.
        try:
            if named_entry_key(namespace, name) != entry_key:
                return None
        except (TypeError, ValueError):
            return None
        named = (namespace, name)
    try:
        key = (
            None
            if key_version is None
            else PipelineCacheKey(
                shader, layout, push, (wx, wy, wz), FeatureFlags(flags), backend, key_version
            )
        )
        fingerprint = None if vendor is None else DeviceFingerprint(vendor, device, driver)
    except (TypeError, ValueError):
        return None
    digest = None if program is None else bytes(program)
    return NewEntry(
        bytes(entry_key), key, fingerprint, digest, raw.decoded, int(created), named=named
    )


def sound_entry(connection: apsw.Connection, rowid: int) -> NewEntry | None:
    """The entry of row `rowid` as a write would make it, its bytes verified; None if
    it is missing, damaged or unreadable."""
    raw = _raw(connection, rowid)
    return None if raw is None else _new_entry(raw)


def merge_from(
    source: apsw.Connection,
    target: apsw.Connection,
    cap: int | None,
    codec: Codec | None,
    now_ms: int,
    report: MergeReport,
) -> int:
    """Admit the sound entries of `source` into `target` (inside the caller's write
    transaction): newest `created_ms` wins, a tie keeps the target's. Returns how many
    entries were admitted; counts into `report`."""
    admitted = 0
    group: list[NewEntry] = []
    group_bytes = 0
    limit = MERGE_GROUP_BYTES if cap is None else max(1, min(MERGE_GROUP_BYTES, cap // 4))

    def admit() -> None:
        nonlocal group, group_bytes, admitted
        if group:
            report.evicted += _rows.insert(target, group, now_ms, cap, codec)
            admitted += len(group)
        group, group_bytes = [], 0

    with transaction(source, "DEFERRED"):
        ids, _complete = _rows.readable_ids(source)
        for rowid in ids:
            stop_if_interrupted()  # (a source may take seconds: nothing of it stays)
            raw = _raw(source, rowid)
            entry = None if raw is None else _new_entry(raw)
            if entry is None:
                report.skipped_bad += 1
                continue
            if cap is not None and len(entry.blob) > cap:
                report.too_large += 1
                continue
            existing = _created(target, entry)
            if existing is not None and existing >= (entry.created_ms or 0):
                report.kept_existing += 1
                continue
            if existing is None:
                report.added += 1
            else:
                report.replaced += 1
            group.append(entry)
            group_bytes += len(entry.blob)
            if group_bytes >= limit or len(group) >= MERGE_GROUP_ENTRIES:
                admit()
        admit()
    return admitted


def _created(target: apsw.Connection, entry: NewEntry) -> int | None:
    row: Any = target.execute(
        f"SELECT created_ms FROM entries WHERE id = ? AND entry_key = ? AND {_LIVE}",
        (entry.rowid, entry.entry_key),
    ).fetchone()
    return None if row is None else int(row[0])
