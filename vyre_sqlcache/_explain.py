"""Why did this miss? `explain`, `explain_program`, `explain_entry` and the miss log.

`CacheExplain` is a part of `PipelineCache` kept in its own module, as
`CacheMaintenance` is. An explanation looks, in order, at this process's queue, the
entry's row (its checksum verified, without counting a hit), the read-only layers
(`_explain_layers`), the departure record (evicted, invalidated, deleted, damaged),
and last the nearest live entries of the same shader or program, ranked by how many
key fields differ. The statements are in `_explain_sql`.

The miss log: with `log_misses`, each miss of `get`, `get_many` and `read` adds a row
to a bounded buffer in memory (a hit never looks at it); the buffer reaches the file
with the access bookkeeping (see `_bookkeeping`): inside the next write transaction,
or on its own once it holds `MISS_WRITE_AT` rows or `TOUCH_INTERVAL_S` have passed.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import apsw

from . import _explain_sql, _rows
from ._bookkeeping import TOUCH_INTERVAL_S
from ._checks import check_fingerprint, check_key
from ._connections import READ_ERRORS, ConnectionPool, Slot, transaction, translate
from ._writer import WriteBehind
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey, coerce_digest

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = [
    "FIELD_REASONS",
    "MISS_BUFFER",
    "MISS_WRITE_AT",
    "NEAREST",
    "REASONS",
    "CacheExplain",
    "Departure",
    "Difference",
    "Explanation",
    "Miss",
    "MissLog",
    "Nearest",
]

T = TypeVar("T")

#: Every `Explanation.reason`.
REASONS: Final[tuple[str, ...]] = (
    "hit",
    "evicted",
    "invalidated",
    "deleted",
    "damaged",
    "other driver",
    "other device",
    "other key version",
    "other layout",
    "other push-constant size",
    "other workgroup",
    "other feature flags",
    "other backend",
    "never seen",
)
#: The reason a nearest entry's differing field gives, in the order that decides which
#: of several differences is the reason (a device explains a driver, and so on).
FIELD_REASONS: Final[dict[str, str]] = {
    "device": "other device",
    "driver": "other driver",
    "key_version": "other key version",
    "backend": "other backend",
    "layout": "other layout",
    "push_constant_size": "other push-constant size",
    "workgroup": "other workgroup",
    "feature_flags": "other feature flags",
}
#: How many nearest entries an explanation lists.
NEAREST = 5
#: Misses the buffer of one cache object holds; beyond it the oldest are dropped.
MISS_BUFFER = 2048
#: Buffered misses that make a miss write the buffer (if the write lock is free at once).
MISS_WRITE_AT = 512


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC, as the views show times."""
    when = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def _short(digest: bytes | None) -> str:
    return "none" if digest is None else digest.hex()[:12]


def _flags(bits: int | None) -> str:
    if bits is None:
        return "none"
    names = [m.name for m in FeatureFlags if m.name and bits & m.value]
    unknown = bits & ~sum(m.value for m in FeatureFlags)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "none"


def _device(vendor: int | None, device: int | None) -> str:
    if vendor is None or device is None:
        return "none"
    return f"{vendor:#06x}:{device:#06x}"


def _workgroup(row: Mapping[str, Any]) -> str:
    if row.get("workgroup_x") is None:
        return "none"
    return f"{row['workgroup_x']}x{row['workgroup_y']}x{row['workgroup_z']}"


#: Field name -> how to show it from a row of key columns, and whether two rows differ.
_FIELDS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "device": lambda r: _device(r.get("vendor"), r.get("device")),
    "driver": lambda r: _short(r.get("driver_digest")),
    "key_version": lambda r: "none" if r.get("key_version") is None else str(r["key_version"]),
    "backend": lambda r: str(r.get("backend") or "none"),
    "layout": lambda r: _short(r.get("layout_hash")),
    "push_constant_size": lambda r: (
        "none" if r.get("push_constant_size") is None else str(r["push_constant_size"])
    ),
    "workgroup": _workgroup,
    "feature_flags": lambda r: _flags(r.get("feature_flags")),
}
_FIELD_COLUMNS: dict[str, tuple[str, ...]] = {
    "device": ("vendor", "device"),
    "driver": ("driver_digest",),
    "key_version": ("key_version",),
    "backend": ("backend",),
    "layout": ("layout_hash",),
    "push_constant_size": ("push_constant_size",),
    "workgroup": ("workgroup_x", "workgroup_y", "workgroup_z"),
    "feature_flags": ("feature_flags",),
}


