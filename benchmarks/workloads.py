"""The workloads: what is timed, on which data, and how one round is measured.

Each workload lists its cases (usually one per blob size), prepares a store for
a case once (untimed), then measures one sample per round. The runner rotates
the stores' order between rounds and reports the median sample.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import blake3

from benchmarks import child
from benchmarks.stores import FingerprintSpec, Store, make_store

KIB = 1024
MIB = 1024 * 1024
T = TypeVar("T")
SMALL_BLOB = 256
"""Entry size of the many-entries workloads (scale, open_first_read_100k)."""


@dataclass(frozen=True)
class Config:
    """Everything a run depends on.

    ``quick`` shrinks every count for a smoke run; ``tiny`` shrinks them further,
    for the test suite (figures from either are not for publishing).
    """

    sizes: tuple[int, ...] = (4 * KIB, 64 * KIB, MIB)
    n: int = 1000
    rounds: int = 3
    quick: bool = False
    tiny: bool = False
    seed: int = 0
    stores: tuple[str, ...] = ("vyre-sqlcache", "files", "diskcache", "lmdb")
    workdir: Path = Path(".")
    fingerprint: FingerprintSpec = field(default_factory=FingerprintSpec)

    def pick(self, full: T, quick: T, tiny: T) -> T:
        """The setting for this run's level."""
        return tiny if self.tiny else quick if self.quick else full

    @property
    def cold_cases(self) -> tuple[tuple[int, int], ...]:
        """(count, blob size) pairs of the cold-start workload."""
        return self.pick(
            ((3000, 16 * KIB), (300, MIB)),
            ((300, 16 * KIB), (30, MIB)),
            ((30, 16 * KIB), (3, MIB)),
        )

    @property
    def durable_writes(self) -> int:
        """Write+flush pairs timed per round by ``durable_write``."""
        return self.pick(100, 10, 3)

    @property
    def subprocess_runs(self) -> int:
        """Fresh processes started per round by the subprocess workloads."""
        return self.pick(3, 1, 1)

    @property
    def open_entries(self) -> int:
        """Entries in the store of ``open_first_read_100k``."""
        return self.pick(100_000, 10_000, 1_000)

    @property
    def scale_counts(self) -> tuple[int, ...]:
        """Store sizes of the ``scale`` workload."""
        return self.pick((1_000, 100_000, 1_000_000), (1_000, 10_000), (100, 1_000))

    @property
    def scale_sample(self) -> int:
        """First reads timed per round by ``scale`` (a random sample of keys)."""
        return self.pick(10_000, 1_000, 100)

    @property
    def memory_blob(self) -> int:
        """Size of the blob read by ``memory_64mib``."""
        return self.pick(64 * MIB, 64 * MIB, 16 * MIB)

    def multiproc_count(self, size: int) -> int:
        """Keys shared out among the readers: more for small blobs, so the
        timed window (0.1 s or more for one process) is long compared with waking
        the processes."""
        if size <= 4 * KIB:
            return self.n * self.pick(40, 10, 1)
        return self.n * self.pick(10, 10, 1) if size <= 64 * KIB else self.n


