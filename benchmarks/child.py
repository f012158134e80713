"""Measurements that need a fresh process, and the helpers that start them.

The parent starts ``python -m benchmarks.child``, sends one JSON spec line on
stdin, and reads one JSON result line from stdout. Libraries are imported
before anything is timed: the figures are those of an application that has
started, not of interpreter start-up.

Modes:

- ``open_first_read``: time opening the store and reading one key (ms);
- ``memory``: peak resident memory added by reading one blob;
- ``reader``: open, print ``ready``, wait for ``go`` on stdin, then first-read
  the given keys, reporting monotonic start and end times so that the parent
  can aggregate several readers.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.stores import FingerprintSpec, make_store

TIMEOUT_S = 900


def fingerprint_to_json(fingerprint: FingerprintSpec) -> dict[str, Any]:
    """The fingerprint as a JSON-able dict for a child's spec."""
    return asdict(fingerprint)


def _child_env() -> dict[str, str]:
    """The parent's environment, with the benchmarks' and the package's roots
    on ``PYTHONPATH`` so the child imports exactly what the parent did."""
    paths = []
    package_file = getattr(sys.modules.get("vyre_sqlcache"), "__file__", None)
    if package_file:
        paths.append(str(Path(package_file).resolve().parent.parent))
    paths.append(str(Path(__file__).resolve().parent.parent))
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _start(spec: dict[str, Any]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(spec) + "\n")
    process.stdin.flush()
    return process


def _close_stdin(process: subprocess.Popen[str]) -> None:
    """Close the child's stdin (end of its input) so ``communicate`` skips it."""
    if process.stdin is not None:
        process.stdin.close()
        process.stdin = None


def _finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=TIMEOUT_S)
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({process.returncode}): {err}")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one child to completion and return its result."""
    process = _start(spec)
    _close_stdin(process)
    return _finish(process)


def run_together(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start ``reader`` children, release them together once all are ready."""
    processes = [_start(spec) for spec in specs]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"reader did not get ready: {line!r}")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for process in processes:
            _close_stdin(process)
        return [_finish(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _current_rss() -> int:
    """Resident set size now, in bytes (Linux); the peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss()


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False if unsupported.

    Without it an earlier transient peak (imports, opening) could hide the read's.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    """Peak resident set size of this process image, in bytes.

    On Linux this is ``VmHWM``: ``ru_maxrss`` there also covers the image before
    ``exec`` (the parent's pages at fork time), which would swamp the figure.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _main() -> None:
    spec = json.loads(sys.stdin.readline())
    store = make_store(spec["store"], Path(spec["root"]), FingerprintSpec(**spec["fingerprint"]))
    mode = spec["mode"]
    result: dict[str, Any]
    if mode == "open_first_read":
        digest = bytes.fromhex(spec["digest"])
        gc.disable()
        start = time.perf_counter_ns()
        store.open()
        blob = store.read(digest)
        elapsed = time.perf_counter_ns() - start
        if blob is None:
            raise SystemExit("open_first_read: the key missed")
        result = {"ms": elapsed / 1e6}
    elif mode == "memory":
        digest = bytes.fromhex(spec["digest"])
        store.open()
        gc.collect()
        reset = _reset_peak_rss()
        before = _current_rss()
        blob = store.read(digest)
        peak = _peak_rss()
        result = {
            "bytes": 0 if blob is None else len(blob),
            "peak_extra_bytes": max(0, peak - before),
            "peak_reset": reset,
        }
    elif mode == "reader":
        raw = Path(spec["digests_file"]).read_bytes()
        digests = [raw[32 * i : 32 * i + 32] for i in spec["indices"]]
        store.open()
        print("ready", flush=True)
        sys.stdin.readline()
        gc.disable()
        misses = 0
        start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for digest in digests:
            if store.read(digest) is None:
                misses += 1
        end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        result = {"start_ns": start, "end_ns": end, "misses": misses}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    store.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main()