@dataclass(frozen=True, slots=True)
class Difference:
    """One key field in which a nearest entry differs from what was asked for."""

    field: str
    #: the field as the cached entry has it, and as the lookup asked for it (as text)
    cached: str
    asked: str

    def __post_init__(self) -> None:
        if self.field not in FIELD_REASONS:
            raise ValueError(f"field must be one of {', '.join(FIELD_REASONS)}, got {self.field!r}")


@dataclass(frozen=True, slots=True)
class Nearest:
    """A live entry close to what was asked for, and exactly which fields differ."""

    entry_key: str
    differences: tuple[Difference, ...]
    created_ms: int

    def __post_init__(self) -> None:
        coerce_digest("entry_key", self.entry_key)
        if not self.differences:
            raise ValueError("a nearest entry differs in at least one field, got none")

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the differing fields."""
        return tuple(d.field for d in self.differences)


@dataclass(frozen=True, slots=True)
class Departure:
    """A row of the departure record: an entry that left the cache, and why."""

    entry_key: str
    reason: str
    at_ms: int

    def __post_init__(self) -> None:
        coerce_digest("entry_key", self.entry_key)
        if self.reason not in _explain_sql.DEPARTURE_REASONS:
            raise ValueError(
                f"reason must be one of {', '.join(_explain_sql.DEPARTURE_REASONS)}, "
                f"got {self.reason!r}"
            )

    @property
    def at(self) -> str:
        """When it left, ISO-8601 UTC."""
        return iso_ms(self.at_ms)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a lookup hits or misses: `reason` (one of `REASONS`), a one-line `summary`,
    `where` a hit is served from ('file', 'queue' or 'layer <path>'), the nearest live
    entries with the fields they differ in, and the departure record's row, if any."""

    entry_key: str
    outcome: str
    reason: str
    summary: str
    where: str | None = None
    nearest: tuple[Nearest, ...] = ()
    departure: Departure | None = None

    def __post_init__(self) -> None:
        coerce_digest("entry_key", self.entry_key)
        if self.outcome not in ("hit", "miss"):
            raise ValueError(f"outcome must be 'hit' or 'miss', got {self.outcome!r}")
        if self.reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}, got {self.reason!r}")
        if (self.outcome == "hit") != (self.reason == "hit"):
            raise ValueError(f"outcome {self.outcome!r} does not go with reason {self.reason!r}")
        if (self.where is not None) != (self.outcome == "hit"):
            raise ValueError("where is given exactly for a hit")

    def as_dict(self) -> dict[str, Any]:
        """The explanation as plain data (for JSON)."""
        return {
            "entry_key": self.entry_key,
            "outcome": self.outcome,
            "reason": self.reason,
            "summary": self.summary,
            "where": self.where,
            "departure": None
            if self.departure is None
            else {"reason": self.departure.reason, "at": self.departure.at},
            "nearest": [
                {
                    "entry_key": n.entry_key,
                    "created": iso_ms(n.created_ms),
                    "differences": {
                        d.field: {"cached": d.cached, "asked": d.asked} for d in n.differences
                    },
                }
                for n in self.nearest
            ],
        }


@dataclass(frozen=True, slots=True)
class Miss:
    """A row of the miss log, explained as the cache stood when it missed (entries
    written since are left out)."""

    at_ms: int
    call: str
    entry_key: str
    pid: int
    explanation: Explanation

    def __post_init__(self) -> None:
        if self.call not in _explain_sql.MISS_CALLS:
            raise ValueError(
                f"call must be one of {', '.join(_explain_sql.MISS_CALLS)}, got {self.call!r}"
            )

    @property
    def at(self) -> str:
        """When it missed, ISO-8601 UTC."""
        return iso_ms(self.at_ms)


# -- the miss log's buffer -------------------------------------------------------------


