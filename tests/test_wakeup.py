"""How the package's background threads are woken and started (`_wakeup`)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from vyre_sqlcache import _wakeup


def test_a_wakeup_set_before_the_wait_returns_at_once_until_cleared() -> None:
    wake = _wakeup.Wakeup()
    wake.set()
    wake.set()
    assert wake.wait(5)
    wake.clear()
    started = time.monotonic()
    assert not wake.wait(0.05)
    assert time.monotonic() - started >= 0.04


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_wakeup_wait_without_time_left_only_looks(timeout: float) -> None:
    # (threading.Event accepts a negative timeout; SimpleQueue.get raises ValueError)
    wake = _wakeup.Wakeup()
    assert not wake.wait(timeout)
    wake.set()
    assert wake.wait(timeout)


def test_a_wakeup_wakes_a_waiting_thread() -> None:
    wake = _wakeup.Wakeup()
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(wake.wait(30)))
    waiter.start()
    time.sleep(0.05)
    wake.set()
    waiter.join(10)
    assert woken == [True]


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_started_thread_blocks_asynchronous_signals_and_the_caller_keeps_its_mask() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    masks: list[set[signal.Signals]] = []

    def look() -> None:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, ()))

    thread = threading.Thread(target=look)
    _wakeup.start(thread)
    thread.join(10)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before
    assert {signal.SIGALRM, signal.SIGINT, signal.SIGTERM} <= masks[0]
    assert not {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT} & masks[0]
