"""How a caller's thread wakes a background thread of this package.

Not `threading.Event`: its `set()` takes a Python-level lock through
`Condition.__enter__`, and an exception of a signal handler (an alarm's timeout)
landing in the caller's thread right after that lock is taken leaves it taken for
good. The background thread then waits for it forever, and so does the caller at its
next wake-up (a commit's WAL hook wakes the checkpoint thread; a read wakes the
snapshot reaper). `queue.SimpleQueue.put` is one C call that holds no lock a signal
handler can strand (the queue module documents it as safe in signal handlers).
"""

from __future__ import annotations

import queue


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
            self._calls.get(timeout=timeout)
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