@dataclass(frozen=True)
class Dataset:
    """``count`` entries of ``size`` random bytes, regenerable from the seed.

    Bytes come from BLAKE3 in XOF mode keyed by (seed, size, index): seeded,
    incompressible, four times faster than ``random.randbytes``, and any blob
    can be regenerated alone to check a read.
    """

    count: int
    size: int
    seed: int
    tag: str = "entry"

    def digest(self, index: int) -> bytes:
        """The 32-byte program digest of entry ``index``."""
        material = f"{self.tag}:digest:{self.seed}:{self.size}:{index}"
        return blake3.blake3(material.encode()).digest()

    def blob(self, index: int) -> bytes:
        """The blob of entry ``index``."""
        material = f"blob:{self.seed}:{self.size}:{index}"
        return blake3.blake3(material.encode()).digest(length=self.size)

    @cached_property
    def digests(self) -> list[bytes]:
        """Every program digest, in index order."""
        return [self.digest(index) for index in range(self.count)]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(digest, blob) pairs, generated lazily."""
        for index in range(self.count):
            yield self.digests[index], self.blob(index)

    @property
    def label(self) -> str:
        """Directory-safe name."""
        return f"{self.tag}-{self.count}x{self.size}"


@lru_cache(maxsize=32)
def dataset_of(count: int, size: int, seed: int, tag: str = "entry") -> Dataset:
    """A shared ``Dataset``, so its digest list is computed once per run."""
    return Dataset(count, size, seed, tag)


class Fixtures:
    """Populated stores shared by the read-only workloads of one run."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._roots: dict[tuple[str, Dataset, bool], Path] = {}
        self.timings: list[dict[str, Any]] = []
        """How long each fixture took to populate (informative, not a result)."""

    def store(self, name: str, root: Path) -> Store:
        """A (closed) adapter for store ``name`` over ``root``."""
        return make_store(name, root, self.config.fingerprint)

    def populated(self, name: str, dataset: Dataset, durable: bool = False) -> Path:
        """Root of store ``name`` filled with ``dataset`` (built once, then reused)."""
        key = (name, dataset, durable)
        if key not in self._roots:
            suffix = "-durable" if durable else ""
            root = self.config.workdir / "fixtures" / name / (dataset.label + suffix)
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            with self.store(name, root) as store:
                store.populate(dataset.items(), durable=durable)
            self.timings.append(
                {
                    "store": name,
                    "count": dataset.count,
                    "size": dataset.size,
                    "durable": durable,
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
            verify(self.store(name, root), dataset)
            self._roots[key] = root
        return self._roots[key]

    def digests_file(self, dataset: Dataset) -> Path:
        """A file of the dataset's digests (32 bytes each) for child processes."""
        path = self.config.workdir / "fixtures" / f"{dataset.label}.digests"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(dataset.digests))
        return path


def verify(store: Store, dataset: Dataset, samples: int = 16) -> None:
    """Read back a spread of entries and compare them byte for byte."""
    step = max(1, dataset.count // samples)
    with store:
        for index in range(0, dataset.count, step):
            if store.read(dataset.digest(index)) != dataset.blob(index):
                raise AssertionError(f"{store.name}: entry {index} read back wrong")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC off while timing (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def shuffled(count: int, seed: str) -> list[int]:
    """``range(count)`` in a seeded random order (same for every store)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def time_reads(store: Store, digests: Sequence[bytes]) -> tuple[list[int], int]:
    """Time each read (ns); also count the misses."""
    times: list[int] = []
    misses = 0
    clock = time.perf_counter_ns
    with gc_paused():
        for digest in digests:
            start = clock()
            blob = store.read(digest)
            times.append(clock() - start)
            if blob is None:
                misses += 1
    return times, misses


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict the files' pages: ``fsync`` (dirty pages stay) then ``DONTNEED``."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class Case:
    """One row of a workload's table."""

    label: str
    params: dict[str, Any]


@dataclass
class Sample:
    """One round's measurement of one store."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


class Workload(ABC):
    """A timed scenario; subclasses fill in the class attributes and methods."""

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str]
    better: ClassVar[str] = "lower"
    description: ClassVar[str]
    headline: ClassVar[bool] = False
    only_stores: ClassVar[tuple[str, ...] | None] = None
    repeat: ClassVar[bool] = True
    """False for deterministic measurements, taken once."""

    def __init__(self, config: Config, fixtures: Fixtures) -> None:
        self.config = config
        self.fixtures = fixtures

    @abstractmethod
    def cases(self) -> list[Case]:
        """The rows of this workload."""

    def prepare(self, store: str, case: Case) -> Any:
        """Untimed setup for one store and case; the result goes to ``measure``."""
        return None

    @abstractmethod
    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        """Take one sample."""

    def scratch(self, store: str, case: Case, round_index: int) -> Path:
        """A fresh, empty directory for a store that a round mutates."""
        root = (
            self.config.workdir
            / "scratch"
            / self.name
            / store
            / f"{case.params.get('size', 0)}-{round_index}"
        )
        shutil.rmtree(root, ignore_errors=True)
        return root

    def seed(self, *parts: object) -> str:
        """A seed string for this workload's random choices."""
        return ":".join(str(part) for part in (self.config.seed, self.name, *parts))

    def size_cases(self, sizes: Sequence[int] | None = None) -> list[Case]:
        """One case per blob size."""
        return [
            Case(format_size(size), {"size": size})
            for size in (self.config.sizes if sizes is None else sizes)
        ]


def format_size(size: int) -> str:
    """4096 -> '4 KiB'."""
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


class FirstRead(Workload):
    """Headline: the first read of each key in a freshly opened store."""

    name = "first_read"
    title = "First read of each key after a fresh open (page cache warm)"
    unit = "µs"
    headline = True
    description = (
        "Populate N distinct keys, close, open the store again, then read every "
        "key once in random order; median µs per read (p90 in the JSON)."
    )

    def cases(self) -> list[Case]:
        return self.size_cases()

    def dataset(self, case: Case) -> Dataset:
        """The N entries of this case's blob size."""
        return dataset_of(self.config.n, case.params["size"], self.config.seed)

    def prepare(self, store: str, case: Case) -> Any:
        return self.fixtures.populated(store, self.dataset(case))

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = self.dataset(case)
        order = shuffled(dataset.count, self.seed(case.label, round_index))
        with self.fixtures.store(store, state) as opened:
            self.before_timing(opened, dataset)
            times, misses = time_reads(opened, [dataset.digests[i] for i in order])
        if misses:
            raise AssertionError(f"{misses} of {len(order)} stored keys missed")
        return Sample(statistics.median(times) / 1e3, {"p90": percentile(times, 0.9) / 1e3})

    def before_timing(self, store: Store, dataset: Dataset) -> None:
        """Hook for subclasses: untimed work between open and the timed reads."""


class Reread(FirstRead):
    """The same keys read a second time in the same open store."""

    name = "reread"
    title = "Re-read of keys already read once in this process"
    headline = False
    description = (
        "Open, read every key once (untimed), then time a second pass in another "
        "random order; median µs per read. Reported, not a headline figure."
    )

    def before_timing(self, store: Store, dataset: Dataset) -> None:
        for digest in dataset.digests:
            store.read(digest)


class Miss(FirstRead):
    """Reads of keys that are not in the store."""

    name = "miss"
    title = "Read of an absent key"
    headline = False
    description = "In the populated store, read N keys that were never written; median µs."

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        absent = dataset_of(self.config.n, case.params["size"], self.config.seed, tag="absent")
        with self.fixtures.store(store, state) as opened:
            times, misses = time_reads(opened, absent.digests)
        if misses != absent.count:
            raise AssertionError("an absent key was found")
        return Sample(statistics.median(times) / 1e3)


class ColdStart(Workload):
    """Open and read after the store's pages were dropped from the page cache."""

    name = "cold_start"
    title = "Cold start: open + read every blob after dropping the page cache"
    unit = "ms"
    description = (
        "Populate, close, fsync and posix_fadvise(DONTNEED) every file of the "
        "store (data, -wal/-shm, locks), then time open + reading every blob in "
        "random order; total ms. Directory entries and inodes stay cached, which "
        "favours the file-per-blob store."
    )

    def cases(self) -> list[Case]:
        return [
            Case(f"{count:,} x {format_size(size)}", {"count": count, "size": size})
            for count, size in self.config.cold_cases
        ]

    def dataset(self, case: Case) -> Dataset:
        """The entries of this case."""
        return dataset_of(case.params["count"], case.params["size"], self.config.seed)

    def prepare(self, store: str, case: Case) -> Any:
        if not hasattr(os, "posix_fadvise"):
            raise RuntimeError("os.posix_fadvise is not available on this platform")
        return self.fixtures.populated(store, self.dataset(case))

    #: Reads one key in this many (at random): 1 reads every blob.
    one_in = 1

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = self.dataset(case)
        order = shuffled(dataset.count, self.seed(case.label, round_index))
        digests = [dataset.digests[i] for i in order[: max(1, dataset.count // self.one_in)]]
        adapter = self.fixtures.store(store, state)
        drop_page_cache(adapter.files())
        misses = 0
        with gc_paused():
            start = time.perf_counter_ns()
            adapter.open()
            for digest in digests:
                if adapter.read(digest) is None:
                    misses += 1
            elapsed = time.perf_counter_ns() - start
        adapter.close()
        if misses:
            raise AssertionError(f"{misses} stored keys missed")
        return Sample(elapsed / 1e6)


class ColdStartPartial(ColdStart):
    """A cold start that reads a tenth of the store: what an application that needs only
    some of its pipelines sees."""

    name = "cold_start_partial"
    title = "Cold start, partial: open + read a tenth of the blobs after dropping the page cache"
    headline = False
    one_in = 10
    description = (
        "As cold_start, but read a random tenth of the keys (300 of 3,000; 30 of 300): "
        "a store that reads more of its file than the entries asked for pays for it here."
    )


class BulkInstall(Workload):
    """N writes into an empty store, then one durable flush."""

    name = "bulk_install"
    title = "Bulk install: N writes + one durable flush"
    unit = "ms"
    description = (
        "Into an empty store, write N entries one call at a time, then flush once; "
        "total ms of the write and flush calls (blob generation untimed), and µs "
        "per entry in the JSON."
    )

    def cases(self) -> list[Case]:
        return self.size_cases()

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = dataset_of(self.config.n, case.params["size"], self.config.seed)
        root = self.scratch(store, case, round_index)
        clock = time.perf_counter_ns
        total = 0
        with self.fixtures.store(store, root) as opened, gc_paused():
            for digest, blob in dataset.items():
                start = clock()
                opened.write(digest, blob)
                total += clock() - start
            start = clock()
            opened.flush()
            total += clock() - start
        shutil.rmtree(root, ignore_errors=True)
        return Sample(total / 1e6, {"per_entry_us": total / 1e3 / dataset.count})


class BulkInstallBatch(BulkInstall):
    """N entries through each store's batch API, then one durable flush."""

    name = "bulk_install_batch"
    title = "Bulk install through the batch API: N entries + one durable flush"
    description = (
        "Into an empty store, install N entries with one call of the store's batch API "
        "(vyre-sqlcache write_many, diskcache transact, LMDB one transaction; the files "
        "store has none, so one write per entry), then flush once; total ms."
    )

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = dataset_of(self.config.n, case.params["size"], self.config.seed)
        items = list(dataset.items())
        root = self.scratch(store, case, round_index)
        clock = time.perf_counter_ns
        with self.fixtures.store(store, root) as opened, gc_paused():
            start = clock()
            opened.write_batch(items)
            opened.flush()
            total = clock() - start
        shutil.rmtree(root, ignore_errors=True)
        return Sample(total / 1e6, {"per_entry_us": total / 1e3 / dataset.count})


class DurableWrite(Workload):
    """One write followed by a durable flush."""

    name = "durable_write"
    title = "Durable write: one write + flush"
    unit = "ms"
    description = (
        "In an open store, repeatedly write one new entry and flush; median ms of "
        "write+flush over many pairs per round."
    )

    def cases(self) -> list[Case]:
        return self.size_cases()

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = dataset_of(
            self.config.durable_writes,
            case.params["size"],
            self.config.seed,
            tag=f"durable{round_index}",
        )
        root = self.scratch(store, case, round_index)
        clock = time.perf_counter_ns
        times: list[int] = []
        with self.fixtures.store(store, root) as opened, gc_paused():
            for digest, blob in dataset.items():
                start = clock()
                opened.write(digest, blob)
                opened.flush()
                times.append(clock() - start)
        shutil.rmtree(root, ignore_errors=True)
        return Sample(statistics.median(times) / 1e6)


class Invalidate(Workload):
    """Invalidation of a tenth of the entries by impact mask."""

    name = "invalidate"
    title = "Invalidate 10% of N entries by impact mask (one call)"
    unit = "ms"
    description = (
        "Populate N entries durably, then time one invalidate call whose mask "
        "selects a random 10% of the digests; ms."
    )

    def cases(self) -> list[Case]:
        return self.size_cases()

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = dataset_of(self.config.n, case.params["size"], self.config.seed)
        chosen = set(
            random.Random(self.seed(case.label)).sample(
                range(dataset.count), max(1, dataset.count // 10)
            )
        )
        mask = [1 if index in chosen else 0 for index in range(dataset.count)]
        root = self.scratch(store, case, round_index)
        with self.fixtures.store(store, root) as opened:
            opened.populate(dataset.items(), durable=True)
            with gc_paused():
                start = time.perf_counter_ns()
                opened.invalidate(mask, dataset.digests)
                elapsed = time.perf_counter_ns() - start
            survivors = [opened.read(dataset.digests[i]) is not None for i in range(3)]
            gone = [opened.read(dataset.digests[i]) is None for i in sorted(chosen)]
        shutil.rmtree(root, ignore_errors=True)
        if not all(gone) or survivors != [i not in chosen for i in range(3)]:
            raise AssertionError("invalidation removed the wrong entries")
        return Sample(elapsed / 1e6)


class OpenFirstRead(Workload):
    """A fresh process opening a large store and reading one key."""

    name = "open_first_read_100k"
    title = "Fresh process: open + first read in a store of many entries"
    unit = "ms"
    description = (
        "Populate 100,000 entries of 256 B once; then, in a fresh Python process "
        "(libraries already imported), time open + one read of a random key; "
        "median ms over several processes."
    )

    def dataset(self) -> Dataset:
        """The many small entries."""
        return dataset_of(self.config.open_entries, SMALL_BLOB, self.config.seed)

    def cases(self) -> list[Case]:
        return [Case(f"{self.config.open_entries:,} x 256 B", {})]

    def prepare(self, store: str, case: Case) -> Any:
        return self.fixtures.populated(store, self.dataset())

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = self.dataset()
        pick = random.Random(self.seed(round_index))
        runs = []
        for _ in range(self.config.subprocess_runs):
            digest = dataset.digest(pick.randrange(dataset.count))
            result = child.run(
                {
                    "mode": "open_first_read",
                    "store": store,
                    "root": str(state),
                    "fingerprint": child.fingerprint_to_json(self.config.fingerprint),
                    "digest": digest.hex(),
                }
            )
            runs.append(result["ms"])
        return Sample(statistics.median(runs))


class Scale(Workload):
    """First-read cost as the number of entries grows."""

    name = "scale"
    title = "First read as the store grows (256 B entries)"
    unit = "µs"
    only_stores = ("vyre-sqlcache", "files", "lmdb")
    description = (
        "Populate 1,000 / 100,000 / 1,000,000 entries of 256 B through each "
        "store's batch path, open fresh, then time first reads of a random sample "
        "of up to 10,000 keys; median µs. diskcache is left out to save time."
    )

    def cases(self) -> list[Case]:
        return [Case(f"{count:,} entries", {"count": count}) for count in self.config.scale_counts]

    def dataset(self, case: Case) -> Dataset:
        """The entries of this case."""
        return dataset_of(case.params["count"], SMALL_BLOB, self.config.seed)

    def prepare(self, store: str, case: Case) -> Any:
        return self.fixtures.populated(store, self.dataset(case))

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = self.dataset(case)
        picks = random.Random(self.seed(case.label, round_index)).sample(
            range(dataset.count), min(dataset.count, self.config.scale_sample)
        )
        with self.fixtures.store(store, state) as opened:
            times, misses = time_reads(opened, [dataset.digests[i] for i in picks])
        if misses:
            raise AssertionError(f"{misses} stored keys missed")
        return Sample(statistics.median(times) / 1e3)


class Memory(Workload):
    """Peak extra memory while reading one 64 MiB blob."""

    name = "memory_64mib"
    title = "Peak extra memory reading one 64 MiB blob (x blob size)"
    unit = "x blob"
    description = (
        "In a fresh process, open the store, reset the peak RSS (/proc/self/clear_refs) "
        "and note the RSS, read one 64 MiB blob, then take the peak RSS (VmHWM on "
        "Linux, where ru_maxrss also counts the parent's pages at fork; ru_maxrss "
        "elsewhere); (peak - before) / blob size. 1.0 is the returned bytes object "
        "alone; mapped file pages that the read touches count too."
    )

    def cases(self) -> list[Case]:
        return [Case(format_size(self.config.memory_blob), {})]

    def dataset(self) -> Dataset:
        """The one big blob."""
        return dataset_of(1, self.config.memory_blob, self.config.seed)

    def prepare(self, store: str, case: Case) -> Any:
        return self.fixtures.populated(store, self.dataset())

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = self.dataset()
        result = child.run(
            {
                "mode": "memory",
                "store": store,
                "root": str(state),
                "fingerprint": child.fingerprint_to_json(self.config.fingerprint),
                "digest": dataset.digest(0).hex(),
            }
        )
        if result["bytes"] != dataset.size:
            raise AssertionError("the big blob read back with the wrong size")
        return Sample(result["peak_extra_bytes"] / dataset.size)


class Multiproc(Workload):
    """Aggregate first-read throughput of several reader processes."""

    name = "multiproc"
    title = "Reader processes on one store: aggregate first reads per second"
    unit = "reads/s"
    better = "higher"
    procs: ClassVar[int] = 4
    #: Groups of fresh readers a sample: one late wake-up can move a single group's
    #: figure by a third.
    groups: ClassVar[int] = 3
    description = (
        "4 fresh processes open one populated store, wait at a common start, then "
        "each first-reads a disjoint share of the keys (40·N keys for blobs up to "
        "4 KiB, 10·N up to 64 KiB, N above); reads/s = all reads / (last end - first start), "
        "against 1 process reading every key; a sample is the median of 3 such "
        "groups. The machine may have fewer cores than readers."
    )

    def cases(self) -> list[Case]:
        return [
            Case(
                f"{format_size(size)}, {procs} proc{'s' if procs > 1 else ''}",
                {"size": size, "procs": procs},
            )
            for size in self.config.sizes
            for procs in (self.procs, 1)
        ]

    def dataset(self, case: Case) -> Dataset:
        """The keys shared out among the readers."""
        size = case.params["size"]
        return dataset_of(self.config.multiproc_count(size), size, self.config.seed)

    def prepare(self, store: str, case: Case) -> Any:
        dataset = self.dataset(case)
        return (
            self.fixtures.populated(store, dataset),
            self.fixtures.digests_file(dataset),
        )

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        root, digests_file = state
        dataset = self.dataset(case)
        procs = case.params["procs"]
        order = shuffled(dataset.count, self.seed(case.label, round_index))
        shares = [order[i::procs] for i in range(procs)]
        spec = {
            "mode": "reader",
            "store": store,
            "root": str(root),
            "fingerprint": child.fingerprint_to_json(self.config.fingerprint),
            "digests_file": str(digests_file),
        }
        rates = []
        for _ in range(self.groups):
            results = child.run_together([{**spec, "indices": share} for share in shares])
            if any(result["misses"] for result in results):
                raise AssertionError("a reader missed a stored key")
            start = min(result["start_ns"] for result in results)
            end = max(result["end_ns"] for result in results)
            rates.append(dataset.count / ((end - start) / 1e9))
        return Sample(statistics.median(rates))


class DiskUsage(Workload):
    """Bytes on disk per payload byte."""

    name = "disk_usage"
    title = "Bytes on disk per payload byte (after flush + close)"
    unit = "x payload"
    repeat = False
    description = (
        "Populate N entries, flush, close; sum st_blocks x 512 over every file of "
        "the store, divided by N x blob size. Measured once (deterministic)."
    )

    def cases(self) -> list[Case]:
        return self.size_cases((4 * KIB, 64 * KIB))

    def measure(self, store: str, case: Case, state: Any, round_index: int) -> Sample:
        dataset = dataset_of(self.config.n, case.params["size"], self.config.seed)
        root = self.fixtures.populated(store, dataset, durable=True)
        used = self.fixtures.store(store, root).disk_bytes()
        return Sample(used / (dataset.count * dataset.size), {"bytes": used})


WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls
    for cls in (
        FirstRead,
        ColdStart,
        ColdStartPartial,
        Reread,
        Miss,
        BulkInstall,
        BulkInstallBatch,
        DurableWrite,
        Invalidate,
        OpenFirstRead,
        Scale,
        Memory,
        Multiproc,
        DiskUsage,
    )
}
"""Every workload, in the order they run and are reported."""
