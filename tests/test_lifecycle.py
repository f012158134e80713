"""Process and thread lifecycles: fork, Ctrl-C and asynchronous exceptions, close() under
load, threads not made by `threading`, and never waiting on another process to quit."""

from __future__ import annotations

import _thread
import copy
import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from torture.lifecycle import FORK_VARIANTS, run_fork_trials, run_interrupt_trials
from vyre_sqlcache import CacheError, DeviceFingerprint, PipelineCache, _cachefile, _checkpointer
from vyre_sqlcache import cache as cache_module

from .helpers import locked_for_others, open_connections, refuse_threads, run_script

FP = DeviceFingerprint.from_parts(1, 2, "lifecycle")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork and signals are POSIX")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- fork --------------------------------------------------------------------------------


def test_fork_with_threads_at_work_loses_nothing_and_never_hangs(tmp_path: Path) -> None:
    # Each variant four times: raw fork with the parent closing first, the child closing
    # first, the parent exiting without close(); multiprocessing's fork, daemonic or not.
    report = run_fork_trials(tmp_path, trials=4 * len(FORK_VARIANTS), seed=7)
    assert report.hangs == 0
    assert report.errors == []
    assert report.checked > 100
    assert (report.lost, report.wrong, report.not_ok) == (0, 0, 0)


def test_a_forked_child_can_open_the_cache_afresh(
    cache: PipelineCache, cache_path: Path, fingerprint: DeviceFingerprint
) -> None:
    # The inherited lock state made a fresh open in the child wait out the busy timeout.
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            cache.write(os.urandom(32), fingerprint, b"w" * 5000)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.05)
        read, written = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                start = time.monotonic()
                with PipelineCache.open(cache_path) as fresh:
                    fresh.write(b"\1" * 32, fingerprint, b"child")
                    fresh.flush()
                os.write(written, f"{time.monotonic() - start:.3f}".encode())
                status = 0
            finally:
                os._exit(status)
        os.close(written)
        _, status = os.waitpid(pid, 0)
        took = float(os.read(read, 100) or "inf")
        os.close(read)
    finally:
        stop.set()
        thread.join()
    assert status == 0
    assert took < 5
    assert cache.read(b"\1" * 32, fingerprint) == b"child"


@pytest.mark.skipif(sys.platform != "linux", reason="the lock probe reads Linux's struct flock")
def test_a_fork_while_another_thread_looks_at_a_file_leaves_the_child_real_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite keeps one record of a file's locks per process. A child forked while a
    # thread held the shared lock to read a file's header inherits the record, not the
    # kernel's lock: its own connections then believe they hold a lock nobody holds,
    # and other processes may take the exclusive lock (and delete the log) under them.
    path = tmp_path / "look.sqlite3"
    with PipelineCache.open(path) as cache:
        cache.write(b"\1" * 32, FP, b"there")
    locked, go = threading.Event(), threading.Event()
    lock_shared = _cachefile._lock_shared

    def held(file: object) -> bool | None:
        taken = lock_shared(file)  # type: ignore[arg-type]
        locked.set()
        go.wait(30)
        return taken

    monkeypatch.setattr(_cachefile, "_lock_shared", held)
    looker = threading.Thread(target=_cachefile.read_head, args=(path,))
    looker.start()
    assert locked.wait(30)
    threading.Timer(0.5, go.set).start()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _cachefile._lock_shared = lock_shared  # the pause is the parent thread's
            time.sleep(1.0)  # the parent's thread has let go of the file by now
            with PipelineCache.open(path) as cache:
                if cache.read(b"\1" * 32, FP) == b"there" and locked_for_others(path):
                    status = 0
        finally:
            os._exit(status)
    looker.join(30)
    _, status = os.waitpid(pid, 0)
    assert status == 0, "the child's connections held no lock the kernel knew of"


# -- Ctrl-C and asynchronous exceptions ----------------------------------------------------


def test_thousands_of_interrupts_leave_no_lock_and_lose_nothing(tmp_path: Path) -> None:
    # SIGINT every 0-2 ms for 5 s while another process writes and flushes throughout.
    report = run_interrupt_trials(tmp_path, trials=1, seconds=5, seed=3)
    assert report.errors == [] and report.hangs == 0
    assert report.caught > 300
    assert report.checked > 100
    assert (report.lost, report.wrong, report.not_ok) == (0, 0, 0)
    # The other process's writes never waited out a lock the interrupted one kept.
    assert report.slowest_other_write_s < 2.0


