"""``python -m benchmarks.remote``: the shared tier on a loopback redis-server.

Measures, with corpus blobs (real compiler output cut to size):

- a read served by the remote (a local miss, then GET, verification and admission)
  at 4 KiB, 64 KiB and 1 MiB, against a local hit and a local miss (no remote);
  with the remote's zstd on and off;
- ``get_many`` of 100 keys against one ``get``, all served by the remote, and the
  bare MGET of 100 against one GET;
- the caller's ``write()`` p99 with the upload queue against local only;
- a dead server (refused port), a black-holed one (a listening socket whose backlog
  is full, so connects hang) and a killed one: what the first read adds to a local
  miss, and what each read adds while the breaker is open.

Every figure is the median over ``--rounds`` rounds; the parser used by redis-py
(hiredis or its pure-Python one) is named. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.corpus import DEFAULT_TARBALL, unpack
from tests.redis_server import RedisServer, free_port
from vyre_sqlcache import DeviceFingerprint, PipelineCache, PipelineCacheKey, RemoteSettings

FP = DeviceFingerprint.from_parts(0x10DE, 0x2684, "remote bench")
SIZES = {"4 KiB": 4 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20}


def corpus_bytes(folder: Path) -> bytes:
    root = unpack(DEFAULT_TARBALL, folder / "corpus")
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


class Blobs:
    """Distinct corpus slices of a size (each starts elsewhere in the corpus)."""

    def __init__(self, corpus: bytes) -> None:
        self.corpus = corpus
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.corpus):
            self.offset = (self.offset + 4093) % max(1, len(self.corpus) - size)
        blob = self.corpus[self.offset : self.offset + size]
        self.offset += 9973  # slices overlap, at other offsets: distinct blobs
        return blob


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1000


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def read_latency(
    folder: Path, server: RedisServer, blobs: Blobs, size: int, n: int, compress: bool
) -> dict[str, float]:
    """Median µs of a remote hit, a local hit and a local miss, `n` keys each."""
    digests = [os.urandom(32) for _ in range(n)]
    server.client().flushall()
    name = time.time_ns()
    tier = RemoteSettings(server.url, compress=compress)
    with PipelineCache.open(folder / f"w{name}.sqlite3", remote=tier) as writer:
        for digest in digests:
            writer.write(digest, FP, blobs.take(size))
        writer.flush()
    # A fresh reader with an empty file: every read is a local miss served by the remote.
    with PipelineCache.open(folder / f"r{name}.sqlite3", remote=server.url) as reader:
        reader.read(os.urandom(32), FP)  # connect first: the first-read cost is measured below
        remote_hit = [timed(lambda d=d: reader.read(d, FP)) for d in digests]
        reader.flush()
        local_hit = [timed(lambda d=d: reader.read(d, FP)) for d in digests]
        stats = reader.stats().remote
        assert stats is not None and stats.hits == n and stats.rejected == 0, stats
    with PipelineCache.open(folder / f"r{name}.sqlite3", remote=None) as local:
        local_miss = [timed(lambda: local.read(os.urandom(32), FP)) for _ in range(n)]
    return {
        "remote_hit": statistics.median(remote_hit),
        "local_hit": statistics.median(local_hit),
        "local_miss": statistics.median(local_miss),
    }


def batch_latency(folder: Path, server: RedisServer, blobs: Blobs, n: int) -> dict[str, float]:
    """get_many of 100 remote hits against one get; MGET of 100 against one GET."""
    server.client().flushall()
    keys = [
        PipelineCacheKey(os.urandom(32), os.urandom(32), 0, (64, 1, 1), 0, "vulkan")
        for _ in range(100 * n + n)
    ]
    name = time.time_ns()
    with PipelineCache.open(folder / f"w{name}.sqlite3", remote=server.url) as writer:
        # In chunks that the upload queue holds (it drops what does not fit, by design),
        # waiting for each to be sent: every key must be on the server.
        for start in range(0, len(keys), 500):
            writer.put_many([(k, blobs.take(4096)) for k in keys[start : start + 500]], FP)
            writer.flush()
            while (writer.stats().remote or sys.exit("no remote")).queued:
                time.sleep(0.01)
        remote = writer.stats().remote
        assert remote is not None and remote.queue_drops == 0 and remote.unsent == 0, remote
    many: list[float] = []
    single: list[float] = []
    with PipelineCache.open(folder / f"r{name}.sqlite3", remote=server.url) as reader:
        reader.get(keys[0], FP)
        for i in range(n - 1):
            batch = keys[n + 100 * i : n + 100 * (i + 1)]
            got: list[Any] = []
            # Each call timed alone: the hits it admits are committed (untimed) before the
            # next, so no call shares the two cores with the previous one's commit.
            many.append(timed(lambda b=batch, g=got: g.extend(reader.get_many(b, FP))))
            reader.flush()
            single.append(timed(lambda k=keys[i + 1], g=got: g.append(reader.get(k, FP))))
            reader.flush()
            # Remote hits, all of them: a miss would make the figure a mix.
            assert None not in got, f"batch {i}: {got.count(None)} of 101 keys missed"
    client = server.client()
    names = [f"vyre-sqlcache:v1:{k.entry_key(FP).hex()}" for k in keys]
    mget = [timed(lambda i=i: client.mget(names[100 * i : 100 * (i + 1)])) for i in range(n)]
    get = [timed(lambda i=i: client.get(names[i])) for i in range(n)]
    return {
        "get_many_100": statistics.median(many),
        "get_1": statistics.median(single),
        "mget_100": statistics.median(mget),
        "get_raw_1": statistics.median(get),
    }


def write_latency(
    folder: Path, server: RedisServer, blobs: Blobs, count: int, remote: bool
) -> dict[str, float]:
    items = [(os.urandom(32), blobs.take(4096)) for _ in range(count)]
    calls: list[float] = []
    with PipelineCache.open(
        folder / f"wl{time.time_ns()}.sqlite3",
        max_bytes=None,
        remote=server.url if remote else None,
    ) as cache:
        for digest, blob in items:
            calls.append(timed(lambda d=digest, b=blob: cache.write(d, FP, b)))
        cache.flush()
    return {"p50": percentile(calls, 0.5), "p99": percentile(calls, 0.99)}


class BlackHole:
    """A listening socket with a full backlog that never accepts: connects hang."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.server.close()


