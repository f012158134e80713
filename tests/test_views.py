"""The views of migration 0002 (pipelines_v, stats_v) in three SQLite builds: apsw's, the
one Python's `sqlite3` module links, and the `sqlite3` shell, while a cache writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import apsw
import pytest

from vyre_sqlcache import DeviceFingerprint, FeatureFlags, PipelineCache, PipelineCacheKey
from vyre_sqlcache._schema import latest_version, migrations

README = Path(__file__).resolve().parent.parent / "README.md"
SQLITE3_SHELL = shutil.which("sqlite3")

#: The README's example queries (its ```sql blocks are run too, below).
EXAMPLE_QUERIES = (
    # the ten largest pipelines
    "SELECT entry_key, backend, vendor_hex, device_hex, blob_size\n"
    "FROM pipelines_v ORDER BY blob_size DESC, entry_key LIMIT 10;",
    # bytes and hits per backend and device
    "SELECT * FROM stats_v ORDER BY bytes DESC, backend, vendor, device;",
    # pipelines that use F16, newest first
    "SELECT entry_key, workgroup, feature_flags, created FROM pipelines_v\n"
    "WHERE feature_bits & 2 ORDER BY created DESC, entry_key;",
    # what nobody has used for 30 days
    "SELECT count(*) AS entries, total(blob_size) AS bytes FROM pipelines_v\n"
    "WHERE accessed < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-30 days');",
    # the cache-wide hit rate, kept across processes
    "SELECT h.value AS hits, m.value AS misses,\n"
    "       round(100.0 * h.value / max(h.value + m.value, 1), 1) AS hit_percent\n"
    "FROM meta AS h, meta AS m WHERE h.name = 'hits' AND m.name = 'misses';",
)


def _readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text("utf-8"), re.S)
    statements = (s for block in blocks for s in block.split(";\n"))
    # without their comment lines, so the ones that are in EXAMPLE_QUERIES run once
    code = ("\n".join(x for x in s.splitlines() if not x.startswith("--")) for s in statements)
    return [f"{c.strip().rstrip(';')};" for c in code if c.strip()]


QUERIES = list(dict.fromkeys([*EXAMPLE_QUERIES, *_readme_queries()]))

FLAG_CASES = [
    (0, ""),
    (int(FeatureFlags.F16), "F16"),
    (int(FeatureFlags.SUBGROUP_OPS | FeatureFlags.BF16), "SUBGROUP_OPS,BF16"),
    (
        0x1FF,
        "SUBGROUP_OPS,F16,BF16,TENSOR_CORES,ASYNC_COMPUTE,PUSH_CONSTANTS,"
        "INDIRECT_DISPATCH,SPECULATIVE,PERSISTENT_THREAD",
    ),
    (int(FeatureFlags.F16) | 0x100000, "F16,0x100000"),
    (0x8000_0000, "0x80000000"),
    (0xFFFF_FE00 | int(FeatureFlags.PERSISTENT_THREAD), "PERSISTENT_THREAD,0xfffffe00"),
]


def _iso(ms: int) -> str:
    when = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


@pytest.fixture
def populated(
    cache: PipelineCache,
    fingerprint: DeviceFingerprint,
    other_fingerprint: DeviceFingerprint,
    make_key: Callable[..., PipelineCacheKey],
) -> PipelineCache:
    for index, (bits, _) in enumerate(FLAG_CASES):
        fp = fingerprint if index % 2 else other_fingerprint
        key = make_key(feature_flags=FeatureFlags(bits), backend=("vulkan", "metal")[index % 2])
        cache.put(key, fp, os.urandom(100 + index), program_digest=os.urandom(32))
    cache.write(os.urandom(32), fingerprint, b"by program digest")
    cache.put_entry(os.urandom(32), b"imported", created_ms=1_700_000_000_123)
    cache.close()
    return cache


def _apsw_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        cursor = connection.execute(sql)
        try:
            columns = [name for name, _ in cursor.get_description()]
        except apsw.ExecutionCompleteError:
            return []
        return [dict(zip(columns, row, strict=True)) for row in cursor]
    finally:
        connection.close()


def _stdlib_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql)]
    finally:
        connection.close()


def _shell_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    assert SQLITE3_SHELL is not None
    result = subprocess.run(
        [SQLITE3_SHELL, "-bail", "-json", "-cmd", ".timeout 10000", str(path)],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout) if result.stdout.strip() else []
    return rows


def test_open_brings_the_schema_to_version_2_with_both_views(populated: PipelineCache) -> None:
    rows = _stdlib_rows(
        populated.path, "SELECT name FROM sqlite_schema WHERE type = 'view' ORDER BY name"
    )
    # info_v and layer_masks_v came with schema 5 (layers), departures_v and misses_v with 6.
    assert [r["name"] for r in rows] == [
        "departures_v",
        "info_v",
        "layer_masks_v",
        "misses_v",
        "pipelines_v",
        "stats_v",
    ]
    assert latest_version() >= 2 and migrations()[1].name == "0002_views.sql"


def test_the_migrations_apply_in_pythons_sqlite_build(tmp_path: Path) -> None:
    """Every migration is SQL the system SQLite (3.40 on Debian 12) understands."""
    connection = sqlite3.connect(tmp_path / "plain.sqlite3")
    try:
        for migration in migrations():
            connection.executescript(migration.sql)
        connection.execute("SELECT * FROM pipelines_v").fetchall()
        connection.execute("SELECT * FROM stats_v").fetchall()
    finally:
        connection.close()


@pytest.mark.parametrize(("bits", "names"), FLAG_CASES)
def test_feature_flag_names(populated: PipelineCache, bits: int, names: str) -> None:
    rows = _stdlib_rows(
        populated.path,
        f"SELECT feature_flags, feature_bits FROM pipelines_v WHERE feature_bits = {bits}",
    )
    assert rows == [{"feature_flags": names, "feature_bits": bits}]


def test_a_keyed_row_shows_every_field(
    cache: PipelineCache, fingerprint: DeviceFingerprint, make_key: Callable[..., PipelineCacheKey]
) -> None:
    key = make_key(workgroup_size=(8, 4, 2), push_constant_size=64, backend="cuda")
    digest = os.urandom(32)
    cache.put(key, fingerprint, b"x" * 1234, program_digest=digest)
    cache.flush()  # committed, so the hit below is the row's
    assert cache.get(key, fingerprint) is not None
    cache.close()
    (row,) = _stdlib_rows(cache.path, "SELECT * FROM pipelines_v")
    assert row == {
        "entry_key": key.entry_key(fingerprint).hex(),
        "kind": "keyed",
        "backend": "cuda",
        "vendor": 0x10DE,
        "device": 0x2684,
        "vendor_hex": "0x10de",
        "device_hex": "0x2684",
        "feature_flags": "SUBGROUP_OPS",
        "feature_bits": 1,
        "workgroup": "8x4x2",
        "push_constant_size": 64,
        "key_version": key.version,
        "shader_hash": key.shader_hash.hex(),
        "layout_hash": key.bind_group_layout_hash.hex(),
        "driver_digest": fingerprint.driver_digest.hex(),
        "program_digest": digest.hex(),
        "blob_size": 1234,
        "created": _iso(row["created_ms"]),
        "accessed": _iso(row["accessed_ms"]),
        "hits": 1,
        "created_ms": row["created_ms"],
        "accessed_ms": row["accessed_ms"],
        # schema 3: the bytes stored (compressed, or 1234 raw) and blob_size / stored_size
        "stored_size": row["stored_size"],
        "ratio": round(1234 / row["stored_size"], 2),
        # schema 5: set for named entries only (put_named, put_group)
        "namespace": None,
        "name": None,
    }
    assert 0 < row["stored_size"] <= 1234


def test_program_and_imported_rows(populated: PipelineCache) -> None:
    rows = _stdlib_rows(
        populated.path,
        "SELECT kind, backend, vendor_hex, feature_flags, workgroup, shader_hash, "
        "program_digest IS NOT NULL AS has_program, created "
        "FROM pipelines_v WHERE kind != 'keyed' ORDER BY kind",
    )
    assert rows == [
        {
            "kind": "imported",
            "backend": None,
            "vendor_hex": None,
            "feature_flags": None,
            "workgroup": None,
            "shader_hash": None,
            "has_program": 0,
            "created": "2023-11-14T22:13:20.123Z",
        },
        {
            "kind": "program",
            "backend": None,
            "vendor_hex": "0x10de",
            "feature_flags": None,
            "workgroup": None,
            "shader_hash": None,
            "has_program": 1,
            "created": rows[1]["created"],
        },
    ]


@pytest.mark.parametrize(
    "ms", [0, 999, 1_000, 1_700_000_000_123, 1_700_000_000_999, 4_102_444_799_999]
)
def test_times_are_iso_utc_to_the_millisecond(cache: PipelineCache, ms: int) -> None:
    cache.put_entry(os.urandom(32), b"t", created_ms=ms)
    cache.close()
    (row,) = _stdlib_rows(cache.path, "SELECT created, accessed FROM pipelines_v")
    assert row == {"created": _iso(ms), "accessed": _iso(ms)}


def test_stats_v_totals_per_backend_and_device(populated: PipelineCache) -> None:
    entries = _stdlib_rows(
        populated.path, "SELECT backend, vendor, device, blob_size, hits FROM entries"
    )
    expected: dict[tuple[Any, ...], list[int]] = {}
    for e in entries:
        totals = expected.setdefault((e["backend"], e["vendor"], e["device"]), [0, 0, 0])
        totals[0] += 1
        totals[1] += e["blob_size"]
        totals[2] += e["hits"]
    rows = _stdlib_rows(populated.path, "SELECT * FROM stats_v")
    got = {
        (r["backend"], r["vendor"], r["device"]): [r["entries"], r["bytes"], r["hits"]]
        for r in rows
    }
    assert got == expected and len(got) == 4


@pytest.mark.parametrize("view", ["pipelines_v", "stats_v"])
def test_views_never_read_the_blobs_table(populated: PipelineCache, view: str) -> None:
    read: set[str] = set()

    def authorizer(op: int, p1: str | None, p2: str | None, db: str | None, via: str | None) -> int:
        if op == apsw.SQLITE_READ and p1 is not None:
            read.add(p1)
        return apsw.SQLITE_OK

    connection = apsw.Connection(str(populated.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        connection.authorizer = authorizer
        assert connection.execute(f"SELECT * FROM {view}").fetchall()
    finally:
        connection.close()
    assert "entries" in read and "blobs" not in read


def test_example_queries_agree_in_every_build(populated: PipelineCache) -> None:
    for sql in QUERIES:
        expected = _apsw_rows(populated.path, sql)
        assert _stdlib_rows(populated.path, sql) == expected, sql
        if SQLITE3_SHELL is not None:
            assert _shell_rows(populated.path, sql) == expected, sql


#: A PipelineCache in its own process: two SQLite libraries in one process must never share
#: a file (closing one's file descriptor drops the other's POSIX locks).
WRITER = """
import os, sys
from vyre_sqlcache import DeviceFingerprint, FeatureFlags, PipelineCache, PipelineCacheKey
path, stop = sys.argv[1], sys.argv[2]
fp = DeviceFingerprint.from_parts(0x10DE, 0x2684, "550.54.14")
with PipelineCache.open(path) as cache:
    first = True
    while not os.path.exists(stop):
        keys = [
            PipelineCacheKey(os.urandom(32), os.urandom(32), 16, (64, 1, 1), FeatureFlags(i), "vk")
            for i in range(20)
        ]
        cache.put_many([(k, os.urandom(2000)) for k in keys], fp)
        cache.flush()
        cache.delete(keys[0], fp)
        if first:
            print("wrote", flush=True)
            first = False
