"""Cut a call short at each of its steps in turn with a signal whose handler raises (an
alarm's timeout), and check what is left.

    python -m tests.cut_short PATH FUNCTION[+c] CALL [ROUNDS]

Each round makes `CALL` (one of `CALLS`) on a cache at PATH and sends this process
SIGALRM, whose handler raises `Interrupted`, at one return inside the first `FUNCTION`
it runs (a frame of that name; with `+c`, returns from C functions count too): the first
return in the first round, the second in the next, and so on, until a round's `FUNCTION`
returns fewer times (every step had its turn) or ROUNDS (default 400) have run.
Python's tracing gives those returns, `Condition.__enter__` returning with its lock taken
included; the handler runs at once, or where the signal was held, once it is let through.
After each round the same cache object (a new one after `open` and `close`) must write,
read back and flush, have an idle snapshot ended by the reaper (so that the log can start
over), close, fork a child, and open again with every flushed write. Prints `points
problems`, and each problem on a line of its own. Hangs where a lock was left taken: run
it with a timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import apsw

from vyre_sqlcache import DeviceFingerprint, PipelineCache, PipelineCacheKey


class Interrupted(Exception):
    pass


class Sweep:
    """Sends SIGALRM at the `at`-th return inside the next frame named `function` (with
    `c_calls`, returns from C functions too: a signal that arrives during one is handled
    as it returns, before its result is stored)."""

    def __init__(self, function: str, *, c_calls: bool = False) -> None:
        self.function = function
        self.c_calls = c_calls
        self.at = 0
        self.seen = 0
        self.inside: FrameType | None = None
        self.done = False
        self.where = ""  # of the last signal sent

    def arm(self) -> None:
        self.at += 1
        self.seen = 0
        self.inside = None
        if self.c_calls:
            sys.setprofile(self._profile)
        else:
            sys.settrace(self._call)

    def disarm(self) -> None:
        sys.settrace(None)
        sys.setprofile(None)

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.inside is None:
            if event == "call" and frame.f_code.co_name == self.function:
                self.inside = frame
        elif event == "return" and frame is self.inside:
            self._return(frame, event, arg)
        elif event in ("return", "c_return"):
            self._step(frame if event == "return" else None, frame)

    def _step(self, returning: FrameType | None, frame: FrameType) -> None:
        self.seen += 1
        if self.seen == self.at:
            code = frame.f_code
            what = code.co_name if returning is not None else "a C call in " + code.co_name
            self.where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {what}"
            self.disarm()
            os.kill(os.getpid(), signal.SIGALRM)  # (its handler raises here, if let through)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.inside is not None:
            return self._return
        if frame.f_code.co_name == self.function:
            self.inside = frame
            return self._return
        return None

    def _return(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "return":
            return self._return
        if frame is self.inside:
            self.done = self.seen < self.at  # every return in it had its turn
            self.inside = None
            self.disarm()
            return None
        self._step(frame, frame)
        return self._return


FP = DeviceFingerprint.from_parts(1, 2, "cut short")


def key(i: int) -> PipelineCacheKey:
    return PipelineCacheKey(i.to_bytes(32, "big"), bytes(32), 0, (1, 1, 1), 0, "vulkan")


def workload(cache: PipelineCache, i: int) -> None:
    """A write, a read after the snapshot reaper went idle, and a delete (which wakes
    the purge): each wakes a background thread."""
    cache.put(key(i), FP, os.urandom(1 << 16))
    time.sleep(0.03)
    cache.get(key(i), FP)
    cache.delete(key(i), FP)


CALLS: dict[str, Callable[[PipelineCache, str, int], object]] = {
    "open": lambda cache, path, i: PipelineCache.open(path),
    "close": lambda cache, path, i: cache.close(),
    "flush": lambda cache, path, i: cache.flush(),
    "get": lambda cache, path, i: cache.get(key(i), FP),
    "put": lambda cache, path, i: cache.put(key(i), FP, b"cut %d" % i),
    "put_many": lambda cache, path, i: cache.put_many([(key(i), b"cut %d" % i)], FP),
    "get_many": lambda cache, path, i: cache.get_many([key(i), key(10**7 + i)], FP),
    "delete": lambda cache, path, i: cache.delete(key(10**6 + i), FP),
    "stats": lambda cache, path, i: cache.stats(),
    "workload": lambda cache, path, i: workload(cache, 10**6 + i),
}


def snapshot_ended(path: str) -> bool:
    """Whether the log can start over (no snapshot kept) within 5 s."""
    plain = apsw.Connection(path)
    try:
        deadline = time.monotonic() + 5
        while plain.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]:  # busy
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
    finally:
        plain.close()


def ring(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def main(path: str, function: str, call: str, rounds: int) -> int:
    signal.signal(signal.SIGALRM, ring)
    sweep = Sweep(function.removesuffix("+c"), c_calls=function.endswith("+c"))
    problems = 0

    def problem(*what: object) -> None:
        nonlocal problems
        problems += 1
        print(f"problem at return {sweep.at} ({sweep.where}):", *what, flush=True)

    for i in range(1, rounds + 1):
        if sweep.done:
            break
        cache = PipelineCache.open(path)
        cache.put(key(i), FP, b"flushed %d" % i)
        cache.flush()
        cache.put(key(i), FP, b"queued %d" % i)
        if call == "open":
            cache.close()
        sweep.arm()
        try:
            made = CALLS[call](cache, path, i)
            if isinstance(made, PipelineCache):
                cache = made
        except Interrupted:
            pass
        except BaseException as error:  # anything but the handler's own exception
            problem("raised", repr(error), traceback.format_exc(limit=-4))
        finally:
            sweep.disarm()
        kept = [b"flushed %d" % i, b"queued %d" % i, b"cut %d" % i]
        try:
            if call in ("open", "close"):
                cache.close()  # (again, for one cut short: it finishes the job)
                cache = PipelineCache.open(path)
            cache.put(key(i), FP, b"after %d" % i)
            if cache.get(key(i), FP) != b"after %d" % i:
                problem("read back", cache.get(key(i), FP))
            cache.flush()
            kept = [b"after %d" % i]
            if call not in ("open", "close"):
                cache.get(key(i), FP)  # begins a snapshot, left idle: the reaper ends it
                if not snapshot_ended(path):
                    problem("the log could not start over: a snapshot was kept")
            cache.close()
        except Exception as error:
            problem("then", repr(error))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        with PipelineCache.open(path) as again:
            if again.get(key(i), FP) not in kept:
                problem("kept", again.get(key(i), FP), "of", kept)
    with PipelineCache.open(path) as cache:
        cache.put(key(0), FP, b"last")
        cache.get(key(0), FP)
        if not snapshot_ended(path):
            problem("the log could not start over: a snapshot was kept")
    if not sweep.done:
        problem(f"only {rounds} rounds: not every return had its turn")
    print(sweep.at - 1, problems)
    return 1 if problems else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0], args[1], args[2], int(args[3]) if len(args) > 3 else 400))
