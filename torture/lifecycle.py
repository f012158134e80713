"""Process-lifecycle trials: fork with threads at work, and Ctrl-C at random moments.

Fork trial: a process with the cache open runs a reader, a writer and the
checkpoint thread, then forks (raw `os.fork()` or `multiprocessing`'s fork start
method, daemonic or not); both sides go on writing and flushing, and one closes or
exits first. Every write acknowledged by `flush()`, on either side, is recorded, and
so is every `write()` that returned before a normal exit, a close, or the return of
a multiprocessing worker (their queues are committed then); afterwards a fresh
process must read each with the right bytes, and the file must pass
`integrity_check`. A trial that does not finish in time is a hang.

Interrupt trial: one process calls the cache in a loop while SIGINT arrives at
random moments; it catches KeyboardInterrupt and carries on. Afterwards (and
while it runs) another process must be able to write at once, and every flushed
write must be readable.

Run one trial by hand: `python -m torture.lifecycle fork PATH SEED VARIANT`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from vyre_sqlcache import CacheError, DeviceFingerprint, PipelineCache

FINGERPRINT = DeviceFingerprint.from_parts(0x10DE, 0x2684, "lifecycle")
FORK_VARIANTS = ("parent-closes", "child-closes", "parent-exits", "mp-fork", "mp-daemon")
TRIAL_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent


def digest_of(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def blob_of(digest: bytes) -> bytes:
    size = 200 + digest[0] * 40
    return (digest * (size // 32 + 1))[:size]


def _ack(acks: Path, digests: Sequence[bytes]) -> None:
    """Record acknowledged writes (one line each, appended atomically)."""
    if digests:
        with open(acks, "a") as file:
            file.write("".join(d.hex() + "\n" for d in digests))


def _write_and_flush(cache: PipelineCache, acks: Path, tag: str, count: int) -> None:
    digests = [digest_of(tag, os.getpid(), i, time.time_ns()) for i in range(count)]
    for digest in digests:
        cache.write(digest, FINGERPRINT, blob_of(digest))
    cache.flush()
    _ack(acks, digests)


def _write_unflushed(cache: PipelineCache, acks: Path, tag: str, count: int) -> None:
    """Writes acknowledged by `write()` returning: the process ends normally (or closes
    the cache) before any flush, and must keep them."""
    digests = [digest_of(tag, os.getpid(), i, time.time_ns()) for i in range(count)]
    for digest in digests:
        cache.write(digest, FINGERPRINT, blob_of(digest))
    _ack(acks, digests)


class _Workers:
    """A reader and a writer thread on the cache until stopped."""

    def __init__(self, cache: PipelineCache, acks: Path) -> None:
        self.cache = cache
        self.acks = acks
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                self.cache.read(digest_of("seed", random.randrange(50)), FINGERPRINT)
            except CacheError:
                return

    def _write(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            try:
                _write_and_flush(self.cache, self.acks, f"thread{round_}", 5)
            except CacheError:
                return
            round_ += 1

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TRIAL_TIMEOUT_S)


def _child_work(cache: PipelineCache, acks: Path, close: bool) -> None:
    """A multiprocessing child: the inherited cache object, used on (fork does not pickle)."""
    _write_and_flush(cache, acks, "child", 20)
    _write_unflushed(cache, acks, "child-unflushed", 10)
    if close:
        cache.close()


def fork_trial(path: Path, seed: int, variant: str) -> None:
    """One fork trial in this (fresh) process; raises if the child fails or hangs."""
    rng = random.Random(seed)
    acks = Path(str(path) + ".acks")
    cache = PipelineCache.open(path, max_bytes=None)
    cache.write_many([(digest_of("seed", i), b"s" * 3000) for i in range(50)], FINGERPRINT)
    # Over 16 MiB in the log wakes the checkpoint thread: it is at work during the fork.
    cache.write_many([(digest_of("bulk", i), os.urandom(65536)) for i in range(270)], FINGERPRINT)
    workers = _Workers(cache, acks)
    time.sleep(rng.uniform(0, 0.03))
    if variant.startswith("mp-"):
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_child_work,
            args=(cache, acks, rng.random() < 0.5),
            daemon=variant == "mp-daemon",
        )
        process.start()
        _write_and_flush(cache, acks, "parent", 10)
        process.join(TRIAL_TIMEOUT_S)
        if process.exitcode != 0:
            raise RuntimeError(f"the child ended with {process.exitcode}")
        workers.join()
        cache.close()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # This child's own use of the inherited cache object.
            _write_and_flush(cache, acks, "child", 20)
            if variant != "parent-closes":
                cache.close()
            else:
                time.sleep(0.05)  # the parent closes meanwhile
                _write_and_flush(cache, acks, "child-late", 10)
                cache.close()
            code = 0
        except BaseException as error:
            print(f"child: {error!r}", file=sys.stderr)
        finally:
            os._exit(code)
    if variant == "parent-closes":
        workers.join()
        cache.close()
    elif variant == "parent-exits":
        workers.join()
        # Exit without close() or flush(): the queue is committed at exit.
        _write_unflushed(cache, acks, "parent-unflushed", 10)
    else:
        _write_and_flush(cache, acks, "parent", 10)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the child ended with status {status}")
    if variant == "child-closes":
        _write_and_flush(cache, acks, "parent-after", 10)
        workers.join()
        cache.close()


@dataclass
class ForkReport:
    """What a series of fork trials found."""

    trials: int = 0
    hangs: int = 0
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    lost: int = 0
    wrong: int = 0
    not_ok: int = 0

    @property
    def failures(self) -> int:
        return self.hangs + len(self.errors) + self.lost + self.wrong + self.not_ok

    @property
    def details(self) -> list[str]:
        return self.errors[:5]


def check_acks(path: Path) -> tuple[int, int, int, bool]:
    """(checked, lost, wrong, integrity ok) for every acknowledged write of a trial."""
    acks = Path(str(path) + ".acks")
    digests = [bytes.fromhex(line) for line in acks.read_text().split()] if acks.exists() else []
    return (len(digests), *check_digests(path, digests))


def check_digests(path: Path, digests: Sequence[bytes]) -> tuple[int, int, bool]:
    """(lost, wrong, integrity ok) for `digests`, each written with `blob_of` its bytes."""
    lost = wrong = 0
    with PipelineCache.open(path, max_bytes=None) as cache:
        for digest in digests:
            got = cache.read(digest, FINGERPRINT)
            lost += got is None
            wrong += got is not None and got != blob_of(digest)
    connection = apsw.Connection(str(path))
    try:
        ok = connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        connection.close()
    return lost, wrong, ok


def _child_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torture.lifecycle", *args]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def run_fork_trials(root: Path, trials: int, seed: int) -> ForkReport:
    """`trials` fork trials, each in a fresh process and file, variants in turn."""
    report = ForkReport()
    root = root.resolve()
    for index in range(trials):
        variant = FORK_VARIANTS[index % len(FORK_VARIANTS)]
        path = root / f"fork-{index}" / "cache.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        report.trials += 1
        try:
            done = subprocess.run(
                _child_command("fork", str(path), str(seed + index), variant),
                env=_child_env(),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=TRIAL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            report.hangs += 1
            continue
        if done.returncode != 0:
            report.errors.append(f"{variant}: {done.stderr.strip()[-300:]}")
        checked, lost, wrong, ok = check_acks(path)
        report.checked += checked
        report.lost += lost
        report.wrong += wrong
        report.not_ok += not ok
    return report


# -- interrupts ------------------------------------------------------------------------


def interrupt_trial(path: Path, seconds: float, seed: int) -> int:
    """Call the cache in a loop for `seconds` while SIGINT arrives at random; return how
    many interrupts were caught. Raises if a call fails other than by the interrupt."""
    rng = random.Random(seed)
    acks = Path(str(path) + ".acks")
    # A process started in the background inherits SIGINT ignored: the trial wants it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cache = PipelineCache.open(path, max_bytes=None)
    caught = 0
    stop = threading.Event()
    me = os.getpid()

    def interrupter() -> None:
        while not stop.is_set():
            time.sleep(rng.uniform(0, 0.002))
            os.kill(me, signal.SIGINT)

    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    round_ = 0
    pending: list[bytes] = []
    try:
        # The harness's own steps (the loop test, the count) can take an interrupt too:
        # the outer loop catches one that lands there and goes on, so only two in a row
        # within a few bytecodes could end the trial.
        while time.monotonic() < deadline:
            try:
                while time.monotonic() < deadline:
                    try:
                        step = round_ % 6
                        digest = digest_of("int", seed, round_)
                        if step == 0:
                            cache.write(digest, FINGERPRINT, blob_of(digest))
                            pending.append(digest)
                        elif step == 1:
                            cache.get_many([], FINGERPRINT)
                            cache.read(digest_of("int", seed, round_ - 1), FINGERPRINT)
                        elif step == 2:
                            cache.write_many([(digest, blob_of(digest))], FINGERPRINT)
                            pending.append(digest)
                        elif step == 3:
                            cache.invalidate_impacted(
                                [1], [digest_of("never", round_)], FINGERPRINT
                            )
                        elif step == 4:
                            cache.stats()
                        else:
                            cache.flush()
                            _ack(acks, pending)
                            pending = []
                    except KeyboardInterrupt:
                        caught += 1
                    round_ += 1
            except KeyboardInterrupt:
                caught += 1
                round_ += 1
    finally:
        # SIGINTs still on their way must not end the trial itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()
        thread.join()
    cache.flush()
    _ack(acks, pending)
    cache.close()
    return caught


@dataclass
class InterruptReport:
    """What a series of interrupt trials found."""

    trials: int = 0
    seconds: float = 0.0
    caught: int = 0
    hangs: int = 0
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    lost: int = 0
    wrong: int = 0
    not_ok: int = 0
    slowest_other_write_s: float = 0.0

    @property
    def failures(self) -> int:
        slow = self.slowest_other_write_s > 2.0
        return self.hangs + len(self.errors) + self.lost + self.wrong + self.not_ok + slow

    @property
    def details(self) -> list[str]:
        return self.errors[:5]


_OTHER_WRITER = """
import json, os, sys, time
from vyre_sqlcache import DeviceFingerprint, PipelineCache
fp = DeviceFingerprint.from_parts(1, 2, "other process")
worst = 0.0
with PipelineCache.open(sys.argv[1], max_bytes=None) as cache:
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        start = time.monotonic()
        cache.write(os.urandom(32), fp, b"x" * 1000)
        cache.flush()
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.01)
print(json.dumps({"worst": worst}))
"""


def run_interrupt_trials(root: Path, trials: int, seconds: float, seed: int) -> InterruptReport:
    """`trials` interrupt trials of `seconds` each, with another process writing throughout."""
    report = InterruptReport(seconds=seconds)
    root = root.resolve()
    for index in range(trials):
        path = root / f"interrupt-{index}" / "cache.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        PipelineCache.open(path).close()
        report.trials += 1
        other = subprocess.Popen(
            [sys.executable, "-c", _OTHER_WRITER, str(path), str(seconds + 1)],
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        try:
            done = subprocess.run(
                _child_command("interrupt", str(path), str(seconds), str(seed + index)),
                env=_child_env(),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=seconds + TRIAL_TIMEOUT_S,
            )
            if done.returncode != 0:
                report.errors.append(done.stderr.strip()[-300:])
            else:
                report.caught += json.loads(done.stdout)["caught"]
        except subprocess.TimeoutExpired:
            report.hangs += 1
        out, _ = other.communicate(timeout=seconds + TRIAL_TIMEOUT_S)
        if other.returncode != 0:
            report.errors.append("the other process's writes failed")
        else:
            worst = json.loads(out)["worst"]
            report.slowest_other_write_s = max(report.slowest_other_write_s, worst)
        checked, lost, wrong, ok = check_acks(path)
        report.checked += checked
        report.lost += lost
        report.wrong += wrong
        report.not_ok += not ok
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The hidden trial commands run in fresh processes."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fork"]:
        fork_trial(Path(args[1]), int(args[2]), args[3])
        return 0
    if args[:1] == ["interrupt"]:
        caught = interrupt_trial(Path(args[1]), float(args[2]), int(args[3]))
        print(json.dumps({"caught": caught}))
        return 0
    print("usage: python -m torture.lifecycle fork PATH SEED VARIANT | interrupt PATH S SEED")
    return 2


if __name__ == "__main__":
    sys.exit(main())