class MissLog:
    """The misses of one cache object not yet written to the file (at most
    `MISS_BUFFER`, oldest dropped first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=MISS_BUFFER)
        self._pid = os.getpid()
        self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        _logs.add(self)

    def __len__(self) -> int:
        return len(self._rows)

    def record(
        self,
        call: str,
        entry_key: bytes,
        fingerprint: DeviceFingerprint,
        key: PipelineCacheKey | None = None,
        program_digest: bytes | None = None,
    ) -> bool:
        """Buffer one miss; return whether the buffer is due to be written."""
        columns: tuple[Any, ...] = (
            (None,) * 9
            if key is None
            else (
                key.version,
                key.shader_hash,
                key.bind_group_layout_hash,
                key.push_constant_size,
                *key.workgroup_size,
                int(key.feature_flags),
                key.backend,
            )
        )
        row = (
            time.time_ns() // 1_000_000,
            call,
            entry_key,
            self._pid,
            *columns,
            fingerprint.vendor,
            fingerprint.device,
            fingerprint.driver_digest,
            program_digest,
        )
        with self._lock:
            self._rows.append(row)
            return len(self._rows) >= MISS_WRITE_AT or time.monotonic() >= self._next_write

    def write(self, connection: apsw.Connection) -> None:
        """Write the buffer inside the caller's transaction; if that fails, the rows stay
        buffered for the next try."""
        with self._lock:
            rows = list(self._rows)
            self._rows.clear()
            self._next_write = time.monotonic() + TOUCH_INTERVAL_S
        if not rows:
            return
        try:
            _explain_sql.record_misses(connection, rows)
        except BaseException:
            with self._lock:
                # Back in front of what was missed meanwhile, as far as there is room: the
                # oldest are the ones dropped (a full deque drops from the far end).
                room = MISS_BUFFER - len(self._rows)
                if room > 0:
                    self._rows.extendleft(reversed(rows[-room:]))
            raise

    def _after_fork_in_child(self) -> None:
        # The parent writes what it buffered; the child's misses are its own.
        self._lock = threading.Lock()
        self._rows.clear()
        self._pid = os.getpid()


_logs: weakref.WeakSet[MissLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_logs):
        log._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- explaining -------------------------------------------------------------------------


def _asked_row(
    entry_key: bytes,
    fingerprint: DeviceFingerprint | None,
    key: PipelineCacheKey | None,
    program_digest: bytes | None,
) -> dict[str, Any]:
    """What a lookup asked for, as a row of key columns."""
    row: dict[str, Any] = {"entry_key": entry_key, "program_digest": program_digest}
    if fingerprint is not None:
        row.update(
            vendor=fingerprint.vendor,
            device=fingerprint.device,
            driver_digest=fingerprint.driver_digest,
        )
    if key is not None:
        x, y, z = key.workgroup_size
        row.update(
            key_version=key.version,
            shader_hash=key.shader_hash,
            layout_hash=key.bind_group_layout_hash,
            push_constant_size=key.push_constant_size,
            workgroup_x=x,
            workgroup_y=y,
            workgroup_z=z,
            feature_flags=int(key.feature_flags),
            backend=key.backend,
        )
    return row


def _differences(
    asked: Mapping[str, Any], cached: Mapping[str, Any], fields: Iterable[str]
) -> tuple[Difference, ...]:
    return tuple(
        Difference(name, _FIELDS[name](cached), _FIELDS[name](asked))
        for name in fields
        if any(asked.get(c) != cached.get(c) for c in _FIELD_COLUMNS[name])
    )


_PROGRAM_FIELDS = ("device", "driver")


def _nearest(
    connection: apsw.Connection, asked: dict[str, Any], before_ms: int | None
) -> tuple[tuple[Nearest, ...], dict[str, Any] | None]:
    """The nearest live entries, and the row of the first: of the same shader for a keyed
    lookup, of the same program for a lookup by program digest; none where neither is
    known."""
    if asked.get("shader_hash") is not None:
        rows = _explain_sql.nearest_by_shader(connection, asked, before_ms, NEAREST)
        fields: Iterable[str] = FIELD_REASONS
    elif asked.get("program_digest") is not None and asked.get("vendor") is not None:
        rows = _explain_sql.nearest_by_program(connection, asked, before_ms, NEAREST)
        fields = _PROGRAM_FIELDS
    else:
        return (), None
    found: list[Nearest] = []
    first = None
    seen: set[bytes] = set()
    for row in rows:
        differences = _differences(asked, row, fields)
        # An entry that left after the miss and was written again is listed once.
        if differences and bytes(row["entry_key"]) not in seen:
            seen.add(bytes(row["entry_key"]))
            hexkey = bytes(row["entry_key"]).hex()
            found.append(Nearest(hexkey, differences, int(row["created_ms"])))
            first = row if first is None else first
    return tuple(found), first


def _field_reason(nearest: Nearest) -> str:
    """The reason the nearest entry's differences give: the first in `FIELD_REASONS`."""
    fields = nearest.fields
    return next(reason for name, reason in FIELD_REASONS.items() if name in fields)


