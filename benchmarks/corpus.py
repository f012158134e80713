"""Compression on real compiler output: ``python -m benchmarks.corpus``.

Unpacks ``shared/corpus/gpu-artifacts.tar.xz`` (what Triton 3.6 and CuPy 14.2 wrote
into their caches on an H200) into a temporary folder and stores it two ways:

- ``files``: every file of a kernel as its own entry, a kernel's files in one batch
  (as a Triton-like client would store its cache folder);
- ``kernels``: one blob per kernel (its files concatenated, each behind its name and
  length).

Stores: vyre-sqlcache with ``compression="off"`` and ``"auto"`` (zstd-3 where it
pays, dictionaries trained per scope), the file-per-blob port of vyre's cache
(``files_store``) and diskcache. Figures: bytes on disk per raw byte; write cost
(populate + flush); first read of every key after a fresh open (page cache warm),
overall and for the corpus's blobs of 48-80 KiB and for 64 KiB of random bytes;
cold start (every file of the store fsynced and dropped from the page cache with
``posix_fadvise(DONTNEED)``, then open + read every key in random order); and what
dictionaries add over plain zstd-3 per entry, on blobs under 16 KiB and overall.
Each timed figure is the median of ``--rounds`` rounds, stores in rotated order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from benchmarks import runner
from benchmarks.stores import DiskcacheStore, FilesStore, FingerprintSpec, Store, VyreStore
from benchmarks.workloads import drop_page_cache, gc_paused

DEFAULT_TARBALL = (
    Path(__file__).resolve().parent.parent.parent / "shared/corpus/gpu-artifacts.tar.xz"
)
KIB = 1024
SMALL = 16 * KIB
#: The corpus's blobs of about 64 KiB (the size of the warm-read target).
MID = (48 * KIB, 80 * KIB)
RANDOM_64K_COUNT = 300

STORES = ("vyre-off", "vyre-auto", "files", "diskcache")


class VyreCompressed(VyreStore):
    """vyre-sqlcache with a given compression setting, each open a fresh process's view
    (no dictionaries loaded yet)."""

    def __init__(self, root: Path, fingerprint: FingerprintSpec, compression: str) -> None:
        super().__init__(root, fingerprint)
        self.compression = compression
        self.name = f"vyre-{compression}"  # type: ignore[misc]

    def open(self) -> None:
        import vyre_sqlcache
        from vyre_sqlcache import _codec

        _codec.LOADED.clear()
        self._cache = vyre_sqlcache.PipelineCache.open(
            self.root / "cache.sqlite3", compression=self.compression
        )

    def stored(self) -> list[tuple[int, int]]:
        """(blob_size, stored_size) of every entry."""
        (result,) = self._cache.query("SELECT blob_size, stored_size FROM pipelines_v")
        return [tuple(row) for row in result.rows]

    def totals(self) -> dict[str, Any]:
        stats = self._cache.stats()
        return {
            "blob_bytes": stats.blob_bytes,
            "stored_bytes": stats.stored_bytes,
            "dictionary_bytes": stats.dictionary_bytes,
            "ratio": stats.compression_ratio,
        }


def make(name: str, root: Path, fingerprint: FingerprintSpec) -> Store:
    if name.startswith("vyre-"):
        return VyreCompressed(root, fingerprint, name.removeprefix("vyre-"))
    return {"files": FilesStore, "diskcache": DiskcacheStore}[name](root, fingerprint)


# -- the data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    digest: bytes
    blob: bytes
    group: int  # written in one batch with the items of its group


def unpack(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # pragma: no cover - Python before 3.10.12
            archive.extractall(into)
    return into


def kernels(root: Path) -> list[tuple[str, list[Path]]]:
    """(name, files) per kernel: each Triton cache folder, each CuPy cubin."""
    found: list[tuple[str, list[Path]]] = []
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(top.iterdir()):
            if entry.is_dir():
                found.append((f"{top.name}/{entry.name}", sorted(entry.iterdir())))
            elif entry.is_file() and entry.name != "manifest.json":
                found.append((f"{top.name}/{entry.name}", [entry]))
    return found


def item_sets(root: Path, limit: int | None = None) -> dict[str, list[Item]]:
    def digest(text: str) -> bytes:
        return blake3.blake3(text.encode()).digest()

    per_file: list[Item] = []
    per_kernel: list[Item] = []
    for group, (name, files) in enumerate(kernels(root)[:limit]):
        parts = []
        for path in files:
            data = path.read_bytes()
            per_file.append(Item(digest(f"file:{name}/{path.name}"), data, group))
            label = path.name.encode()
            parts.append(struct.pack("<HI", len(label), len(data)) + label + data)
        per_kernel.append(Item(digest(f"kernel:{name}"), b"".join(parts), group))
    return {"files": per_file, "kernels": per_kernel}


def random_items(count: int, size: int) -> list[Item]:
    return [
        Item(blake3.blake3(b"random:%d" % i).digest(), os.urandom(size), i) for i in range(count)
    ]


def groups(items: Sequence[Item]) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        if batch and item.group != batch[-1].group:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# -- measurements -------------------------------------------------------------------------


def populate(store: Store, items: Sequence[Item]) -> float:
    """Write every item, a group a batch, then flush; seconds."""
    start = time.perf_counter()
    with store:
        for batch in groups(items):
            store.write_batch([(item.digest, item.blob) for item in batch])
        store.flush()
    return time.perf_counter() - start


def read_all(store: Store, items: Sequence[Item], order: Sequence[int]) -> list[int]:
    """ns per read, in `order`; raises if a blob reads back wrong."""
    times: list[int] = []
    clock = time.perf_counter_ns
    with gc_paused():
        for index in order:
            item = items[index]
            start = clock()
            blob = store.read(item.digest)
            times.append(clock() - start)
            if blob != item.blob:
                raise AssertionError(f"{store.name}: item {index} read back wrong")
    return times


def first_reads(store: Store, items: Sequence[Item], seed: str) -> tuple[list[int], list[int]]:
    """ns per read of every item once, in a seeded random order; and that order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    with store:
        return read_all(store, items, order), order


