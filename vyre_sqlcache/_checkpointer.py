"""Checkpoints in a background thread, so that no write waits for one; a filling disk.

In WAL mode every commit appends to the write-ahead log; a checkpoint copies the
log back into the database file and syncs it. SQLite's automatic checkpoint runs
inside whichever commit crosses the threshold, so one unlucky write pays for
copying everyone's megabytes. Cache connections turn that off, and each cache
object that writes keeps one thread that runs a PASSIVE checkpoint (it never
waits for, nor blocks, readers and writers) once a commit leaves more than
`WAL_CHECKPOINT_PAGES` pages in the log. SQLite's WAL hook reports that count
after every commit; the log file's size would not do, since SQLite reuses a
grown log from its start without shrinking it.

Starting the log over. SQLite reuses the log from its start only for a writer that
begins when every page of it is copied and no reader is in it. A PASSIVE checkpoint
running beside writes that never pause always leaves the pages committed meanwhile, so
the log would grow for ever (about 10,000 pages, 180 MB, for 6 MB of entries in 1,500
durable writes), and each commit would append to it, which costs more to sync than
writing over old pages. So the thread copies with PASSIVE passes until fewer than
`caught_up_pages()` were committed during one (at most `CATCH_UP_PASSES` of them), then
holds the cache object's own commits back for a moment and copies those with a RESTART
checkpoint (if more than `caught_up_pages()` were committed between that copy and the
hold, a bulk install's next group say, it lets go and copies them first, up to
`RESTART_TRIES` times), which waits up to `RESTART_WAIT_S` for readers (held snapshots end within
`_snapshots.HOLD_S`) and for another process's writer; the next commit starts the log
over. That is for streams of small commits (`SMALL_COMMIT_PAGES`), where the log holds
many pages for each entry written (7 for a durable write of 4 KiB) and every sync pays
for its growth; a stream of large commits (groups of queued writes, large blobs) is
mostly its own data in the log, and holding it back costs as long as copying what it
wrote (a stream of 1 MiB blobs went 50 % slower, each RESTART's sync of the database
taking 75-140 ms beside it); it is held back only once the log holds `LOG_BOUND_FACTOR`
times the threshold, since it never pauses for a copy to catch up (groups of queued
writes back to back grew the log by 230 MiB a second). SQLite starts the log over at
the first write after the RESTART, and only if nobody reads the log then: left to
whichever writer comes next (another process's, say), that often failed, so the
RESTART is followed at once by a commit of its own (`_rows.count_log_restart`). A
RESTART that could not finish is tried again once the log has grown by another
`WAL_CHECKPOINT_PAGES`.

A filling disk. A log checkpointed only at 16 MiB fills a small disk by itself,
and a database that has taken the last free byte cannot even be checkpointed:
the log's new pages have nowhere to go, and the eviction that would free pages
must first append to the log. So while the file system has less than
`LOW_SPACE_BYTES` free (looked up with statvfs at most every `SPACE_REFRESH_S`,
or sooner once the log has grown by an eighth of what was free), each writing
connection
- checkpoints once the log holds a quarter of the free space (in pages), not 16 MiB;
- has its log file cut back to that size whenever SQLite restarts the log
  (`journal_size_limit`), so an old, long log does not keep the space;
- may grow the database only while `reserve` bytes stay free (`max_page_count`):
  past that SQLite answers SQLITE_FULL, the cache evicts into the pages it frees,
  and the reserve is the room the eviction, the checkpoint and the truncation
  need. A disk that other programs fill is met the same way: the cache stops
  growing and reuses its own free pages. The largest file the process may write
  (RLIMIT_FSIZE) counts as the disk's size, and the room below it as free space.

The eviction after SQLITE_FULL (`FullDiskEviction`) counts bytes as stored, what the
disk holds (blobs are often compressed 8x), never the sizes the callers wrote: in
transactions of about `FULL_DISK_STEP_ENTRIES` entries, as many as it takes to free the
incoming bytes and a quarter of the stored blobs.

The purge. The same thread deletes tombstoned entries (see migration 0004) after an
invalidation or delete wakes it, in transactions of `_rows.PURGE_BATCH` entries, so the
write lock is never held for long; a purge that fails is retried after `PURGE_RETRY_S`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import apsw

from . import _rows, _wakeup
from ._cachefile import largest_file, os_name
from ._connections import waiter_of

__all__ = [
    "CATCH_UP_PASSES",
    "FULL_DISK_EVICTION_S",
    "FULL_DISK_STEP_ENTRIES",
    "LOW_SPACE_BYTES",
    "RESTART_TRIES",
    "RESTART_WAIT_S",
    "SMALL_COMMIT_PAGES",
    "SPACE_REFRESH_S",
    "WAL_CHECKPOINT_PAGES",
    "Checkpointer",
    "DiskSpace",
    "FullDiskEviction",
    "caught_up_pages",
    "compact_shortfall",
    "copy_log",
    "reserve",
    "restart_due",
    "restart_log",
]

log = logging.getLogger("vyre_sqlcache")

#: Pages in the log that wake the checkpoint thread: 16 MiB of 16 KiB pages
#: (SQLite's own automatic checkpoint runs at 1000).
WAL_CHECKPOINT_PAGES = 1024
#: Below this much free space the log is kept short and the database's growth
#: capped (4 logs of `WAL_CHECKPOINT_PAGES` 16 KiB pages).
LOW_SPACE_BYTES = 64 << 20
#: How long one statvfs look at the free space is used.
SPACE_REFRESH_S = 0.5
#: On a full disk the cache evicts in transactions of about this many entries each,
#: truncating the log after each: deleting an entry rewrites the pages its rows sit on
#: (three 16 KiB pages at worst, whatever the blob's size), and the log must fit in
#: what the disk has left.
FULL_DISK_STEP_ENTRIES = 8
#: Once the incoming bytes are freed, a full-disk eviction stops after this long, even
#: short of its quarter of the blobs: the write that met the full disk waits for it.
FULL_DISK_EVICTION_S = 1.0
#: After a failed purge (the file busy, a full disk), the thread tries again this much later.
PURGE_RETRY_S = 1.0
#: How long the RESTART after a checkpoint waits for readers and another process's writer
#: (this object's commits wait as long at most).
RESTART_WAIT_S = 0.030
#: PASSIVE passes a checkpoint makes at most to catch up with writes going on beside it.
CATCH_UP_PASSES = 4
#: The log is started over only where this object's commits since it last did averaged at
#: most this many pages: a durable write of 4 KiB commits 7, a group of queued writes
#: 100-600, a 1 MiB blob 70.
SMALL_COMMIT_PAGES = 32
#: The fewest pages a short log is checkpointed at.
MIN_CHECKPOINT_PAGES = 4
#: Copies (without holding the writes back) of what was committed between a copy and the
#: hold for a RESTART, at most, before the RESTART copies the rest under the hold.
RESTART_TRIES = 3
#: A log this many times its checkpoint threshold is started over whatever the commits
#: (a stream of large ones is otherwise left to run: see "Starting the log over").
LOG_BOUND_FACTOR = 8
#: A log that has grown past its threshold is cut back to this many times it when it
#: starts over (under a small cap: to the threshold itself).
LOG_KEEP_FACTOR = 2
#: Under a small size cap the log is checkpointed (and kept) at a quarter of the cap,
#: but at no fewer pages than this (1 MiB): a 4 MiB cache kept a 16-33 MiB log.
MIN_CAPPED_LOG_PAGES = 64
#: The page size the thresholds are counted in (what cache files use).
_PAGE_BYTES = 16384
#: SQLite's own max_page_count: no cap.
_NO_PAGE_CAP = 4294967294


def reserve(total_bytes: int) -> int:
    """The bytes a cache leaves free on a file system of `total_bytes`: an eighth of it,
    at least 1 MiB and at most `LOW_SPACE_BYTES`."""
    return min(LOW_SPACE_BYTES, max(1 << 20, total_bytes // 8))


class FullDiskEviction:
    """What the cache evicts after SQLITE_FULL, step by step, in bytes as stored (what the
    disk holds; `entries.stored_size`, not the callers' sizes): the `incoming` bytes, and a
    quarter of the stored blobs (so that the next writes fit in the pages freed) as long as
    `FULL_DISK_EVICTION_S` allows; each step about `FULL_DISK_STEP_ENTRIES` entries."""

    def __init__(self, stored_bytes: int, entries: int, incoming: int) -> None:
        self.needed = incoming
        self.wanted = max(incoming, stored_bytes // 4)
        self.freed = 0
        self._step = max(1, stored_bytes // max(1, entries) * FULL_DISK_STEP_ENTRIES)
        self._deadline = time.monotonic() + FULL_DISK_EVICTION_S

    @classmethod
    def of(cls, connection: apsw.Connection, incoming: int) -> FullDiskEviction:
        """The plan for the cache file open on `connection`; raises apsw errors."""
        totals = _rows.totals(connection)
        # The live entries' stored bytes: the dictionaries the size cap also counts are
        # not evicted, and would make each step's share of an entry too large.
        return cls(totals.get("stored_bytes", 0), totals.get("entries", 0), incoming)

    def next_step(self) -> int:
        """The stored bytes to evict in the next transaction; 0 when done."""
        if self.freed >= self.wanted:
            return 0
        if self.freed >= self.needed and time.monotonic() > self._deadline:
            return 0
        return min(self._step, self.wanted - self.freed)

    def evict(self, connection: apsw.Connection, step: int) -> int:
        """Evict the least recently used entries holding `step` stored bytes, inside the
        caller's write transaction, and count what they freed; return how many were
        evicted. Raises apsw errors."""
        before = _rows.totals_value(connection, "stored_bytes")
        count = _rows.evict(connection, step, set())
        self.freed += before - _rows.totals_value(connection, "stored_bytes")
        return count


def compact_shortfall(connection: apsw.Connection) -> str | None:
    """Why a VACUUM of the connection's file does not fit on its disk now, or None.

    VACUUM writes every page in use to the write-ahead log before a checkpoint puts
    them in place: it needs that much free space and a margin (a quarter of the
    reserve; the log is truncated right after), or it fails only once it has filled
    the disk. Raises apsw errors.
    """
    try:
        info = os.statvfs(os.path.dirname(os_name(connection.filename)) or ".")
    except (OSError, ValueError):
        return None
    page_size = int(connection.pragma("page_size"))
    pages = int(connection.pragma("page_count")) - int(connection.pragma("freelist_count"))
    in_use = pages * (page_size + 24)  # a log frame is a page and a 24-byte header
    free = info.f_bavail * info.f_frsize
    needed = in_use + reserve(info.f_blocks * info.f_frsize) // 4
    if free >= needed:
        return None
    return (
        f"compacting rewrites the {in_use / 2**20:.1f} MiB in use through the write-ahead "
        f"log first and needs about {needed / 2**20:.1f} MiB free, but the disk has "
        f"{free / 2**20:.1f} MiB; lower the size cap (max_bytes) or free space, then compact"
    )


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """One look at the file system holding the cache."""

    free: int
    total: int
    #: Counts the looks; a connection is set up again when it changes.
    look: int

    @property
    def low(self) -> bool:
        return self.free < LOW_SPACE_BYTES

    def checkpoint_pages(self) -> int:
        """Pages in the log that call for a checkpoint: `WAL_CHECKPOINT_PAGES`, or a
        quarter of the free space when that is less."""
        pages = WAL_CHECKPOINT_PAGES
        if self.low:
            pages = max(MIN_CHECKPOINT_PAGES, min(pages, self.free // (4 * _PAGE_BYTES)))
        return pages


class _SpaceWatch:
    """Free space of the cache's file system, looked up at most every `SPACE_REFRESH_S`,
    or sooner once the log has grown by an eighth of what was free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._space: DiskSpace | None = None
        self._checked = -float("inf")
        self._looks = 0
        self._logged = 0  # log pages written since the last look
        self._last_pages = 0

    def get(
        self, filename: str, log_pages: int | None = None, *, fresh: bool = False
    ) -> DiskSpace | None:
        """The latest look (None: statvfs does not answer), after counting the pages the
        log holds now, if given; a new one if `fresh`."""
        now = time.monotonic()
        with self._lock:
            if log_pages is not None:
                grown = log_pages - self._last_pages
                self._logged += grown if grown >= 0 else log_pages
                self._last_pages = log_pages
            space = self._space
            due = (
                fresh
                or now - self._checked >= SPACE_REFRESH_S
                or (
                    space is not None and space.low and self._logged * _PAGE_BYTES * 8 >= space.free
                )
            )
            if not due:
                return space
            self._checked = now
            self._logged = 0
        try:
            info = os.statvfs(os.path.dirname(os_name(filename)) or ".")
        except (OSError, ValueError):
            looked = None
        else:
            free, total = info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize
            largest = largest_file()
            if largest is not None:
                # No file may grow past it: to the database, the room left below it is
                # free space as a disk's is (the log is kept within a part of it).
                try:
                    free = min(free, max(0, largest - os.path.getsize(os_name(filename))))
                except OSError:
                    free = min(free, largest)
                total = min(total, largest)
            with self._lock:
                self._looks += 1
                looked = DiskSpace(free=free, total=total, look=self._looks)
        with self._lock:
            self._space = looked
        return looked


def caught_up_pages() -> int:
    """Pages committed during a PASSIVE pass, at most, for the RESTART after it (which
    holds the writes back meanwhile) to copy: an eighth of the threshold, at least 64."""
    return max(64, WAL_CHECKPOINT_PAGES // 8)


def copy_log(connection: apsw.Connection) -> tuple[int, int]:
    """Copy the log into the database with PASSIVE checkpoints, which never wait for
    anyone, until the pages committed during a pass are at most `caught_up_pages()`, or
    `CATCH_UP_PASSES` were made; return the pages in the log and those committed during
    the last pass (or left uncopied by a reader). Raises apsw errors.

    A pass copies the log as it was when the pass began, and reports that log: what
    was committed during it shows as the next pass's growth."""
    pages, before = 0, -1
    for _ in range(CATCH_UP_PASSES):
        pages, copied = connection.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        if copied < pages:
            return pages, pages - copied  # a reader keeps pages in the log
        if before >= 0 and pages - before <= caught_up_pages():
            break
        before = pages
    return pages, max(0, pages - before)


def restart_due(pages: int, behind: int) -> bool:
    """Whether to hold the writes back for a RESTART after `copy_log` returned these."""
    return pages > 0 and behind <= caught_up_pages()


def restart_log(connection: apsw.Connection) -> int:
    """Copy the rest of the log with a RESTART checkpoint and start it over with a commit
    of its own; return the pages left in it (0 once done). Raises apsw errors other than
    busy: readers or a writer still there after `RESTART_WAIT_S` leave the log as it is."""
    waiter = waiter_of(connection)
    patience = None if waiter is None else waiter.timeout_ms
    if waiter is not None:
        waiter.timeout_ms = int(RESTART_WAIT_S * 1000)
    try:
        row = connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        busy, pages, _ = row[0]
        if not busy:
            # The first write after the RESTART starts the log over: this one, at once.
            _rows.count_log_restart(connection)
    finally:
        if waiter is not None and patience is not None:
            waiter.timeout_ms = patience
    return pages if busy and isinstance(pages, int) else 0


class Checkpointer:
    """Wakes a daemon thread to checkpoint when the write-ahead log has grown, and keeps
    the log and the database within the free space of a filling disk."""

    def __init__(
        self,
        copy: Callable[[], tuple[int, int]],
        restart: Callable[[Callable[[], bool]], int | None],
        purge: Callable[[], bool] | None = None,
        where: str = "the cache",
    ) -> None:
        """`copy` copies the log as `copy_log` does, returning what it returns; `restart`
        holds the writes back and, if the predicate it is given then holds, runs
        `restart_log`, returning the pages it left (None: it did not run); `purge`
        deletes one batch of tombstoned entries and returns whether any may be left; all
        raise apsw or cache errors. `where` names the cache in warnings."""
        self._where = where
        # Whether a warning said the log could not be started over (said again only once
        # it has been).
        self._held_back = False
        self._copy = copy
        self._restart = restart
        # The pages the last checkpoint left in a log it could not have started over: a
        # commit wakes the thread only past these and the threshold.
        self._left = 0
        # This object's commits since the log last started over, and its pages after the
        # last of them, as the WAL hook reported.
        self._commits = 0
        self._hook_pages = 0
        # Pages in the log that call for a checkpoint, for the size cap (`fit_cap`).
        self._log_pages = WAL_CHECKPOINT_PAGES
        self._purge = purge
        self._checkpoint_due = False
        self._purge_due = False
        self._wake = _wakeup.Wakeup()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._space = _SpaceWatch()
        # The look each writing connection was last set up for; those given caps.
        self._set_up: weakref.WeakKeyDictionary[apsw.Connection, int] = weakref.WeakKeyDictionary()
        self._capped: weakref.WeakSet[apsw.Connection] = weakref.WeakSet()
        # The journal_size_limit a small cap set on each connection (see `_fit`).
        self._limits: weakref.WeakKeyDictionary[apsw.Connection, int] = weakref.WeakKeyDictionary()

    def attach(self, connection: apsw.Connection) -> None:
        """Watch a writing connection: its commits may wake the thread, and on a filling
        disk its log and growth are capped."""
        connection.set_wal_hook(self.wal_hook)
        try:
            self._fit(connection, self._space.get(connection.filename))
        except apsw.Error as error:
            # A file SQLite cannot read yet (damaged, or not a database): opening it
            # reports that; the first commit sets the connection up.
            self._set_up.pop(connection, None)
            log.debug("vyre-sqlcache: setting up a connection: %s", error)

    def wal_hook(self, connection: apsw.Connection, database: str, pages: int) -> int:
        """SQLite's WAL hook, after every commit: wake the thread past the threshold."""
        try:
            if pages < self._hook_pages:
                self._commits = 0  # the log started over
            self._commits += 1
            self._hook_pages = pages
            space = self._space.get(connection.filename, pages)
            self._fit(connection, space)
            if space is None or not space.low:
                if pages < self._left:
                    self._left = 0  # started over since
                if pages > self._left + self._log_pages:
                    self.wake()
            elif pages > min(space.checkpoint_pages(), self._log_pages):
                # Low on space, the committing writer checkpoints (the write lock is free
                # in the hook): a thread that lags behind busy writers lets the log grow.
                connection.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except BaseException as error:
            # An error returned here would fail a statement whose commit has already
            # happened; close() checkpoints anyway, and the next commit tries again.
            log.debug("vyre-sqlcache: after a commit: %s", error)
        return apsw.SQLITE_OK

    def _fit(self, connection: apsw.Connection, space: DiskSpace | None) -> None:
        """Set the connection's log limit and page cap for the latest look at the disk."""
        look = 0 if space is None else space.look
        if self._set_up.get(connection) == look:
            return
        self._set_up[connection] = look
        if space is None or not space.low:
            if connection in self._capped:
                connection.pragma("max_page_count", _NO_PAGE_CAP)
                self._capped.discard(connection)
                self._limits.pop(connection, None)
            # SQLite's -1 never cuts a log back: one that a reader left open elsewhere
            # held for a minute (825 MB) kept its size until the cache closed.
            limit = self.log_limit_bytes()
            if self._limits.get(connection, -1) != limit:
                connection.pragma("journal_size_limit", limit)
                self._limits[connection] = limit
            return
        page_count = int(connection.pragma("page_count"))
        if page_count == 0:
            # A new file, its page size not chosen yet: set up once it has its schema.
            del self._set_up[connection]
            return
        page_size = int(connection.pragma("page_size"))
        log_pages = min(space.checkpoint_pages(), self._log_pages)
        # The log may grow to about twice its threshold before a checkpoint lets SQLite
        # restart it: that room is not the database's.
        log_room = 2 * log_pages * page_size
        room = max(0, space.free - reserve(space.total) - log_room)
        connection.pragma("max_page_count", page_count + room // page_size)
        connection.pragma("journal_size_limit", log_pages * page_size)
        self._capped.add(connection)
        self._limits.pop(connection, None)

    def ready(self, connection: apsw.Connection) -> None:
        """Before a write transaction: set the connection up if no look at the disk has
        yet (a new file's, whose first commit could otherwise take the whole disk).
        Raises apsw errors."""
        if connection not in self._set_up:
            self._fit(connection, self._space.get(connection.filename))

    def fit_cap(self, cap: int | None) -> None:
        """Keep the log in proportion to a small size cap (None: none): checkpointed, and
        cut back after, at a quarter of it (`MIN_CAPPED_LOG_PAGES` at least); from a cap of
        64 MiB up, at `WAL_CHECKPOINT_PAGES` as without one."""
        pages = WAL_CHECKPOINT_PAGES
        if cap is not None:
            pages = max(MIN_CAPPED_LOG_PAGES, min(pages, cap // (4 * _PAGE_BYTES)))
        if pages != self._log_pages:
            self._log_pages = pages
            self._set_up.clear()  # each connection's limit is set again at its next commit

    def refit(self, connection: apsw.Connection) -> bool:
        """Look at the disk again now and set the connection's limits for it; whether its
        page cap rose (room came back). After a full disk: no commit runs the WAL hook
        then, so without this the cap of the last look would refuse every commit, for
        ever, after another program had freed space. Raises apsw errors."""
        before = int(connection.pragma("max_page_count"))
        self._set_up.pop(connection, None)
        self._fit(connection, self._space.get(connection.filename, fresh=True))
        return int(connection.pragma("max_page_count")) > before

    @contextmanager
    def evicting(self, connection: apsw.Connection) -> Iterator[None]:
        """Let the database grow into part of the reserve while the cache evicts for a full
        disk: deleting rows can split an index page, and the pages it frees are seldom
        whole ones. The connection gets its cap back afterwards."""
        space = self._space.get(connection.filename)
        if connection in self._capped and space is not None:
            cap = int(connection.pragma("max_page_count"))
            headroom = reserve(space.total) // 4 // int(connection.pragma("page_size"))
            connection.pragma("max_page_count", cap + headroom)
        try:
            yield
        finally:
            self._set_up.pop(connection, None)
            self._fit(connection, space)

    def wake(self) -> None:
        """Start the thread if needed and have it checkpoint once more."""
        self._checkpoint_due = True
        self._start()

    def purge_soon(self) -> None:
        """Start the thread if needed and have it purge tombstoned entries."""
        if self._purge is None:
            return
        self._purge_due = True
        self._start()

    def start(self) -> None:
        """Start the thread now (a cache that may write starts it when it opens)."""
        self._start()

    def _start(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._wake.set()
            return
        with self._lock:
            if self._stopped:
                return
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(
                    target=self._run, name="vyre-sqlcache checkpoint", daemon=True
                )
                try:
                    _wakeup.start(thread)
                except _wakeup.CannotStart as error:
                    # The next commit past the threshold tries again; close() checkpoints.
                    _wakeup.cannot_start(
                        "the log is checkpointed at close() only (it grows meanwhile)", error
                    )
                    return
                self._thread = thread
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; it finishes a checkpoint under way."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        # (`ident` is None for a thread whose start an exception cut short: never ran.)
        if (
            thread is not None
            and thread.ident is not None
            and thread is not threading.current_thread()
        ):
            thread.join(timeout)

    def _checkpoint(self) -> int:
        """Copy the log, and have it start over where that is due; the pages left."""
        pages, behind = self._copy()
        if pages > LOG_BOUND_FACTOR * self._log_pages:
            # Large commits back to back never let a copy catch up: held back once here,
            # or the log grows as long as they last (GiB in seconds).
            left = self._restart_after(pages, tries=1)
            self._say_if_held_back(pages, left)
            return left
        if not restart_due(pages, behind) or pages > SMALL_COMMIT_PAGES * max(1, self._commits):
            return max(0, pages)
        return self._restart_after(pages)

    def _restart_after(self, pages: int, tries: int = RESTART_TRIES) -> int:
        """Hold the writes back and start the log over, the copy that saw `pages` being the
        last. What was committed after that copy is copied first without the hold (up to
        `tries` - 1 copies; the last try restarts whatever came): a bulk install's next
        group, committed between the copy and the hold, was copied under it, holding
        every write of this object back for 100-250 ms a group."""
        for attempt in range(1, tries + 1):
            left = self._restart(partial(self._caught_up, pages, attempt == tries))
            if left is not None:
                return left
            pages, _ = self._copy()
        raise AssertionError("the last try restarts")  # (unreachable)

    def _say_if_held_back(self, pages: int, left: int) -> None:
        """Warn (once until it is started over) that a log of `pages` could not be started
        over: the restart found someone else still in it (`left` pages). Nothing of the
        cache's own does that for long but an unfinished `iter_query` iterator kept alive:
        a read transaction left open elsewhere does."""
        if left and not self._held_back:
            self._held_back = True
            log.warning(
                "vyre-sqlcache: the write-ahead log of %s has grown to %d MiB and cannot be "
                "started over: another connection keeps a read transaction open in it (a "
                "sqlite3 shell left inside BEGIN, or an iter_query() iterator of this or "
                "another program left unfinished and not closed, say). It grows with every "
                "write until that transaction ends; then it is cut back to %d MiB.",
                self._where,
                pages * _PAGE_BYTES >> 20,
                self.log_limit_bytes() >> 20,
            )
        elif not left and self._held_back:
            self._held_back = False
            log.info("vyre-sqlcache: the write-ahead log of %s started over", self._where)

    def log_limit_bytes(self) -> int:
        """What a log is cut back to when it starts over (`journal_size_limit`), off a
        filling disk: twice its checkpoint threshold (a log kept at a quarter of a small
        cap, at that)."""
        small = self._log_pages < WAL_CHECKPOINT_PAGES
        return self._log_pages * _PAGE_BYTES * (1 if small else LOG_KEEP_FACTOR)

    def _caught_up(self, seen: int, anyway: bool) -> bool:
        """Whether this object committed at most `caught_up_pages()` pages since a copy saw
        `seen` in the log (or `anyway`). Asked under the hold, where none of its commits
        runs to change what the WAL hook last reported."""
        latest = self._hook_pages
        grown = latest if latest < seen else latest - seen
        return anyway or grown <= caught_up_pages()

    def _run(self) -> None:
        try:
            retry: float | None = None
            while True:
                self._wake.wait(retry)
                self._wake.clear()
                if self._stopped:
                    return
                if retry is not None:
                    self._purge_due = True
                retry = None
                if self._checkpoint_due:
                    self._checkpoint_due = False
                    try:
                        self._left = self._checkpoint()
                    except Exception as error:
                        # Best effort: the next commit past the threshold tries again,
                        # and close() checkpoints too.
                        log.debug("vyre-sqlcache: background checkpoint failed: %s", error)
                if self._purge_due and self._purge is not None:
                    self._purge_due = False
                    try:
                        while not self._stopped and self._purge():
                            pass
                    except Exception as error:
                        log.debug("vyre-sqlcache: background purge failed: %s", error)
                        retry = PURGE_RETRY_S
        except BaseException as error:
            log.warning("vyre-sqlcache: the checkpoint thread stopped: %s", error)