def _summary_of_difference(
    connection: apsw.Connection,
    reason: str,
    asked: Mapping[str, Any],
    nearest: Nearest,
    row: Mapping[str, Any],
    before_ms: int | None,
) -> str:
    by_field = {d.field: d for d in nearest.differences}
    others = [d.field for d in nearest.differences if FIELD_REASONS[d.field] != reason]
    also = f" (it also differs in {', '.join(others)})" if others else ""
    if reason == "other driver":
        d = by_field["driver"]
        cached = _explain_sql.same_device_count(
            connection, asked["vendor"], asked["device"], row["driver_digest"], before_ms
        )
        return (
            f"a driver update: {cached} {'pipeline' if cached == 1 else 'pipelines'} of this "
            f"device {'was' if cached == 1 else 'were'} compiled for driver "
            f"{d.cached}, you run {d.asked}{also}"
        )
    if reason == "other device":
        d = by_field["device"]
        return f"cached for another device: {d.cached}, you run {d.asked}{also}"
    if reason == "other key version":
        d = by_field["key_version"]
        return f"another key version: cached with version {d.cached}, you ask for {d.asked}{also}"
    names = {
        "other backend": ("backend", "another backend"),
        "other layout": ("layout", "another bind group layout"),
        "other push-constant size": ("push_constant_size", "another push-constant size"),
        "other workgroup": ("workgroup", "another workgroup size"),
        "other feature flags": ("feature_flags", "other feature flags"),
    }
    field, words = names[reason]
    d = by_field[field]
    return f"{words}: cached {d.cached}, you ask for {d.asked}{also}"


_IN_FILE = "a hit: the entry is in the cache file"
_IN_LAYER = "a hit: served by the read-only layer "
_DEPARTED = {
    "evicted": "evicted at {at} to keep the cache under its size cap (or a full disk): "
    "the least recently used entries made room for newer ones",
    "invalidated": "invalidated at {at} (invalidate_impacted)",
    "deleted": "deleted at {at} (delete, delete_entries, or the command line's rm/invalidate)",
    "damaged": "damaged and dropped at {at}: its bytes failed their checksum",
}