def storage_read_bytes() -> int | None:
    """Bytes this process has had read from storage (`/proc/self/io`), page faults included."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def open_and_read(store: Store, items: Sequence[Item], seed: str) -> float:
    """ms to open the store, read every item in a seeded random order, and close it."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    start = time.perf_counter()
    with store:
        read_all(store, items, order)
    return (time.perf_counter() - start) * 1e3


def cold_start(store: Store, items: Sequence[Item], seed: str) -> tuple[float, int | None, float]:
    """ms to open and read every item after the store's files left the page cache; the
    bytes read from storage meanwhile; and ms for the same once more, its pages cached
    (what the cold start costs in CPU alone)."""
    runner.settle()
    drop_page_cache(store.files())
    before = storage_read_bytes()
    cold = open_and_read(store, items, seed)
    after = storage_read_bytes()
    read = None if before is None or after is None else after - before
    return cold, read, open_and_read(store, items, seed)


def plain_zstd_bytes(blobs: Sequence[bytes], level: int = 3) -> int:
    """Bytes of each blob compressed alone with zstd (raw where that is not smaller)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return sum(min(len(compressor.compress(blob)), len(blob)) for blob in blobs)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run(
    tarball: Path, workdir: Path, rounds: int, progress: Any, limit: int | None = None
) -> dict[str, Any]:
    fingerprint = FingerprintSpec()
    corpus = unpack(tarball, workdir / "corpus")
    sets = item_sets(corpus, limit)
    sets["random64k"] = random_items(RANDOM_64K_COUNT if limit is None else limit, 64 * KIB)
    results: dict[str, Any] = {"sets": {}, "stores": list(STORES), "rounds": rounds}
    for set_name, items in sets.items():
        stores = STORES if set_name != "random64k" else ("vyre-off", "vyre-auto", "files")
        raw = sum(len(item.blob) for item in items)
        entry: dict[str, Any] = {"entries": len(items), "raw_bytes": raw, "stores": {}}
        results["sets"][set_name] = entry
        roots = {name: workdir / set_name / name for name in stores}
        for name in stores:
            progress(f"{set_name}: populating {name}")
            seconds = [populate(make(name, roots[name], fingerprint), items)]
            figures: dict[str, Any] = {
                "disk_bytes": make(name, roots[name], fingerprint).disk_bytes(),
            }
            figures["disk_per_raw"] = figures["disk_bytes"] / raw
            figures["write_seconds"] = seconds[0]
            if name.startswith("vyre-"):
                with make(name, roots[name], fingerprint) as store:
                    assert isinstance(store, VyreCompressed)
                    figures["totals"] = store.totals()
                    sizes = store.stored()
                small = [(b, s) for b, s in sizes if b < SMALL]
                figures["small_stored_bytes"] = sum(s for _, s in small)
                figures["small_raw_bytes"] = sum(b for b, _ in small)
            entry["stores"][name] = figures
        # write cost again, on fresh folders, after the first populate warmed everything
        for round_index in range(rounds):
            order = runner.rotated(list(stores), round_index)
            for name in order:
                scratch = workdir / "scratch" / set_name / name
                shutil.rmtree(scratch, ignore_errors=True)
                runner.settle()
                entry["stores"][name].setdefault("write_rounds", []).append(
                    populate(make(name, scratch, fingerprint), items)
                )
                shutil.rmtree(scratch, ignore_errors=True)
                progress(f"{set_name}: round {round_index + 1} write {name}")
        for round_index in range(rounds):
            order = runner.rotated(list(stores), round_index)
            for name in order:
                runner.settle()
                times, order = first_reads(
                    make(name, roots[name], fingerprint), items, f"{set_name}:{round_index}"
                )
                figures = entry["stores"][name]
                figures.setdefault("first_read_us", []).append(median(times) / 1e3)
                mid = [
                    t
                    for t, index in zip(times, order, strict=True)
                    if MID[0] <= len(items[index].blob) < MID[1]
                ]
                if mid:
                    figures.setdefault("first_read_mid_us", []).append(median(mid) / 1e3)
                cold, read, warm = cold_start(
                    make(name, roots[name], fingerprint), items, f"cold:{round_index}"
                )
                figures.setdefault("cold_start_ms", []).append(cold)
                figures.setdefault("warm_start_ms", []).append(warm)
                if read is not None:
                    figures.setdefault("cold_read_bytes", []).append(read)
                progress(f"{set_name}: round {round_index + 1} reads {name}")
        for figures in entry["stores"].values():
            for key in (
                "write_rounds",
                "first_read_us",
                "first_read_mid_us",
                "cold_start_ms",
                "warm_start_ms",
                "cold_read_bytes",
            ):
                if key in figures:
                    figures[key + "_median"] = median(figures[key])
        if set_name != "random64k":
            blobs = [item.blob for item in items]
            small = [b for b in blobs if len(b) < SMALL]
            entry["plain_zstd3_bytes"] = plain_zstd_bytes(blobs)
            entry["plain_zstd3_small_bytes"] = plain_zstd_bytes(small)
            entry["small_entries"] = len(small)
    return results


# -- the report -----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _reach(cpu_on: float, cpu_off: float, read_on: float, read_off: float) -> str:
    """Where compression makes a cold start 2x faster, if a cold start costs its CPU time
    (ms, the same reads with the pages cached) plus its bytes read over the storage's
    bandwidth: 2 * (cpu_on + read_on / bw) <= cpu_off + read_off / bw."""
    saved = read_off - 2 * read_on  # bytes
    spare = 2 * cpu_on - cpu_off  # ms
    if saved <= 0:
        if spare < 0:
            return f"on storage faster than {saved / 1e6 / (spare / 1e3):.0f} MB/s"
        return "at no speed of storage (it reads as many bytes)"
    if spare <= 0:
        return "at any speed of storage"
    return f"on storage slower than {saved / 1e6 / (spare / 1e3):.0f} MB/s"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Compression on the corpus",
        "",
        f"Medians of {results['rounds']} rounds; {results.get('environment', '')}",
        "",
    ]
    for set_name, entry in results["sets"].items():
        stores = entry["stores"]
        lines += [
            f"## {set_name}: {entry['entries']} entries, {entry['raw_bytes'] / 1e6:.1f} MB raw",
            "",
            "| store | disk per raw byte | disk vs files | write + flush | first read (median) "
            "| first read 48-80 KiB | cold start |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        files_disk = stores.get("files", {}).get("disk_bytes")
        for name, f in stores.items():
            mid = f.get("first_read_mid_us_median")
            cells = [
                name,
                f"{f['disk_per_raw']:.3f}",
                f"{_ratio(files_disk, f['disk_bytes'])} less",
                _ms(f["write_rounds_median"]),
                f"{f['first_read_us_median']:.1f} µs",
                "-" if mid is None else f"{mid:.1f} µs",
                f"{f['cold_start_ms_median']:.0f} ms",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        on, off = stores.get("vyre-auto"), stores.get("vyre-off")
        if not (on and off):
            lines.append("")
            continue
        cold = _ratio(off["cold_start_ms_median"], on["cold_start_ms_median"])
        read = _ratio(on["first_read_us_median"], off["first_read_us_median"])
        mid = _ratio(on.get("first_read_mid_us_median"), off.get("first_read_mid_us_median"))
        write = _ratio(on["write_rounds_median"], off["write_rounds_median"])
        lines += [
            "",
            f"- compression on against off: cold start {cold} faster; first read {read} the "
            f"time (48-80 KiB: {mid}); write + flush {write} the time",
        ]
        read_on, read_off = on.get("cold_read_bytes_median"), off.get("cold_read_bytes_median")
        if read_on is not None and read_off is not None:
            # cold = CPU (the same reads with the pages cached) + bytes read / bandwidth:
            # compression wins 2x wherever 2 * cold_on <= cold_off.
            cpu_on, cpu_off = on["warm_start_ms_median"], off["warm_start_ms_median"]
            lines.append(
                f"- cold start read {read_on / 1e6:.1f} MB from storage against "
                f"{read_off / 1e6:.1f} MB ({_ratio(read_off, read_on)} less); the same reads "
                f"with the pages cached took {cpu_on:.0f} ms against {cpu_off:.0f} ms, so "
                f"a cold start is 2x faster {_reach(cpu_on, cpu_off, read_on, read_off)}"
            )
        totals = on["totals"]
        stored = totals["stored_bytes"] + totals["dictionary_bytes"]
        lines.append(
            f"- stored {totals['stored_bytes']:,} bytes for {totals['blob_bytes']:,} "
            f"({totals['ratio']:.2f}x), plus {totals['dictionary_bytes']:,} of dictionaries"
        )
        if "plain_zstd3_bytes" in entry:
            lines.append(
                f"- against plain zstd-3 per entry: blobs under 16 KiB "
                f"({entry['small_entries']}) {entry['plain_zstd3_small_bytes']:,} bytes, ours "
                f"{on['small_stored_bytes']:,}: "
                f"{_ratio(entry['plain_zstd3_small_bytes'], on['small_stored_bytes'])} smaller; "
                f"every blob {entry['plain_zstd3_bytes']:,}, ours {stored:,} with the "
                f"dictionaries: {_ratio(entry['plain_zstd3_bytes'], stored)} smaller"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__)
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--kernels", type=int, default=None, help="only the first N kernels (a smoke run)"
    )
    args = parser.parse_args(argv)
    if not args.tarball.is_file():
        parser.error(f"no corpus at {args.tarball}; pass --tarball")
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vyre-corpus-", dir=base))

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        results = run(args.tarball, workdir, args.rounds, progress, args.kernels)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import platform

    import apsw

    results["environment"] = (
        f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
        f"CPython {platform.python_version()}, SQLite {apsw.sqlite_lib_version()}, "
        f"filesystem {runner.filesystem(base)}, {time.perf_counter() - started:.0f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    text = markdown(results)
    (args.out / "corpus.md").write_text(text + "\n", "utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
