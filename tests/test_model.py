"""The public API against a model: a dict of what each key should read back.

Hypothesis runs random sequences of writes (single, batched, by digest and by key),
reads, deletions, invalidations, flushes, reopenings with other settings, compaction
and recompression on one cache, and checks after every step that each key reads back
exactly what the model holds (no cap: nothing may be missing either), that
`contains`, `get_many`, `len` and the counts that deletions return agree, and that a
second object opened on the file after a `flush()` sees the same.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vyre_sqlcache import BlobTooLargeError, DeviceFingerprint, PipelineCache, PipelineCacheKey

FINGERPRINTS = (
    DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14"),
    DeviceFingerprint.from_parts(0x1002, 0x744C, "mesa 24.0.5", "radv"),
)
DIGESTS = tuple(bytes([i]) * 32 for i in range(1, 6))
KEYS = tuple(
    PipelineCacheKey(bytes([i]) * 32, bytes([i + 100]) * 32, 16, (64, 1, 1), 0, backend)
    for i, backend in enumerate(("vulkan", "vulkan", "metal", "cuda", "vulkan"))
)
# Empty, tiny, compressible and not, under and over the size from which a blob is
# probed before it is compressed (64 KiB).
_NOISE = os.urandom(80 * 1024)
SHAPES = (0, 1, 100, 5000, 70 * 1024)

fingerprints = st.integers(0, len(FINGERPRINTS) - 1)
digests = st.integers(0, len(DIGESTS) - 1)
keys = st.integers(0, len(KEYS) - 1)
shapes = st.tuples(st.sampled_from(SHAPES), st.booleans())

# Where an entry lives in the model: ("digest", digest index, fingerprint index) or
# ("key", key index, fingerprint index).
Where = tuple[str, int, int]


class Refused(Exception):
    """A batch the cache refused whole: the model does not change either."""


def refusable(rule: Callable[..., None]) -> Callable[..., None]:
    """`rule`, ending without changing the model where the cache refused the batch."""

    @functools.wraps(rule)
    def run(*args: Any, **kwargs: Any) -> None:
        with suppress(Refused):
            rule(*args, **kwargs)

    return run


class CacheAgainstModel(RuleBasedStateMachine):
    written = Bundle("written")
    #: The size cap; None: nothing is evicted, so every entry of the model is there.
    cap: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="vyre-model-"))
        self.path = self.folder / "pipelines.sqlite3"
        self.cache = PipelineCache.open(self.path, max_bytes=self.cap)
        self.model: dict[Where, bytes] = {}
        self.program: dict[Where, int | None] = {}  # a keyed entry's program digest
        self.serial = 0

    def teardown(self) -> None:
        try:
            self.cache.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- blobs ---------------------------------------------------------------------------

    def blob(self, shape: tuple[int, bool]) -> bytes:
        """A blob of a shape, unlike every earlier one (so a stale read shows)."""
        size, compressible = shape
        self.serial += 1
        if size == 0:
            return b""
        stamp = self.serial.to_bytes(4, "big")
        body = (stamp * (size // 4 + 1)) if compressible else _NOISE[: size + 4]
        return (stamp + body)[:size] if size >= 4 else stamp[-size:]

    # -- writes --------------------------------------------------------------------------

    @initialize()
    def nothing_at_first(self) -> None:
        assert len(self.cache) == 0

    @rule(target=written, d=digests, f=fingerprints, shape=shapes)
    def write(self, d: int, f: int, shape: tuple[int, bool]) -> Where:
        blob = self.blob(shape)
        self.cache.write(DIGESTS[d], FINGERPRINTS[f], blob)
        self.model[("digest", d, f)] = blob
        return ("digest", d, f)

    @rule(f=fingerprints, items=st.lists(st.tuples(digests, shapes), max_size=6))
    @refusable
    def write_many(self, f: int, items: list[tuple[int, tuple[int, bool]]]) -> None:
        batch = [(d, self.blob(shape)) for d, shape in items]
        with self.all_or_none({d: blob for d, blob in batch}):
            self.cache.write_many([(DIGESTS[d], blob) for d, blob in batch], FINGERPRINTS[f])
        for d, blob in batch:  # of two writes of one digest, the later stays
            self.model[("digest", d, f)] = blob

    @rule(
        target=written,
        k=keys,
        f=fingerprints,
        shape=shapes,
        program=st.none() | digests,
    )
    def put(self, k: int, f: int, shape: tuple[int, bool], program: int | None) -> Where:
        blob = self.blob(shape)
        digest = None if program is None else DIGESTS[program]
        self.cache.put(KEYS[k], FINGERPRINTS[f], blob, digest)
        self.model[("key", k, f)] = blob
        self.program[("key", k, f)] = program
        return ("key", k, f)

    @rule(
        f=fingerprints,
        items=st.lists(st.tuples(keys, shapes, st.none() | digests), max_size=6),
    )
    @refusable
    def put_many(self, f: int, items: list[tuple[int, tuple[int, bool], int | None]]) -> None:
        batch = [(k, self.blob(shape), program) for k, shape, program in items]
        with self.all_or_none({k: blob for k, blob, _ in batch}):
            self.cache.put_many(
                [(KEYS[k], blob, None if p is None else DIGESTS[p]) for k, blob, p in batch],
                FINGERPRINTS[f],
            )
        for k, blob, program in batch:
            self.model[("key", k, f)] = blob
            self.program[("key", k, f)] = program

    @contextmanager
    def all_or_none(self, last: dict[int, bytes]) -> Iterator[None]:
        """A batch larger than the cap (each key's last blob) is refused whole."""
        try:
            yield
        except BlobTooLargeError:
            assert self.cap is not None and sum(map(len, last.values())) > self.cap
            raise Refused from None

    # -- deletions -----------------------------------------------------------------------

    @rule(k=keys, f=fingerprints)
    def delete(self, k: int, f: int) -> None:
        existed = self.cache.delete(KEYS[k], FINGERPRINTS[f])
        self.agree(int(existed), int(("key", k, f) in self.model))
        self.model.pop(("key", k, f), None)

    @rule(f=fingerprints, mask=st.lists(st.integers(0, 3), min_size=5, max_size=5))
    def invalidate(self, f: int, mask: list[int]) -> None:
        impacted = {d for d, value in enumerate(mask) if value}
        gone = [
            where
            for where in self.model
            if where[2] == f
            and (
                (where[0] == "digest" and where[1] in impacted)
                or (where[0] == "key" and self.program.get(where) in impacted)
            )
        ]
        count = self.cache.invalidate_impacted(mask, DIGESTS, FINGERPRINTS[f])
        self.agree(count, len(gone))
        for where in gone:
            del self.model[where]

    @rule(where=written)
    def delete_by_entry_key(self, where: Where) -> None:
        count = self.cache.delete_entries([self.entry_key(where).hex()])
        self.agree(count, 1 if where in self.model else 0)
        self.model.pop(where, None)

    # -- the file ------------------------------------------------------------------------

    @rule()
    def flush(self) -> None:
        self.cache.flush()

    @rule(write_behind=st.booleans(), compression=st.sampled_from(["auto", "off", 1, 19]))
    def reopen(self, write_behind: bool, compression: str | int) -> None:
        self.cache.close()
        self.cache = PipelineCache.open(
            self.path, max_bytes=self.cap, write_behind=write_behind, compression=compression
        )

    @rule()
    def compact(self) -> None:
        self.cache.compact()

    @rule()
    def recompress(self) -> None:
        self.cache.recompress()

    @precondition(lambda self: self.model)
    @rule()
    def another_object_sees_what_was_flushed(self) -> None:
        self.cache.flush()
        with PipelineCache.open(self.path, readonly=True) as other:
            for where, blob in self.model.items():
                self.agree(self.read(where, other), blob, where)
            self.agree(len(other), len(self.model))

    # -- what must hold after every step -------------------------------------------------

    def agree(self, got: object, expected: object, where: object = None) -> None:
        """`got` is `expected`; under a cap, evictions may also have made it a miss (None)
        or a smaller count."""
        if self.cap is None or expected is None:
            assert got == expected, where
        elif isinstance(expected, int):
            assert isinstance(got, int) and 0 <= got <= expected, (got, expected, where)
        else:
            assert got in (expected, None), where

    def entry_key(self, where: Where) -> bytes:
        kind, i, f = where
        if kind == "digest":
            return FINGERPRINTS[f].cache_key(DIGESTS[i])
        return KEYS[i].entry_key(FINGERPRINTS[f])

    def read(self, where: Where, cache: PipelineCache) -> bytes | None:
        kind, i, f = where
        if kind == "digest":
            return cache.read(DIGESTS[i], FINGERPRINTS[f])
        return cache.get(KEYS[i], FINGERPRINTS[f])

    @invariant()
    def every_key_reads_what_the_model_holds(self) -> None:
        for kind, count in (("digest", len(DIGESTS)), ("key", len(KEYS))):
            for i in range(count):
                for f in range(len(FINGERPRINTS)):
                    where = (kind, i, f)
                    self.agree(self.read(where, self.cache), self.model.get(where), where)
                    self.agree(self.cache.get_entry(self.entry_key(where)), self.model.get(where))

    @invariant()
    def contains_get_many_and_len_agree(self) -> None:
        for f, fingerprint in enumerate(FINGERPRINTS):
            asked = [*range(len(KEYS)), 0, 2]  # twice over, some of them
            got = self.cache.get_many([KEYS[k] for k in asked], fingerprint)
            for k, blob in zip(asked, got, strict=True):
                self.agree(blob, self.model.get(("key", k, f)), k)
            for k, key in enumerate(KEYS):
                found = self.cache.contains(key, fingerprint)
                self.agree(int(found), int(("key", k, f) in self.model))
        self.agree(len(self.cache), len(self.model))
        if self.cap is not None:
            stats = self.cache.stats()
            assert stats.stored_bytes + stats.dictionary_bytes <= self.cap, stats


class CappedCacheAgainstModel(CacheAgainstModel):
    """The same under a cap that holds a few entries: a read may miss what the cap
    evicted, but never returns other bytes, and the stored bytes stay under the cap."""

    cap = 160 * 1024


for machine in (CacheAgainstModel, CappedCacheAgainstModel):
    machine.TestCase.settings = settings(
        max_examples=int(os.environ.get("VYRE_MODEL_EXAMPLES", "60")),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

TestCacheAgainstModel = CacheAgainstModel.TestCase
TestCappedCacheAgainstModel = CappedCacheAgainstModel.TestCase