"""


@pytest.fixture
def busy_writer(cache_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that writes, flushes and deletes entries until the test ends."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    stop = cache_path.with_name("stop")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(cache_path), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "wrote\n"
        yield process
    finally:
        stop.touch()
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err


@pytest.mark.usefixtures("busy_writer")
def test_queries_in_pythons_sqlite_while_a_cache_writes(cache_path: Path) -> None:
    count = "SELECT count(*) AS n, min(kind) AS kind FROM pipelines_v"
    (before,) = _stdlib_rows(cache_path, count)
    for _ in range(20):
        for sql in QUERIES:
            _stdlib_rows(cache_path, sql)
    (after,) = _stdlib_rows(cache_path, count)
    assert before["n"] < after["n"] and after["kind"] == "keyed"


@pytest.mark.skipif(SQLITE3_SHELL is None, reason="no sqlite3 shell installed")
@pytest.mark.usefixtures("busy_writer")
def test_queries_in_the_sqlite3_shell_while_a_cache_writes(cache_path: Path) -> None:
    count = "SELECT count(*) AS n, min(kind) AS kind FROM pipelines_v"
    (before,) = _shell_rows(cache_path, count)
    for _ in range(3):
        for sql in QUERIES:
            _shell_rows(cache_path, sql)
    (after,) = _shell_rows(cache_path, count)
    assert before["n"] < after["n"] and after["kind"] == "keyed"