# The main thread holds Ctrl-C for a transaction (as a long read does, `check` on a
# large file, say) while another thread forks: the child's main thread is the forking
# one, and no block of it holds Ctrl-C.
FORK_WHILE_HELD = textwrap.dedent(
    """
    import os, signal, threading, time
    from vyre_sqlcache._connections import interrupts_held
    codes = []
    def fork_now():
        pid = os.fork()
        if pid == 0:
            try:
                signal.raise_signal(signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                os._exit(0)
            os._exit(3)  # the signal was swallowed
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    try:
        with interrupts_held():
            thread = threading.Thread(target=fork_now)
            thread.start()
            thread.join()
            with interrupts_held():  # and in the parent, the block still holds it
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.05)
                codes.append("held")
    except KeyboardInterrupt:
        codes.append("delivered after")
    print(codes)
    """
)


def test_a_fork_while_the_main_thread_holds_ctrl_c_gives_the_child_its_own() -> None:
    result = run_script(FORK_WHILE_HELD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[0, 'held', 'delivered after']"


# An alarm whose handler raises (pytest-timeout's signal method, job runners) fires at
# random points of writes and flushes; afterwards Ctrl-C must reach the application.
ALARMS_THEN_CTRL_C = textwrap.dedent(
    """
    import os, random, signal, sys, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    class Alarm(Exception):
        pass
    def ring(signum, frame):
        raise Alarm()
    signal.signal(signal.SIGALRM, ring)
    application = signal.getsignal(signal.SIGINT)
    rng = random.Random(int(sys.argv[2]))
    fp = DeviceFingerprint.from_parts(1, 2, "alarms")
    cache = PipelineCache.open(sys.argv[1], write_behind=False)
    calls = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and calls < 3000:
        calls += 1
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 2e-3))
            cache.write(rng.randrange(1000).to_bytes(32, "big"), fp, os.urandom(64))
            cache.flush()
        except Alarm:
            pass
        finally:
            while True:
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    break
                except Alarm:
                    pass
    outcome = []
    for then in ("after the alarms", "after another call"):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)
            outcome.append("swallowed " + then)
        except KeyboardInterrupt:
            outcome.append("delivered " + then)
        cache.write(b"\1" * 32, fp, b"one more")
        cache.flush()
    outcome.append(signal.getsignal(signal.SIGINT) is application)
    cache.close()
    print(outcome)
    """
)


@pytest.mark.parametrize("seed", [1, 2])
def test_exceptions_of_an_alarm_handler_never_leave_ctrl_c_swallowed(
    tmp_path: Path, seed: int
) -> None:
    result = run_script(ALARMS_THEN_CTRL_C, str(tmp_path / "c.sqlite3"), str(seed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(
        ["delivered after the alarms", "delivered after another call", True]
    )


CUT_SHORT = "import sys\nfrom tests.cut_short import main\nsys.exit(main(*sys.argv[1:4], 3000))"


@pytest.mark.parametrize(
    ("function", "call"),
    [
        ("open", "open"),  # starting threads included
        ("close", "close"),
        ("flush", "flush"),
        ("get", "get"),
        ("put", "put"),
        ("put_many", "put_many"),
        ("get_many", "get_many"),
        ("delete", "delete"),
        ("stats", "stats"),
        ("_start", "workload"),  # waking the checkpoint thread
        ("watch", "workload"),  # waking the snapshot reaper
        # and as a C function returns (a signal arriving during it is handled then)
        ("close+c", "close"),
        ("flush+c", "flush"),
        ("get_many+c", "get_many"),
        ("delete+c", "delete"),
    ],
)
def test_an_alarm_at_any_step_of_a_call_leaves_every_lock_and_thread_usable(
    tmp_path: Path, function: str, call: str
) -> None:
    # threading.Event.set and Thread.start cut short there had left a lock taken: the next
    # commit, close() or fork waited for ever, or open() raised RuntimeError("release
    # unlocked lock"). See tests/cut_short.py for what is checked after each step.
    result = run_script(CUT_SHORT, str(tmp_path / "c.sqlite3"), function, call, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


#: A forked child's first read opens its connection; an alarm cuts it short at each step
#: in turn (C calls included: a signal that arrives during one is handled as it returns),
#: one child a step, and the child must read again. Prints the steps; exits 1 at a failure.
ALARM_AS_A_CHILD_OPENS_ITS_CONNECTION = textwrap.dedent(
    """
    import os, signal, sys
    from tests.cut_short import FP, Interrupted, Sweep, key, ring
    from vyre_sqlcache import PipelineCache
    signal.signal(signal.SIGALRM, ring)
    cache = PipelineCache.open(sys.argv[1])
    cache.put(key(1), FP, b"kept")
    cache.flush()
    sweep = Sweep("main", c_calls=True)
    for step in range(1, 3000):
        pid = os.fork()
        if pid == 0:
            sweep.at = step - 1
            sweep.arm()
            try:
                cache.get(key(1), FP)
            except Interrupted:
                pass
            finally:
                sweep.disarm()
            if sweep.done:
                os._exit(3)
            try:
                got = cache.get(key(1), FP)
            except BaseException as error:
                print("step", step, sweep.where, repr(error), flush=True)
                os._exit(1)
            os._exit(0 if got == b"kept" else 2)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 3:
            break
        if code:
            print("step", step, "exit", code, flush=True)
            sys.exit(1)
    print(step - 1, "steps")
    """
)


def test_an_alarm_as_a_connection_opens_leaves_it_usable(tmp_path: Path) -> None:
    # Landing as the connection's cursor was made, after the connection was kept: every
    # later read of the object raised AssertionError (a probe's storm of alarms: 7,561).
    result = run_script(ALARM_AS_A_CHILD_OPENS_ITS_CONNECTION, str(tmp_path / "c.sqlite3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert int(result.stdout.split()[-2]) > 50  # (the sweep reached the connection's opening)


#: A read whose entry an alarm cuts short right after the slot is marked busy (as
#: `enter_held` asks for the change counter), then the thread idles, as an application
#: that caught its timeout does. Prints whether the log could start over at once (the
#: reaper ended the thread's snapshot) and how long a close() from another thread took.
ALARM_IN_A_READS_ENTRY = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import apsw
    from tests.cut_short import Interrupted, ring
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    signal.signal(signal.SIGALRM, ring)
    fp = DeviceFingerprint.from_parts(1, 2, "entry")
    cache = PipelineCache.open(sys.argv[1])
    cache.write(b"\1" * 32, fp, b"A" * 4000)
    cache.flush()
    cache.read(b"\1" * 32, fp)  # a held snapshot
    landed = []
    def alarm(frame, event, arg):
        if event == "return" and frame.f_back.f_code.co_name == "enter_held":
            landed.append(True)
            os.kill(os.getpid(), signal.SIGALRM)
    def tracer(frame, event, arg):
        return alarm if frame.f_code.co_name == "current_generation" else None
    sys.settrace(tracer)
    try:
        cache.read(b"\1" * 32, fp)
    except Interrupted:
        pass
    finally:
        sys.settrace(None)
    time.sleep(0.2)
    plain = apsw.Connection(sys.argv[1])
    busy = plain.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]
    plain.close()
    started = time.monotonic()
    closer = threading.Thread(target=cache.close)
    closer.start()
    closer.join()
    print(landed == [True], busy, time.monotonic() - started < 5)
    """
)


def test_an_alarm_landing_as_a_read_marks_its_call_leaves_no_mark(tmp_path: Path) -> None:
    # The mark stayed: the reaper left the idle thread's snapshot alone (the log could
    # not start over: busy), and a close() from another thread waited its 20 s for a
    # call that had ended.
    result = run_script(ALARM_IN_A_READS_ENTRY, str(tmp_path / "c.sqlite3"), timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "0", "True"]


@pytest.mark.parametrize("thread", ["vyre-sqlcache writer", "vyre-sqlcache checkpoint"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_exception_landing_in_open_as_it_starts_a_thread_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread: str, when: str
) -> None:
    # As an alarm handler's exception does when it lands inside `Thread.start`: before
    # the thread ran (open() then failed with "cannot join thread before it is started"
    # and left its connections open), or once it runs.
    start = threading.Thread.start

    def interrupted(self: threading.Thread) -> None:
        if self.name == thread:
            if when == "after":
                start(self)
            raise Interrupted()
        start(self)

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    path = tmp_path / "c.sqlite3"
    with pytest.raises(Interrupted):
        PipelineCache.open(path)
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    ours = ("vyre-sqlcache writer", "vyre-sqlcache checkpoint")  # (the reaper is shared)
    while any(t.name in ours for t in threading.enumerate()):
        assert time.monotonic() < deadline, threading.enumerate()
        time.sleep(0.01)
    assert not locked_for_others(path)
    with PipelineCache.open(path) as cache:
        cache.write(b"\1" * 32, FP, b"after")
        cache.flush()
        assert cache.read(b"\1" * 32, FP) == b"after"


def test_an_object_an_exception_cut_short_while_it_was_made_is_collected_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise Interrupted()

    monkeypatch.setattr(cache_module, "WriteBehind", interrupted)
    with pytest.raises(Interrupted):
        PipelineCache.open(tmp_path / "c.sqlite3")
    monkeypatch.undo()
    gc.collect()
    time.sleep(0.2)  # a close thread it started would have failed by now
    assert "dropped unclosed" not in caplog.text


# One thread forks (each child ends at once) while another opens, writes and closes.
FORKS_WHILE_OPENING = textwrap.dedent(
    """
    import faulthandler, os, sys, threading, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    faulthandler.dump_traceback_later(60, exit=True)  # a hang: every thread's stack
    path, seconds = sys.argv[1], float(sys.argv[2])
    fp = DeviceFingerprint.from_parts(1, 2, "forks")
    PipelineCache.open(path).close()
    stop = time.monotonic() + seconds
    def forks():
        while time.monotonic() < stop:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    def opens():
        while time.monotonic() < stop:
            with PipelineCache.open(path) as cache:
                cache.write(os.urandom(32), fp, b"x")
    threads = [threading.Thread(target=forks), threading.Thread(target=opens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with PipelineCache.open(path) as cache:
        print(len(cache) > 0)
    """
)


def test_a_fork_while_another_thread_opens_a_cache_leaves_every_lock_usable(
    tmp_path: Path,
) -> None:
    # A cache object made between a fork's before and after hooks was "released" by the
    # after hook without having been locked: the error ended the loop, and every other
    # object kept its locks taken, so the next write or fork hung for ever.
    result = run_script(FORKS_WHILE_OPENING, str(tmp_path / "c.sqlite3"), "6", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "True"
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]


FORKED_COUNTS = textwrap.dedent(
    """
    import os, sys
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    path = sys.argv[1]
    fp = DeviceFingerprint.from_parts(1, 2, "counts")
    digests = [bytes([i]) * 32 for i in range(20)]
    cache = PipelineCache.open(path)
    cache.write_many([(d, b"x" * 100) for d in digests], fp)
    cache.flush()
    for i in range(500):
        cache.read(digests[i % 20], fp)
    for i in range(50):
        cache.read(os.urandom(32), fp)
    pid = os.fork()
    if pid == 0:
        for i in range(100):
            cache.read(digests[i % 20], fp)
        cache.read(os.urandom(32), fp)
        cache.close()
        os._exit(0)
    os.waitpid(pid, 0)
    for i in range(10):
        cache.read(digests[i % 20], fp)
    cache.close()
    with PipelineCache.open(path) as cache:
        stats = cache.stats()
        print(stats.total_hits, stats.total_misses)
    """
)


def test_a_forked_child_does_not_write_its_parents_counts_again(tmp_path: Path) -> None:
    # The child inherited the hits and misses its parent had not written yet and wrote
    # them too: 500 hits and 50 misses counted twice in the file's totals.
    result = run_script(FORKED_COUNTS, str(tmp_path / "c.sqlite3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["610", "51"], result.stderr[-3000:]


def raise_in(thread: threading.Thread, error: type[BaseException]) -> None:
    """Deliver `error` to `thread` asynchronously, as a signal handler's exception would."""
    assert thread.ident is not None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(error)
    )


class Interrupted(Exception):
    pass


def test_asynchronous_exceptions_in_a_thread_never_leave_a_transaction_open(
    cache: PipelineCache,
    cache_path: Path,
    fingerprint: DeviceFingerprint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    stop = threading.Event()
    idle = threading.Event()
    # One of the thousands of exceptions sent may land in a finalizer (a generator closed
    # by the collector), which Python reports as unraisable and pytest as a failure (once
    # in CI, as pytest's own hook was handling one): the sender's, not the cache's.
    forward = sys.unraisablehook

    def unraisable(report: Any) -> None:
        if report.exc_type is not Interrupted:
            forward(report)

    monkeypatch.setattr(sys, "unraisablehook", unraisable)

    def work() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                digest = os.urandom(32)
                cache.write(digest, fingerprint, b"a" * 2000)
                cache.invalidate_impacted([1], [digest], fingerprint)
                cache.get_many([], fingerprint)
                calls += 1
            except Interrupted:
                pass
        idle.set()
        time.sleep(3)  # alive, and no longer calling the cache

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        raise_in(thread, Interrupted)
        time.sleep(0.0005)
    stop.set()
    assert idle.wait(30)
    assert calls > 50
    # Another connection can take the write lock at once.
    other = apsw.Connection(str(cache_path))
    other.set_busy_timeout(1000)
    other.execute("BEGIN IMMEDIATE; ROLLBACK")
    other.close()
    thread.join()


# -- close() under load ------------------------------------------------------------------


def test_close_while_other_threads_call(cache_path: Path, fingerprint: DeviceFingerprint) -> None:
    before = open_fds()
    cache = PipelineCache.open(cache_path)
    digests = [os.urandom(32) for _ in range(50)]
    cache.write_many([(d, d * 100) for d in digests], fingerprint)
    unexpected: list[BaseException] = []
    started = threading.Barrier(5)

    def work(index: int) -> None:
        started.wait()
        try:
            while True:
                digest = digests[index * 7 % 50]
                if index % 2:
                    cache.write(os.urandom(32), fingerprint, b"x" * 4000)
                else:
                    assert cache.read(digest, fingerprint) == digest * 100
        except CacheError as error:
            if "closed" not in str(error):
                unexpected.append(error)
        except BaseException as error:
            unexpected.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.2)
    cache.close()
    cache.close()  # idempotent
    for thread in threads:
        thread.join(30)
    assert unexpected == []
    assert sorted(p.name for p in cache_path.parent.iterdir()) == [cache_path.name]
    assert open_fds() <= before


# -- threads not made by threading ---------------------------------------------------------


def test_connections_of_foreign_threads_are_reclaimed(
    cache: PipelineCache, fingerprint: DeviceFingerprint
) -> None:
    digest = os.urandom(32)
    cache.write(digest, fingerprint, b"blob")
    before = open_fds()

    def read(done: threading.Event) -> None:
        try:
            assert cache.read(digest, fingerprint) == b"blob"
        finally:
            done.set()

    for _ in range(100):
        done = threading.Event()
        _thread.start_new_thread(read, (done,))
        assert done.wait(10)
        time.sleep(0.002)  # let the thread finish exiting
    # The last threads may still be exiting, and other tests' threads closing files.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        open_connections(cache) <= 3 and open_fds() <= before + 4
    ):
        time.sleep(0.05)
    assert open_connections(cache) <= 3
    assert open_fds() <= before + 4


# -- never waiting on another process when quitting --------------------------------------


@pytest.fixture
def write_lock_held(cache_path: Path) -> object:
    PipelineCache.open(cache_path).close()
    holder = apsw.Connection(str(cache_path))
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    holder.execute("ROLLBACK")
    holder.close()


def test_close_does_not_wait_for_another_processs_write_lock(
    cache_path: Path, fingerprint: DeviceFingerprint, write_lock_held: object
) -> None:
    cache = PipelineCache.open(cache_path)
    cache.read(os.urandom(32), fingerprint)  # a miss to record
    start = time.monotonic()
    cache.close()
    assert time.monotonic() - start < 1.0


def test_a_reader_does_not_wait_for_another_processs_write_lock(
    cache_path: Path, fingerprint: DeviceFingerprint, write_lock_held: object
) -> None:
    start = time.monotonic()
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert cache.read(os.urandom(32), fingerprint) is None
        cache.stats()
    assert time.monotonic() - start < 1.0


# -- exit without close() --------------------------------------------------------------

WRITES = 300
EXIT_FP = DeviceFingerprint.from_parts(1, 2, "exit")

# argv: path, how the script ends. Writes and ends at once, without flush() or close().
EXITER = textwrap.dedent(
    """
    import atexit, sys, threading
    path, how = sys.argv[1], sys.argv[2]
    def write():
        for i in range(300):
            cache.write(i.to_bytes(32, "big"), fp, b"%d" % i * 50)
    if how == "from an atexit handler run after the library's":
        atexit.register(write)  # registered before the import: runs after its handler
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    fp = DeviceFingerprint.from_parts(1, 2, "exit")
    cache = PipelineCache.open(path)
    if how.startswith("from an atexit"):
        pass
    elif how == "from a thread":
        thread = threading.Thread(target=write)
        thread.start()
        thread.join()
    else:
        write()
    if how == "sys.exit":
        sys.exit(3)
    if how == "an uncaught exception":
        raise RuntimeError("the application failed")
    """
)


def written_by_exiter(path: Path) -> list[bool]:
    with PipelineCache.open(path, readonly=True) as cache:
        return [cache.read(i.to_bytes(32, "big"), EXIT_FP) == b"%d" % i * 50 for i in range(WRITES)]


@pytest.mark.parametrize(
    "how",
    [
        "the end of the script",
        "sys.exit",
        "an uncaught exception",
        "from a thread",
        "from an atexit handler run after the library's",
    ],
)
def test_a_normal_exit_without_close_keeps_every_write(tmp_path: Path, how: str) -> None:
    # write() returned, so the entry was promised to other processes within milliseconds;
    # the writer thread is a daemon and dies with the interpreter.
    path = tmp_path / "exit.sqlite3"
    ended = run_script(EXITER, str(path), how)
    assert ended.returncode in (0, 1, 3), ended.stderr[-2000:]
    assert written_by_exiter(path) == [True] * WRITES


def _write_in_worker(path: Path) -> None:
    cache = PipelineCache.open(path)
    for i in range(WRITES):
        cache.write(i.to_bytes(32, "big"), EXIT_FP, b"%d" % i * 50)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_multiprocessing_worker_that_returns_keeps_every_write(
    tmp_path: Path, method: str
) -> None:
    # A forked worker ends with os._exit after multiprocessing's own finalizers: no atexit.
    path = tmp_path / "worker.sqlite3"
    PipelineCache.open(path).close()
    worker = multiprocessing.get_context(method).Process(target=_write_in_worker, args=(path,))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    assert written_by_exiter(path) == [True] * WRITES


# A commit that fails at close(): the loss is logged once, not again at exit.
FAILING_CLOSE = textwrap.dedent(
    """
    import sys
    from vyre_sqlcache import CacheError, DeviceFingerprint, PipelineCache
    cache = PipelineCache.open(sys.argv[1])
    def fail(*args, **kwargs):
        raise CacheError("the disk went away")
    cache._writer._commit = fail  # what a dead disk does to every commit
    cache.write(b"\\1" * 32, DeviceFingerprint.from_parts(1, 2, "exit"), b"lost")
    cache.close()
    """
)


def test_writes_lost_at_close_are_reported_once(tmp_path: Path) -> None:
    ended = run_script(FAILING_CLOSE, str(tmp_path / "lost.sqlite3"))
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert ended.stderr.count("were lost") == 1, ended.stderr


# -- a cache dropped without close() ---------------------------------------------------


@pytest.mark.parametrize("how", ["its last reference", "a reference cycle"])
def test_a_cache_dropped_without_close_is_closed_and_keeps_its_writes(
    tmp_path: Path, how: str
) -> None:
    # Its writer and checkpoint threads kept it alive: every open() without close()
    # left two threads and four descriptors for good (100 opens: 201 threads, 408 fds).
    # In a cycle, the collector clears weak references before __del__ runs.
    path = tmp_path / "dropped.sqlite3"
    PipelineCache.open(path).close()
    threads, fds = threading.active_count(), open_fds()

    def use(i: int) -> None:
        cache = PipelineCache.open(path)
        cache.write(i.to_bytes(32, "big"), FP, b"dropped %d" % i)
        if how == "a reference cycle":
            cache.owner = {"cache": cache}  # type: ignore[attr-defined]

    with pytest.warns(ResourceWarning, match="unclosed cache"):
        for i in range(30):
            use(i)
    deadline = time.monotonic() + 30  # each is closed by a thread of its own
    while threading.active_count() > threads and time.monotonic() < deadline:
        gc.collect()  # a cycle is collected when no thread of its own is in a call
        time.sleep(0.05)
    assert threading.active_count() <= threads
    assert open_fds() <= fds
    with PipelineCache.open(path) as cache:
        assert [cache.read(i.to_bytes(32, "big"), FP) for i in range(30)] == [
            b"dropped %d" % i for i in range(30)
        ]


def test_caches_collected_together_in_cycles_log_no_failed_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One collection clears the weak references of every cache in it before the first
    # __del__ runs, and that __del__ starts a thread (the GIL is let go): another cache's
    # writer then found its cache gone and logged "committing queued writes failed",
    # though the close that follows commits the queue.
    paths = [tmp_path / f"cycle{i}.sqlite3" for i in range(8)]
    written: dict[Path, list[bytes]] = {path: [] for path in paths}
    PipelineCache.open(paths[0]).close()
    threads = threading.active_count()
    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"), pytest.warns(ResourceWarning):
        for _ in range(5):
            gc.disable()
            try:
                for path in paths:
                    cache = PipelineCache.open(path)
                    cache.owner = cache  # type: ignore[attr-defined]
                    for _ in range(5):
                        digest = os.urandom(32)
                        cache.write(digest, FP, digest)
                        written[path].append(digest)
                    del cache
            finally:
                gc.enable()
            deadline = time.monotonic() + 10
            # A cache whose thread is in a commit is alive: the next collection takes it.
            while threading.active_count() > threads and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.02)
    assert threading.active_count() <= threads
    assert "failed" not in caplog.text
    for path in paths:
        with PipelineCache.open(path) as cache:
            assert all(cache.read(d, FP) == d for d in written[path])


def test_a_dropped_cache_whose_close_fails_logs_it_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    uncaught: list[object] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)

    def drop() -> None:
        cache = PipelineCache.open(tmp_path / "failing.sqlite3")
        close = cache.close

        def failing_close() -> None:
            close()
            raise CacheError("the disk went away")

        cache.close = failing_close  # type: ignore[method-assign]

    with caplog.at_level(logging.WARNING, logger="vyre_sqlcache"), pytest.warns(ResourceWarning):
        drop()
        gc.collect()
        deadline = time.monotonic() + 10
        while "dropped unclosed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "dropped unclosed, failed: the disk went away" in caplog.text
    assert uncaught == []


def test_a_fork_while_the_log_is_started_over_waits_for_it_and_both_go_on(
    cache_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint thread holds the object's commits back during its RESTART; the fork
    # commits the queue first, so it must wait for that, and the child must not inherit
    # the held lock.
    monkeypatch.setattr(_checkpointer, "WAL_CHECKPOINT_PAGES", 8)
    restarting = threading.Event()
    restart_log = cache_module.restart_log

    def slow(connection: apsw.Connection) -> int:
        restarting.set()
        time.sleep(0.3)
        return restart_log(connection)

    monkeypatch.setattr(cache_module, "restart_log", slow)
    with PipelineCache.open(cache_path) as cache:
        written: list[bytes] = []
        while not restarting.is_set() and len(written) < 2000:
            written.append(os.urandom(32))
            cache.write(written[-1], fingerprint, written[-1] * 500)
            time.sleep(0.001)  # queued: the writer thread commits, and its commits wake it
        assert restarting.is_set()
        cache.write(b"\1" * 32, fingerprint, b"queued before the fork")
        before = time.monotonic()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                cache.write(b"\2" * 32, fingerprint, b"child")
                cache.flush()
                if cache.read(b"\1" * 32, fingerprint) == b"queued before the fork":
                    status = 0
                cache.close()
            finally:
                os._exit(status)
        forking = time.monotonic() - before
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child hung")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert forking > 0.1, "the fork did not wait for the RESTART under way"
        cache.write(b"\3" * 32, fingerprint, b"parent")
        cache.flush()
        assert cache.read(b"\2" * 32, fingerprint) == b"child"
        assert cache.read(b"\3" * 32, fingerprint) == b"parent"
        assert all(cache.read(digest, fingerprint) == digest * 500 for digest in written)


# -- close() and the writes racing it --------------------------------------------------------


@pytest.mark.parametrize("calls", ["write", "write_many", "put_named"])
def test_every_write_that_returned_is_kept_and_writes_after_close_raise(
    cache_path: Path, calls: str
) -> None:
    # A thread writes while another closes: each write either returned (and is in the
    # file) or raised CacheError ("closed"); none is queued after the last commit.
    cache = PipelineCache.open(cache_path)
    returned: list[bytes] = []
    refused: list[BaseException] = []

    def write(digest: bytes) -> None:
        if calls == "write":
            cache.write(digest, FP, digest)
        elif calls == "write_many":
            cache.write_many([(digest, digest)], FP)
        else:
            cache.put_named("race", digest.hex(), digest)

    def writer() -> None:
        while True:
            digest = os.urandom(32)
            try:
                write(digest)
            except CacheError as error:
                refused.append(error)
                return
            returned.append(digest)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    cache.close()
    thread.join(30)
    assert len(returned) > 100 and "closed" in str(refused[0])
    with pytest.raises(CacheError, match="closed"):
        write(os.urandom(32))
    with PipelineCache.open(cache_path, readonly=True) as reader:
        if calls == "put_named":
            found = [reader.get_named("race", d.hex()) for d in returned]
        else:
            found = [reader.read(d, FP) for d in returned]
    assert [d for d, got in zip(returned, found, strict=True) if got != d] == []


def test_ctrl_c_while_close_waits_keeps_the_queue_for_the_next_close(
    cache_path: Path, write_lock_held: apsw.Connection
) -> None:
    # Another connection holds the write lock: close() waits for the writer thread's
    # commit, and Ctrl-C arrives meanwhile. The object stays open with its queue.
    cache = PipelineCache.open(cache_path)
    digests = [os.urandom(32) for _ in range(10)]
    for digest in digests:
        cache.write(digest, FP, digest)
    time.sleep(0.05)  # the writer thread is waiting for the lock now
    main = threading.get_ident()
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        cache.close()
    write_lock_held.execute("ROLLBACK")
    cache.close()  # commits what the interrupted close kept
    write_lock_held.execute("BEGIN")  # for the fixture's ROLLBACK
    with PipelineCache.open(cache_path, readonly=True) as reader:
        assert [reader.read(d, FP) for d in digests] == digests


def test_an_interrupt_right_after_a_snapshot_begins_leaves_no_transaction(
    cache: PipelineCache,
) -> None:
    # Delivered between the held snapshot's BEGIN and its bookkeeping: the connection
    # was left in a transaction that had read nothing yet, and every later flush() of
    # the thread failed with apsw's "Safety level may not be changed inside a transaction".
    import linecache

    from vyre_sqlcache import _connections

    digest = os.urandom(32)
    cache.write(digest, FP, b"there")
    cache.flush()
    target = "slot.held_since = time.monotonic()"
    fired: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != _connections.__file__:
            return None

        def line(frame: Any, event: str, arg: Any) -> Any:
            source = linecache.getline(_connections.__file__, frame.f_lineno)
            if event == "line" and not fired and target in source:
                fired.append(1)
                raise KeyboardInterrupt
            return line

        return line

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.read(digest, FP)
    finally:
        sys.settrace(None)
    assert fired
    for i in range(3):
        cache.write(bytes([i]) * 32, FP, b"after")
        cache.flush()
    assert cache.read(digest, FP) == b"there"


# argv: folder, seed, signal. The signal every 0.05-2 ms for 3 s while this one process
# writes, flushes, reads and invalidates: SIGINT raises KeyboardInterrupt (Ctrl-C),
# SIGTERM SystemExit (as a service's handler does); prints the other errors.
SIGNAL_STORM = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time
    from vyre_sqlcache import DeviceFingerprint, PipelineCache
    folder, seed, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    number = getattr(signal, name)
    fp = DeviceFingerprint.from_parts(1, 2, "storm")
    cache = PipelineCache.open(os.path.join(folder, "storm.sqlite3"))
    armed = False
    def on_signal(signum, frame):  # inside the calls only, not in this harness
        if armed:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(143)
    signal.signal(number, on_signal)
    stop = threading.Event()
    def sender():
        pace = random.Random(seed)
        while not stop.is_set():
            time.sleep(pace.uniform(0.00005, 0.002))
            os.kill(os.getpid(), number)
    threading.Thread(target=sender, daemon=True).start()
    pick, errors, written, started = random.Random(seed), [], 0, time.monotonic()
    digest = lambda i: i.to_bytes(32, "big")
    while time.monotonic() - started < 3:
        choice = pick.random()
        try:
            armed = True
            if choice < 0.5:
                cache.write(digest(written), fp, b"blob %d" % written)
                written += 1
            elif choice < 0.6:
                cache.flush()
            elif choice < 0.9:
                cache.read(digest(pick.randrange(max(written, 1))), fp)
            else:
                cache.invalidate_impacted([1], [digest(pick.randrange(max(written, 1)))], fp)
            armed = False
        except (KeyboardInterrupt, SystemExit):
            armed = False
        except Exception as error:
            armed = False
            errors.append(f"{type(error).__name__}: {error}")
    stop.set()
    cache.close()
    print(len(errors), sorted(set(errors))[:3])
    """
)


@pytest.mark.parametrize("seed", [3, 5])
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_storm_of_signals_in_one_process_leaves_no_call_failing(
    tmp_path: Path, seed: int, name: str
) -> None:
    # An interrupted read could leave a read lock behind on the thread's connection:
    # later flush() and invalidate_impacted() calls failed at once with CacheBusyError
    # (SQLITE_BUSY_SNAPSHOT) although no other process was there. SIGTERM turned into
    # SystemExit by the application was not held at all.
    result = run_script(SIGNAL_STORM, str(tmp_path), str(seed), name, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "0 []"


@pytest.mark.parametrize(
    "how", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"]
)
def test_a_cache_is_not_copied_or_pickled_and_stays_open(tmp_path: Path, how: Any) -> None:
    # A shallow copy shared the pool and queue, and closed them when collected.
    fp = DeviceFingerprint.from_parts(1, 2, "copy")
    with PipelineCache.open(tmp_path / "cache.sqlite3") as cache:
        cache.write(b"\1" * 32, fp, b"kept")
        with pytest.raises(TypeError, match=r"PipelineCache\.open\(.*cache\.sqlite3"):
            how(cache)
        gc.collect()
        cache.write(b"\2" * 32, fp, b"after")
        cache.flush()
        assert cache.read(b"\1" * 32, fp) == b"kept"


def test_a_cache_passed_to_a_spawned_process_says_to_open_it_by_path(tmp_path: Path) -> None:
    with PipelineCache.open(tmp_path / "cache.sqlite3") as cache:
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool, pytest.raises(TypeError, match=r"PipelineCache\.open\("):
            pool.apply(repr, (cache,))


def test_ending_a_transaction_of_a_closed_connection_raises_nothing(tmp_path: Path) -> None:
    # An interrupted close left a transaction's generator ending on a closed connection:
    # get_autocommit raised ConnectionClosedError there ("Exception ignored in ...").
    from vyre_sqlcache._connections import end_transaction

    connection = apsw.Connection(str(tmp_path / "c.sqlite3"))
    connection.execute("BEGIN")
    connection.close()
    end_transaction(connection)


def test_a_process_at_its_thread_limit_keeps_a_working_cache(
    tmp_path: Path, fingerprint: DeviceFingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At RLIMIT_NPROC (or out of memory) Thread.start raises RuntimeError: open() raised
    # it (a file left behind), and so did the first read (the snapshot reaper's start).
    path = tmp_path / "cache.sqlite3"
    digests = [os.urandom(32) for _ in range(3)]
    refuse_threads(monkeypatch)
    with PipelineCache.open(path) as cache:
        for digest in digests:
            cache.write(digest, fingerprint, digest * 4)
        assert [cache.read(d, fingerprint) for d in digests] == [d * 4 for d in digests]
        cache.flush()
        assert cache.invalidate_impacted([1, 0, 0], digests, fingerprint) == 1
    monkeypatch.undo()
    with PipelineCache.open(path) as cache:
        assert [cache.read(d, fingerprint) for d in digests] == [
            None,
            *(d * 4 for d in digests[1:]),
        ]
