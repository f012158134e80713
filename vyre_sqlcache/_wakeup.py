"""How a caller's thread starts and wakes a background thread of this package, safe
against an exception of a signal handler (an alarm's timeout) landing in the caller's
thread at any step.

Waking is not `threading.Event`: its `set()` takes a Python-level lock through
`Condition.__enter__`, and such an exception landing right after that lock is taken
leaves it taken for good. The background thread then waits for it forever, and so does
the caller at its next wake-up (a commit's WAL hook wakes the checkpoint thread; a read
wakes the snapshot reaper). `queue.SimpleQueue.put` is one C call that holds no lock a
signal handler can strand (the queue module documents it as safe in signal handlers).
Starting is `Thread.start` with the signals held: see `start`.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading

from .errors import CacheError

log = logging.getLogger("vyre_sqlcache")

#: Signals a thread gets for what it did itself: blocked, they would kill the process
#: without a word (and without faulthandler's traceback).
_SYNCHRONOUS = {
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS")
    if hasattr(signal, name)
}


class CannotStart(CacheError):
    """A thread could not be started: the process is at its limit of threads (RLIMIT_NPROC,
    `ulimit -u`) or of memory. Each caller goes on without its thread."""


_said: set[str] = set()


def cannot_start(what: str, error: CannotStart) -> None:
    """Warn, once a process for each `what`, that its thread could not start."""
    if what not in _said:
        _said.add(what)
        log.warning("vyre-sqlcache: %s; %s", error, what)


def start(thread: threading.Thread) -> None:
    """Start `thread` with the calling thread's asynchronous signals held meanwhile (and
    blocked in the new thread for good: Python runs handlers in the main thread only).

    `Thread.start` waits on a `threading.Event`: a handler's exception landing inside it
    left the new thread's start lock taken (the thread never ran, and stayed listed) or
    raised RuntimeError("release unlocked lock") instead of itself. A signal that comes
    while held is handled right after. Raises CannotStart where the system refuses a
    thread, else what `Thread.start` raises."""
    if not hasattr(signal, "pthread_sigmask"):
        _start(thread)
        return
    # Asked before the try, changed inside it: an exception right after either call
    # leaves the mask as it was.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _SYNCHRONOUS)
        _start(thread)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _start(thread: threading.Thread) -> None:
    try:
        thread.start()
    except RuntimeError as error:
        if "can't start new thread" not in str(error):
            raise
        raise CannotStart(
            f"cannot start the thread {thread.name!r} ({error}): the process is at its "
            "limit of threads (ulimit -u) or of memory"
        ) from error


class Wakeup:
    """`threading.Event`'s set, clear and wait for one waiting thread, safe to set from
    any thread at any moment."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        """Wake the waiting thread, or have its next `wait()` return at once."""
        self._calls.put(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until `set()` is called (or has been since the last `clear()`), or for
        `timeout` seconds; whether it was. Follow it with `clear()`."""
        try:
            self._calls.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            return False
        return True

    def clear(self) -> None:
        """Forget the wake-ups so far."""
        try:
            while True:
                self._calls.get_nowait()
        except queue.Empty:
            pass