def explain_row(
    connection: apsw.Connection,
    asked: dict[str, Any],
    *,
    before_ms: int | None,
    verify: Callable[[], bool | None],
    layer: Callable[[], tuple[Path, bool] | None],
    known: bool = True,
) -> Explanation:
    """Explain a lookup of `asked` (a row of key columns with its `entry_key`), as the
    cache stands now, or as it stood at `before_ms` (entries created since then are left
    out). `verify()` says whether the entry's bytes hold their checksum (None: no row);
    `layer()` which read-only layer holds it, and whether an invalidation in the user's
    file hides it there. `known`: whether the key fields were given."""
    entry_key: bytes = asked["entry_key"]
    hexkey = entry_key.hex()
    state = _explain_sql.entry_state(connection, entry_key)
    if state is not None and before_ms is not None and state["created_ms"] >= before_ms:
        state = None  # written after the miss
    if state is not None and not state["tombstoned"]:
        sound = verify()
        if sound:
            return Explanation(hexkey, "hit", "hit", _IN_FILE, "file")
        if sound is False:
            return Explanation(
                hexkey,
                "miss",
                "damaged",
                "damaged: its bytes fail their checksum, so the next read drops it "
                "(it will be recompiled)",
            )
    hidden_in: Path | None = None
    if before_ms is None:
        found = layer()
        if found is not None and not found[1]:
            path = found[0]
            return Explanation(hexkey, "hit", "hit", f"{_IN_LAYER}{path}", f"layer {path}")
        hidden_in = None if found is None else found[0]
    row = _explain_sql.departure(connection, entry_key, before_ms)
    departed = None if row is None else Departure(hexkey, str(row["reason"]), int(row["at_ms"]))
    if not known and row is not None:
        asked = {**row, "entry_key": entry_key}  # the departed entry's own fields
    nearest, first = _nearest(connection, asked, before_ms)
    if state is not None and state["tombstoned"]:
        reason = "invalidated" if departed is None else departed.reason
        when = "" if departed is None else f" at {departed.at}"
        summary = (
            f"{reason}{when}; its row is purged soon"
            if departed is None
            else _DEPARTED[reason].format(at=departed.at)
        )
        return Explanation(hexkey, "miss", reason, summary, None, nearest, departed)
    if departed is not None:
        summary = _DEPARTED[departed.reason].format(at=departed.at)
        return Explanation(hexkey, "miss", departed.reason, summary, None, nearest, departed)
    if hidden_in is not None:
        summary = (
            f"invalidated: the read-only layer {hidden_in} holds it, and an invalidation "
            "or delete in this cache hides it there until a new entry is written"
        )
        return Explanation(hexkey, "miss", "invalidated", summary, None, nearest)
    if nearest and first is not None:
        reason = _field_reason(nearest[0])
        summary = _summary_of_difference(connection, reason, asked, nearest[0], first, before_ms)
        return Explanation(hexkey, "miss", reason, summary, None, nearest)
    # What the record keeps under this file's cap (64 rows under 512 KiB), not its most.
    kept = f"{_explain_sql.kept_rows(connection, _explain_sql.KEPT_DEPARTURES):,}"
    if not known:
        summary = (
            "never seen: no entry, and no departure among the newest "
            f"{kept}; give the key fields to look for entries of the same shader"
        )
    elif asked.get("shader_hash") is not None:
        summary = (
            "never seen: no entry of this shader, and no departure of this key among "
            f"the newest {kept}"
        )
    else:
        summary = (
            "never seen: no entry of this program on any device, and no departure of this "
            f"key among the newest {kept}"
        )
    return Explanation(hexkey, "miss", "never seen", summary)


def _asked_from_log(row: Mapping[str, Any]) -> dict[str, Any]:
    asked = dict(row)
    asked["entry_key"] = bytes(row["entry_key"])
    return asked


# -- the public methods -------------------------------------------------------------------