def failure_costs(folder: Path, url: str, n: int) -> dict[str, float]:
    """First read and reads with the breaker open, each against a local miss (µs)."""
    path = folder / f"f{time.time_ns()}.sqlite3"
    with PipelineCache.open(path, remote=None) as local:
        local.read(os.urandom(32), FP)
        miss = statistics.median(timed(lambda: local.read(os.urandom(32), FP)) for _ in range(n))
    tier = RemoteSettings(url, breaker_cooldown_s=600)
    with PipelineCache.open(path, remote=tier) as cache:
        first = timed(lambda: cache.read(os.urandom(32), FP))
        for _ in range(5):
            cache.read(os.urandom(32), FP)  # until the breaker opens
        state = (cache.stats().remote or sys.exit("no remote")).breaker
        opened = statistics.median(timed(lambda: cache.read(os.urandom(32), FP)) for _ in range(n))
    return {
        "first_read_added": first - miss,
        "open_read_added": opened - miss,
        "local_miss": miss,
        "breaker": state,  # type: ignore[dict-item]
    }


def killed_costs(folder: Path, server: RedisServer, n: int) -> dict[str, float]:
    path = folder / f"k{time.time_ns()}.sqlite3"
    with PipelineCache.open(path, remote=None) as local:
        local.read(os.urandom(32), FP)
        miss = statistics.median(timed(lambda: local.read(os.urandom(32), FP)) for _ in range(n))
    with PipelineCache.open(path, remote=RemoteSettings(server.url, breaker_cooldown_s=600)) as c:
        c.read(os.urandom(32), FP)  # connected
        server.kill()
        first = timed(lambda: c.read(os.urandom(32), FP))
        for _ in range(5):
            c.read(os.urandom(32), FP)
        opened = statistics.median(timed(lambda: c.read(os.urandom(32), FP)) for _ in range(n))
    server.start()
    return {"first_read_added": first - miss, "open_read_added": opened - miss}


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: statistics.median(r[key] for r in rounds)
        if isinstance(rounds[0][key], float)
        else rounds[0][key]
        for key in rounds[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote")
    parser.add_argument("--n", type=int, default=300, help="keys per size and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--no-hiredis", action="store_true", help="redis-py's own parser")
    args = parser.parse_args()
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    import redis.utils

    results: dict[str, Any] = {"parser": "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python"}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as name:
        folder = Path(name)
        blobs = Blobs(corpus_bytes(folder))
        with RedisServer(folder / "redis") as server:
            for label, size in SIZES.items():
                for compress in (True, False):
                    n = args.n if size < (1 << 20) else max(20, args.n // 10)
                    rounds = [
                        read_latency(folder, server, blobs, size, n, compress)
                        for _ in range(args.rounds)
                    ]
                    results[f"read {label} {'zstd' if compress else 'raw'}"] = median_of(rounds)
            results["batch"] = median_of(
                [batch_latency(folder, server, blobs, 20) for _ in range(args.rounds)]
            )
            writes: dict[str, list[dict[str, float]]] = {"local only": [], "with remote": []}
            for _ in range(args.rounds):
                writes["local only"].append(
                    write_latency(folder, server, blobs, args.writes, remote=False)
                )
                writes["with remote"].append(
                    write_latency(folder, server, blobs, args.writes, remote=True)
                )
            results["write"] = {name: median_of(r) for name, r in writes.items()}
            results["killed"] = median_of(
                [killed_costs(folder, server, 200) for _ in range(args.rounds)]
            )
        refused = f"redis://127.0.0.1:{free_port()}/0"
        results["refused"] = median_of(
            [failure_costs(folder, refused, 200) for _ in range(args.rounds)]
        )
        hole = BlackHole()
        try:
            results["black-holed"] = median_of(
                [
                    failure_costs(folder, f"redis://127.0.0.1:{hole.port}/0", 200)
                    for _ in range(args.rounds)
                ]
            )
        finally:
            hole.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
