"""Named entries and groups: `put_named`/`get_named`, `put_group`/`get_group`, the group
container, and how `ls`, the views and the cap see them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import connection_of
from tests.test_cli import Cli, cli  # noqa: F401 - the command-line fixture
from vyre_sqlcache import (
    BlobTooLargeError,
    PipelineCache,
    named_entry_key,
    pack_group,
    unpack_group,
)

FILES = {"k.cubin": os.urandom(3000), "k.json": b'{"name": "k"}', "k.ptx": b"// ptx\n" * 400}


def test_a_named_blob_round_trips_and_deletes(cache: PipelineCache) -> None:
    cache.put_named("triton", "abc/k.so", b"module bytes")
    assert cache.get_named("triton", "abc/k.so") == b"module bytes"
    assert cache.get_named("triton", "abc/other.so") is None
    assert cache.get_named("inductor", "abc/k.so") is None  # namespaces never mix
    assert cache.delete_named("triton", "abc/k.so")
    assert cache.get_named("triton", "abc/k.so") is None
    assert not cache.delete_named("triton", "abc/k.so")


def test_a_group_is_one_entry_read_back_whole(cache: PipelineCache) -> None:
    cache.put_group("triton", "abc/__grp__k.json", FILES)
    assert cache.get_group("triton", "abc/__grp__k.json") == FILES
    cache.flush()
    (row,) = cache.entries()
    assert row["kind"] == "named" and row["namespace"] == "triton" and row["backend"] == "triton"
    assert row["name"] == "abc/__grp__k.json"
    assert row["entry_key"] == named_entry_key("triton", "abc/__grp__k.json").hex()
    assert row["blob_size"] == len(pack_group(FILES))


def test_a_named_blob_is_not_a_group(cache: PipelineCache) -> None:
    cache.put_named("triton", "x", b"VYREGRP1 but not really")
    assert cache.get_group("triton", "x") is None
    assert cache.get_named("triton", "x") == b"VYREGRP1 but not really"


def test_named_entries_survive_reopening_and_other_processes_read_them(
    cache_path: Path,
) -> None:
    with PipelineCache.open(cache_path) as cache:
        cache.put_group("triton", "g", FILES)
    with PipelineCache.open(cache_path, readonly=True) as cache:
        assert cache.get_group("triton", "g") == FILES


def test_the_views_and_the_listing_filter_by_namespace(
    cache: PipelineCache, fingerprint: Any, make_key: Any
) -> None:
    cache.put(make_key(), fingerprint, b"pipeline")
    cache.put_named("triton", "a", b"1")
    cache.put_named("other", "a", b"2")
    assert [r["name"] for r in cache.entries(namespace="triton")] == ["a"]
    assert {r["kind"] for r in cache.entries()} == {"keyed", "named"}
    assert len(cache.entries(kind="named")) == 2
    totals = {r["backend"]: r["entries"] for r in cache.device_totals()}
    assert totals["triton"] == 1 and totals["other"] == 1
    with pytest.raises(ValueError, match="namespace must be 1 to 64 characters"):
        cache.entries(namespace="")


def test_named_entries_count_under_the_cap_and_are_evicted(cache_path: Path) -> None:
    cap = 64 * 1024
    with PipelineCache.open(cache_path, max_bytes=cap, compression="off") as cache:
        for i in range(40):
            cache.put_group("triton", f"k{i}", {"k.cubin": os.urandom(4000)})
            cache.flush()  # as the Triton manager does after each kernel
        stats = cache.stats()
        assert stats.stored_bytes <= cap and stats.total_evictions > 0
        assert cache.get_group("triton", "k0") is None
        assert cache.get_group("triton", "k39") is not None


def test_a_damaged_group_is_a_miss_and_can_be_stored_again(cache: PipelineCache) -> None:
    cache.put_group("triton", "g", FILES)
    cache.flush()
    rowid = int.from_bytes(named_entry_key("triton", "g")[:8], "big", signed=True)
    connection_of(cache).execute(
        "UPDATE blobs SET data = zeroblob(length(data)) WHERE id = ?", (rowid,)
    )
    assert cache.get_group("triton", "g") is None
    cache.put_group("triton", "g", FILES)
    assert cache.get_group("triton", "g") == FILES


def _released() -> memoryview:
    view = memoryview(b"data")
    view.release()
    return view


@pytest.mark.parametrize(
    ("call", "args", "error", "message"),
    [
        ("put_named", ("", "n", b"x"), ValueError, "namespace must be 1 to 64 characters"),
        ("put_named", ("t" * 65, "n", b"x"), ValueError, "namespace must be 1 to 64"),
        ("put_named", (3, "n", b"x"), TypeError, "namespace must be a str"),
        ("put_named", ("t", "", b"x"), ValueError, "name must be 1 to 1024 characters"),
        ("put_named", ("t", "a\x00b", b"x"), ValueError, "name must not contain a NUL"),
        ("put_named", ("t", "\ud800", b"x"), ValueError, "lone surrogate"),
        ("put_named", ("t", "n", "text"), TypeError, "blob must be bytes"),
        ("get_named", ("t", None), TypeError, "name must be a str"),
        ("put_group", ("t", "n", {"a/b": b""}), ValueError, "plain file name"),
        ("put_group", ("t", "n", {"..": b""}), ValueError, "plain file name"),
        ("put_group", ("t", "n", {"a": "text"}), TypeError, r"files\['a'\] must be bytes"),
        ("put_group", ("t", "n", [("a", b"")]), TypeError, "files must be a mapping"),
        ("put_group", ("t", "n", {"é" * 128: b""}), ValueError, "at most 255 bytes.*256 bytes"),
        (
            "put_group",
            ("t", "n", {"x" * 256: b""}),
            ValueError,
            "255 characters long, got 256: 'xx",
        ),
        ("put_group", ("t", "n", {"a": _released()}), ValueError, r"files\['a'\] cannot be read"),
        ("get_group", ("t" * 65, "n"), ValueError, "namespace must be 1 to 64"),
    ],
)
def test_bad_arguments_name_the_field_and_change_nothing(
    cache: PipelineCache, call: str, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        getattr(cache, call)(*args)
    assert cache.stats().entries == 0


def test_a_group_over_the_entry_limit_is_refused(cache: PipelineCache) -> None:
    with pytest.raises(BlobTooLargeError, match="store large files as entries of their own"):
        cache.put_group("t", "n", {"a": bytes(40 << 20), "b": bytes(30 << 20)})
    assert cache.stats().entries == 0


_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", ".."))


@given(st.dictionaries(_names, st.binary(max_size=300), max_size=8))
def test_any_group_packs_and_unpacks_to_itself(files: dict[str, bytes]) -> None:
    packed = pack_group(files)
    assert unpack_group(packed) == files
    assert pack_group(dict(reversed(list(files.items())))) == packed  # one layout per group


@given(st.binary(max_size=200))
def test_unpacking_junk_raises_value_error_or_gives_a_valid_group(junk: bytes) -> None:
    for blob in (junk, b"VYREGRP1" + junk):
        try:
            files = unpack_group(blob)
        except ValueError:
            continue
        assert pack_group(files) == blob  # only an exact container decodes


def test_the_container_layout_is_as_documented() -> None:
    packed = pack_group({"b": b"22", "a": b"1"})
    assert packed == (
        b"VYREGRP1" + (2).to_bytes(4, "little")
        + (1).to_bytes(4, "little") + b"a" + (1).to_bytes(4, "little") + b"1"
        + (1).to_bytes(4, "little") + b"b" + (2).to_bytes(4, "little") + b"22"
    )  # fmt: skip
    with pytest.raises(ValueError, match="past its last file"):
        unpack_group(packed + b"\0")
    with pytest.raises(ValueError, match="cut short"):
        unpack_group(packed[:-1])


def test_ls_lists_and_filters_named_entries(cli: Cli, cache_path: Path) -> None:  # noqa: F811
    with PipelineCache.open(cache_path) as cache:
        cache.put_group("triton", "abc/__grp__k.json", FILES)
        cache.put_named("other", "x", b"1")
    code, out, _ = cli.run(cache_path, "ls", "--namespace", "triton", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["kind"], row["namespace"], row["name"]) == ("named", "triton", "abc/__grp__k.json")
    code, out, _ = cli.run(cache_path, "ls", "--namespace", "triton")
    assert code == 0 and out.splitlines()[1].split()[-1] == "abc/__grp__k.json"