class CacheExplain:
    """The explain and miss-log methods of `PipelineCache` (see there)."""

    if TYPE_CHECKING:
        _path: Path
        _readonly: bool
        _pool: ConnectionPool
        _writer: WriteBehind
        _miss_log: MissLog | None

        def _before_inspection(self) -> None: ...

        def _call(self) -> AbstractContextManager[Slot]: ...

        def _fetch(
            self, slot: Slot, entry_key: bytes, cursor: apsw.Cursor | None = None
        ) -> _rows.Fetched | None: ...

        def _write_bookkeeping(self, connection: apsw.Connection, *, wait: bool) -> None: ...

    def explain(self, key: PipelineCacheKey, fingerprint: DeviceFingerprint) -> Explanation:
        """Why `get(key, fingerprint)` hits or misses now, without counting a hit or
        changing anything (see `Explanation`). Raises TypeError/ValueError for bad
        arguments, CacheError types if the file cannot be read."""
        key = check_key(key)
        fp = check_fingerprint(fingerprint)
        entry_key = key.entry_key(fp)
        return self._explain(_asked_row(entry_key, fp, key, None))

    def explain_program(
        self, program_digest: bytes | str, fingerprint: DeviceFingerprint
    ) -> Explanation:
        """Why `read(program_digest, fingerprint)` hits or misses now, as `explain` does.
        Raises TypeError/ValueError for bad arguments, CacheError types."""
        fp = check_fingerprint(fingerprint)
        digest = coerce_digest("program_digest", program_digest)
        return self._explain(_asked_row(fp.cache_key(digest), fp, None, digest))

    def explain_entry(self, entry_key: bytes | str) -> Explanation:
        """Why a lookup of this 32-byte (or 64-hex) entry key hits or misses now. The key
        fields are taken from the miss log or the departure record, where they are found
        (without them no nearest entries can be looked up). Raises TypeError/ValueError
        for a malformed key, CacheError types."""
        key = coerce_digest("entry_key", entry_key)
        return self._explain({"entry_key": key}, known=False)

    def misses(self, *, limit: int = 100) -> list[Miss]:
        """The newest `limit` misses of the miss log (every process's; see
        `open(log_misses=...)`), newest first, each explained as the cache stood when it
        missed. This object's buffered misses are written first. Raises
        TypeError/ValueError for a bad limit, CacheError types."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, got {type(limit).__name__}")
        if not 1 <= limit <= _explain_sql.KEPT_MISSES:
            raise ValueError(
                f"limit must be from 1 to {_explain_sql.KEPT_MISSES} (the misses the log "
                f"keeps), got {limit}"
            )
        self._before_inspection()
        with self._call() as slot:
            connection = self._pool.main(slot)
            self._write_miss_log(connection)
            try:
                with transaction(connection, "DEFERRED"):
                    rows = _explain_sql.recent_misses(connection, limit)
                    return [
                        Miss(
                            int(row["at_ms"]),
                            str(row["call"]),
                            bytes(row["entry_key"]).hex(),
                            int(row["pid"]),
                            self._explain_on(
                                slot, connection, _asked_from_log(row), int(row["at_ms"])
                            ),
                        )
                        for row in rows
                    ]
            except READ_ERRORS as error:
                raise translate(error, "reading the miss log", self._path) from error

    def _write_miss_log(self, connection: apsw.Connection) -> None:
        """Write this object's buffered misses (with the rest of the bookkeeping)."""
        if self._miss_log is not None and len(self._miss_log) and not self._readonly:
            self._write_bookkeeping(connection, wait=True)

    def _explain_layers(self, entry_key: bytes, cursor: apsw.Cursor) -> tuple[Path, bool] | None:
        """The first read-only layer holding `entry_key`, and whether the user's masks
        hide it there, or None (`cursor`: on the user's file, for its masks).
        `PipelineCache` has layers."""
        return None

    def _explain(self, asked: dict[str, Any], *, known: bool = True) -> Explanation:
        entry_key: bytes = asked["entry_key"]
        if self._writer.get(entry_key) is not None:
            return Explanation(
                entry_key.hex(),
                "hit",
                "hit",
                "a hit: written by this process and queued, committed within milliseconds",
                "queue",
            )
        self._before_inspection()
        with self._call() as slot:
            connection = self._pool.main(slot)
            if not known:
                self._write_miss_log(connection)
            try:
                with transaction(connection, "DEFERRED"):
                    if not known:
                        logged = _explain_sql.miss_for(connection, entry_key)
                        if logged is not None:
                            asked, known = _asked_from_log(logged), True
                    return self._explain_on(slot, connection, asked, None, known=known)
            except READ_ERRORS as error:
                raise translate(error, "explaining a lookup", self._path) from error

    def _explain_on(
        self,
        slot: Slot,
        connection: apsw.Connection,
        asked: dict[str, Any],
        before_ms: int | None,
        *,
        known: bool = True,
    ) -> Explanation:
        entry_key: bytes = asked["entry_key"]

        def verify() -> bool | None:
            fetched = self._fetch(slot, entry_key, connection.cursor())
            return None if fetched is None else _rows.verify(entry_key, fetched)

        return explain_row(
            connection,
            asked,
            before_ms=before_ms,
            verify=verify,
            layer=lambda: self._explain_layers(entry_key, connection.cursor()),
            known=known,
        )

    def _missed(
        self,
        call: str,
        entry_key: bytes,
        fingerprint: DeviceFingerprint,
        key: PipelineCacheKey | None = None,
        program_digest: bytes | None = None,
    ) -> None:
        """Log a miss (the miss log is on); write the buffer if it is due and the write
        lock is free at once."""
        log = self._miss_log
        assert log is not None
        if log.record(call, entry_key, fingerprint, key, program_digest) and not self._readonly:
            with self._call() as slot:
                self._write_bookkeeping(self._pool.main(slot), wait=False)
