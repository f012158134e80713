"""Checkpoints in a background thread, so that no write waits for one.

In WAL mode every commit appends to the write-ahead log; a checkpoint copies the
log back into the database file and syncs it. SQLite's automatic checkpoint runs
inside whichever commit crosses the threshold, so one unlucky write pays for
copying everyone's megabytes. Cache connections turn that off, and each cache
object that writes keeps one thread that runs a PASSIVE checkpoint (it never
waits for, nor blocks, readers and writers) once a commit leaves more than
`WAL_CHECKPOINT_PAGES` pages in the log. SQLite's WAL hook reports that count
after every commit; the log file's size would not do, since SQLite reuses a
grown log from its start without shrinking it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import apsw

__all__ = ["WAL_CHECKPOINT_PAGES", "Checkpointer"]

log = logging.getLogger("vyre_sqlcache")

#: Pages in the log that wake the checkpoint thread: 16 MiB of 16 KiB pages
#: (SQLite's own automatic checkpoint runs at 1000).
WAL_CHECKPOINT_PAGES = 1024


class Checkpointer:
    """Wakes a daemon thread to checkpoint when the write-ahead log has grown."""

    def __init__(self, checkpoint: Callable[[], None]) -> None:
        """`checkpoint` runs one PASSIVE checkpoint, raising apsw or cache errors."""
        self._checkpoint = checkpoint
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def wal_hook(self, connection: apsw.Connection, database: str, pages: int) -> int:
        """SQLite's WAL hook, after every commit: wake the thread past the threshold."""
        if pages > WAL_CHECKPOINT_PAGES:
            try:
                self.wake()
            except BaseException as error:
                # An error returned here would fail a statement whose commit has
                # already happened; close() checkpoints anyway.
                log.debug("vyre-sqlcache: could not wake the checkpoint thread: %s", error)
        return apsw.SQLITE_OK

    def wake(self) -> None:
        """Start the thread if needed and have it checkpoint once more."""
        with self._lock:
            if self._stopped:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="vyre-sqlcache checkpoint", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; it finishes a checkpoint under way."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopped:
                    return
                try:
                    self._checkpoint()
                except Exception as error:
                    # Best effort: the next commit past the threshold tries again, and
                    # close() checkpoints too.
                    log.debug("vyre-sqlcache: background checkpoint failed: %s", error)
        except BaseException as error:
            log.warning("vyre-sqlcache: the checkpoint thread stopped: %s", error)
