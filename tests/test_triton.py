"""`vyre_sqlcache.triton.CacheManager` against Triton's real cache interface, with the
corpus' real Triton 3.6 kernels (cubins, PTX, IR, metadata, launcher modules).

No GPU is needed: Triton's `compile` talks to its cache manager through four calls,
and `compile_like_triton` makes them in the same order with a kernel's real files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

triton_cache = pytest.importorskip(
    "triton.runtime.cache",
    reason="Triton is not installed: pip install 'vyre-sqlcache[triton]' to test its manager",
)

from benchmarks.corpus import DEFAULT_TARBALL  # noqa: E402
from tests.helpers import connection_of, fresh_triton_process  # noqa: E402
from vyre_sqlcache import PipelineCache  # noqa: E402
from vyre_sqlcache import triton as vt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Kernel = tuple[str, str, dict[str, bytes]]  # (key, group file name, files)


def load_corpus(folder: Path) -> tuple[list[Kernel], dict[str, dict[str, bytes]]]:
    """The corpus' kernels (key, metadata file name, files in Triton's put order) and its
    launcher/utility modules (key -> {file name: bytes}), which no group claims."""
    kernels: list[Kernel] = []
    modules: dict[str, dict[str, bytes]] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        groups = list(entry.glob("__grp__*"))
        if not groups:
            modules[entry.name] = {p.name: p.read_bytes() for p in entry.iterdir()}
            continue
        metadata = groups[0].name[len("__grp__") :]
        order = json.loads(groups[0].read_text())["child_paths"]
        files = {name: (entry / name).read_bytes() for name in order}
        kernels.append((entry.name, metadata, files))
    return kernels, modules


@pytest.fixture(scope="session")
def corpus_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus' Triton 3.6 cache folders, unpacked once (child processes read it too)."""
    if not DEFAULT_TARBALL.is_file():
        pytest.skip(f"the corpus {DEFAULT_TARBALL} is not here (shared/corpus)")
    folder = tmp_path_factory.mktemp("corpus")
    with tarfile.open(DEFAULT_TARBALL) as tar:
        tar.extractall(folder, filter="data")
    return folder / "triton-3.6-sm90"


@pytest.fixture(scope="session")
def corpus(corpus_folder: Path) -> tuple[list[Kernel], dict[str, Any]]:
    return load_corpus(corpus_folder)


@pytest.fixture
def kernels(corpus: tuple[list[Kernel], dict[str, Any]]) -> list[Kernel]:
    return corpus[0]


@pytest.fixture
def modules(corpus: tuple[list[Kernel], dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return corpus[1]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh process state: the cache file in tmp_path, folders under tmp_path/run,
    TRITON_CACHE_DIR unset (restored afterwards)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    cache_file = tmp_path / "cache" / "triton.sqlite3"
    monkeypatch.setenv("VYRE_SQLCACHE_PATH", str(cache_file))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.delenv("VYRE_SQLCACHE_MAX_SIZE", raising=False)
    fresh_triton_process()
    yield cache_file
    fresh_triton_process()


def compile_like_triton(key: str, metadata: str, files: dict[str, bytes]) -> bool:
    """What `triton.compiler.compile` does with its cache manager for one kernel: look up
    the group; on a miss "compile" (put each stage's file, then the group). Returns
    whether it was a hit, after checking every file it would load."""
    manager = vt.CacheManager(key)
    group = manager.get_group(metadata) or {}
    if group.get(metadata) is not None:
        assert set(group) == set(files)
        for name, path in group.items():
            assert Path(path).read_bytes() == files[name], name
        return True
    for name, data in files.items():
        text = not name.endswith(".cubin")
        # Triton puts IR as text (str) and binaries as bytes.
        group[name] = manager.put(data.decode() if text else data, name, binary=not text)
        assert Path(group[name]).read_bytes() == data
    manager.put_group(metadata, group)
    return False


def load_module_like_triton(key: str, name: str, data: bytes) -> bool:
    """What `triton.runtime.build.compile_module_from_src` does: get_file, else put."""
    manager = vt.CacheManager(key)
    path = manager.get_file(name)
    if path is not None:
        assert Path(path).read_bytes() == data
        return True
    assert Path(manager.put(data, name, binary=True)).read_bytes() == data
    return False


def named_rows(cache_file: Path) -> list[dict[str, Any]]:
    with PipelineCache.open(cache_file, readonly=True) as cache:
        return cache.entries(namespace=vt.NAMESPACE)


# -- round trips ------------------------------------------------------------------------


def test_every_corpus_kernel_round_trips_byte_for_byte(
    env: Path, kernels: list[Kernel], modules: dict[str, dict[str, bytes]]
) -> None:
    assert len(kernels) >= 100
    assert not any(compile_like_triton(*k) for k in kernels)
    for key, files in modules.items():
        for name, data in files.items():
            assert not load_module_like_triton(key, name, data)
    fresh_triton_process()  # a new process: nothing remembered, every file from the cache
    assert all(compile_like_triton(*k) for k in kernels)
    for key, files in modules.items():
        for name, data in files.items():
            assert load_module_like_triton(key, name, data)
    rows = named_rows(env)
    groups = [r for r in rows if "/__grp__" in r["name"]]
    assert len(groups) == len(kernels)  # one entry per kernel, whatever its file count
    assert len(rows) == len(kernels) + sum(map(len, modules.values()))
    assert {r["kind"] for r in rows} == {"named"} and {r["backend"] for r in rows} == {"triton"}
    raw = sum(len(d) for _, _, files in kernels for d in files.values())
    with PipelineCache.open(env, readonly=True) as cache:
        stats = cache.stats()
    # The corpus README measured 8x per kernel with zstd; the file must keep most of it.
    assert stats.stored_bytes + stats.dictionary_bytes < raw / 5


def test_files_are_written_where_inductor_looks_for_cubins(
    env: Path, kernels: list[Kernel]
) -> None:
    key, metadata, files = kernels[0]
    compile_like_triton(key, metadata, files)
    fresh_triton_process()
    group = vt.CacheManager(key).get_group(metadata)
    assert group is not None
    folder = vt.materialised_folder()
    # torch._inductor's static launcher: <TRITON_CACHE_DIR>/<base32 hash>/<name>.cubin
    assert os.environ["TRITON_CACHE_DIR"] == str(folder)
    cubin = next(n for n in files if n.endswith(".cubin"))
    expected = Path(os.environ["TRITON_CACHE_DIR"]) / key / cubin
    assert group[cubin] == str(expected) and expected.read_bytes() == files[cubin]
    assert folder.parent == env.parent.parent / "run" / f"vyre-sqlcache-triton-{os.getuid()}"


def test_triton_resolves_the_manager_named_in_its_environment(
    env: Path, monkeypatch: pytest.MonkeyPatch, kernels: list[Kernel]
) -> None:
    monkeypatch.setenv("TRITON_CACHE_MANAGER", vt.MANAGER)
    hex_key = "ab" * 32
    manager = triton_cache.get_cache_manager(hex_key)
    assert type(manager) is vt.CacheManager
    assert manager.key == triton_cache._base32(hex_key)
    _, metadata, files = kernels[0]
    group = {n: manager.put(d, n) for n, d in files.items()}
    manager.put_group(metadata, group)
    fresh_triton_process()
    found = triton_cache.get_cache_manager(hex_key).get_group(metadata)
    assert found is not None
    assert {n: Path(p).read_bytes() for n, p in found.items()} == files


def test_install_names_the_manager_and_the_folder(env: Path) -> None:
    folder = vt.install()
    try:
        assert os.environ["TRITON_CACHE_MANAGER"] == vt.MANAGER
        assert os.environ["TRITON_CACHE_DIR"] == str(folder) and folder.is_dir()
    finally:
        del os.environ["TRITON_CACHE_MANAGER"]


def test_a_user_triton_cache_dir_is_left_alone(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernels: list[Kernel]
) -> None:
    mine = tmp_path / "my-triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(mine))
    compile_like_triton(*kernels[0])
    assert os.environ["TRITON_CACHE_DIR"] == str(mine) and not mine.exists()


# -- one process: memoised files, held files ----------------------------------------------


def test_a_process_reads_each_file_from_the_cache_once(
    env: Path, kernels: list[Kernel], modules: dict[str, dict[str, bytes]]
) -> None:
    key, name, data = next((k, n, d) for k, f in modules.items() for n, d in f.items())
    load_module_like_triton(key, name, data)
    compile_like_triton(*kernels[0])
    fresh_triton_process()
    cache = vt.cache()
    assert cache is not None
    for _ in range(50):  # Triton asks for its launcher module once per kernel
        assert load_module_like_triton(key, name, data)
        assert compile_like_triton(*kernels[0])
    assert cache.stats().hits == 2  # one read of the module, one of the kernel
    written = [p for p in vt.materialised_folder().rglob("*") if p.is_file()]
    assert len(written) == 1 + len(kernels[0][2]) + 1  # the files, and the folder's lock


def test_get_file_finds_a_file_of_a_stored_group(env: Path, kernels: list[Kernel]) -> None:
    key, metadata, files = kernels[0]
    compile_like_triton(key, metadata, files)
    fresh_triton_process()
    manager = vt.CacheManager(key)
    for name, data in files.items():
        path = manager.get_file(name)
        assert path is not None and Path(path).read_bytes() == data
    assert manager.get_file("no-such-file.so") is None


def test_a_put_no_group_claims_is_stored_when_its_manager_goes(env: Path) -> None:
    manager = vt.CacheManager("K" * 52)
    manager.put(b"timings", "fn.autotune.json", binary=False)
    del manager
    fresh_triton_process()
    path = vt.CacheManager("K" * 52).get_file("fn.autotune.json")
    assert path is not None and Path(path).read_bytes() == b"timings"


def test_files_a_group_claims_are_not_stored_twice(env: Path, kernels: list[Kernel]) -> None:
    compile_like_triton(*kernels[0])
    fresh_triton_process()
    assert [r["name"] for r in named_rows(env)] == [f"{kernels[0][0]}/__grp__{kernels[0][1]}"]


def test_debug_managers_stay_tritons_folders(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_DUMP_DIR", str(tmp_path / "dump"))
    path = vt.CacheManager("D" * 52, dump=True).put(b"ir", "k.ttir")
    assert Path(path).parent == tmp_path / "dump" / ("D" * 52)
    assert not env.exists()  # the cache was never opened


# -- the cap, damage, foreign files ---------------------------------------------------------


def test_an_evicted_kernel_is_a_miss_and_is_stored_again(
    env: Path, monkeypatch: pytest.MonkeyPatch, kernels: list[Kernel]
) -> None:
    cap = 256 * 1024
    monkeypatch.setenv("VYRE_SQLCACHE_MAX_SIZE", str(cap))
    fresh_triton_process()
    for kernel in kernels:
        compile_like_triton(*kernel)
    cache = vt.cache()
    assert cache is not None
    stats = cache.stats()
    assert stats.total_evictions > 0
    assert stats.stored_bytes + stats.dictionary_bytes <= cap
    fresh_triton_process()
    assert compile_like_triton(*kernels[-1])  # the newest stayed
    assert not compile_like_triton(*kernels[0])  # the oldest went: Triton compiles it again
    fresh_triton_process()
    assert compile_like_triton(*kernels[0])
    cache = vt.cache()
    assert cache is not None
    stats = cache.stats()
    assert stats.stored_bytes + stats.dictionary_bytes <= cap


def test_a_damaged_kernel_is_a_miss_then_compiled_and_stored_again(
    env: Path, kernels: list[Kernel]
) -> None:
    key, metadata, files = kernels[0]
    compile_like_triton(key, metadata, files)
    fresh_triton_process()
    with PipelineCache.open(env) as cache:
        entry = cache.entries(namespace=vt.NAMESPACE)[0]["entry_key"]
        connection = connection_of(cache)
        connection.execute(
            "UPDATE blobs SET data = zeroblob(length(data)) WHERE id = ?",
            (int.from_bytes(bytes.fromhex(entry)[:8], "big", signed=True),),
        )
    assert not compile_like_triton(key, metadata, files)  # a miss, never wrong bytes
    fresh_triton_process()
    assert compile_like_triton(key, metadata, files)


def _another_programs_database(path: Path) -> None:
    import apsw

    connection = apsw.Connection(str(path))
    connection.execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine')")
    connection.close()


@pytest.mark.parametrize("bad", ["text file", "damaged database", "another program's database"])
def test_a_bad_file_at_the_cache_path_never_stops_triton(
    env: Path, kernels: list[Kernel], bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    env.parent.mkdir(parents=True)
    if bad == "text file":
        env.write_bytes(b"a text file that is not a cache\n" * 10)
    elif bad == "damaged database":
        env.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 4080)
    else:
        _another_programs_database(env)
    before = env.read_bytes()
    assert not any(compile_like_triton(*k) for k in kernels[:3])  # misses; Triton compiles
    fresh_triton_process()
    if bad == "another program's database":
        assert not any(compile_like_triton(*k) for k in kernels[:3])  # still no cache...
        assert env.read_bytes() == before  # ...and the file was never written
        assert "not cached" in caplog.text
    else:
        # The cache's own path held a damaged cache: moved aside and started again.
        assert all(compile_like_triton(*k) for k in kernels[:3])
        assert list(env.parent.glob("*.corrupt-*"))


# -- threads and processes ------------------------------------------------------------------


def test_threads_compiling_the_same_kernels_at_once(env: Path, kernels: list[Kernel]) -> None:
    some = kernels[:24]
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        try:
            barrier.wait()
            for kernel in some:
                compile_like_triton(*kernel)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    fresh_triton_process()
    assert all(compile_like_triton(*k) for k in some)


def _python(code: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(extra_env or {}))
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_CHILD = """
from pathlib import Path
from tests.test_triton import compile_like_triton, load_corpus
kernels, _ = load_corpus(Path({folder!r}))
{body}
"""


def _child(folder: Path, body: str) -> str:
    """A child process's script: the corpus' kernels loaded, then `body`."""
    return _CHILD.format(folder=str(folder), body=body)


def test_processes_compiling_the_same_kernels_at_once(
    env: Path, kernels: list[Kernel], corpus_folder: Path
) -> None:
    body = "print(sum(compile_like_triton(*k) for k in kernels[:30]))"
    children = [_python(_child(corpus_folder, body)) for _ in range(3)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    fresh_triton_process()
    assert all(compile_like_triton(*k) for k in kernels[:30])
    assert len(named_rows(env)) == 30


def test_a_later_process_removes_the_folder_of_one_that_was_killed(
    env: Path, kernels: list[Kernel], corpus_folder: Path
) -> None:
    compile_like_triton(*kernels[0])
    fresh_triton_process()
    body = (
        "import os, signal\n"
        "from vyre_sqlcache import triton\n"
        "compile_like_triton(*kernels[0])\n"
        "print(triton.materialised_folder(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = _python(_child(corpus_folder, body))
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    dead = Path(out.strip())
    assert dead.is_dir() and any(dead.rglob("*.cubin"))  # no atexit ran
    assert compile_like_triton(*kernels[0])  # this process makes its folder...
    assert not dead.exists()  # ...and removes the dead one's
    mine = vt.materialised_folder()
    fresh_triton_process()  # exits as a process would
    assert not mine.exists()


def test_a_process_that_exits_removes_its_folder(env: Path, corpus_folder: Path) -> None:
    body = (
        "from vyre_sqlcache import triton\n"
        "compile_like_triton(*kernels[0])\n"
        "print(triton.materialised_folder())\n"
    )
    child = _python(_child(corpus_folder, body))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert not Path(out.strip()).exists()


def test_fork_child_and_parent_both_use_the_cache(env: Path, corpus_folder: Path) -> None:
    body = (
        "import os, sys\n"
        "from vyre_sqlcache import triton\n"
        "assert not compile_like_triton(*kernels[0])\n"
        "parent_folder = triton.materialised_folder()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    assert compile_like_triton(*kernels[0])  # the parent's kernel\n"
        "    assert not compile_like_triton(*kernels[1])\n"
        "    assert triton.materialised_folder() == parent_folder  # shared while it lives\n"
        "    sys.exit(0)  # runs atexit: must not remove the parent's folder\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert status == 0, status\n"
        "assert parent_folder.is_dir()\n"
        "assert compile_like_triton(*kernels[0]) and compile_like_triton(*kernels[1])\n"
        "print(parent_folder)\n"
    )
    child = _python(_child(corpus_folder, body))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert not Path(out.strip()).exists()
    fresh_triton_process()
    assert len(named_rows(env)) == 2


@pytest.mark.parametrize(
    ("key", "name"), [("../x", "k.cubin"), ("K" * 52, "../../k.cubin"), ("..", "k")]
)
def test_keys_and_file_names_never_leave_the_folder(env: Path, key: str, name: str) -> None:
    with pytest.raises(ValueError, match="must be a plain file name"):
        vt.CacheManager(key).put(b"x", name)


def test_compile_workers_started_later_share_the_folder(env: Path, corpus_folder: Path) -> None:
    folder = vt.install()
    try:
        body = (
            "from vyre_sqlcache import triton\n"
            "compile_like_triton(*kernels[0])\n"
            "print(triton.materialised_folder())\n"
        )
        child = _python(_child(corpus_folder, body))  # inherits TRITON_CACHE_DIR
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert Path(out.strip()) == folder
        assert folder.is_dir() and any(folder.rglob("*.cubin"))  # the child left it ours
    finally:
        del os.environ["TRITON_CACHE_MANAGER"]


# -- a hit that cannot be written out is a miss ----------------------------------------------


def test_a_stored_kernel_whose_file_cannot_be_written_out_is_a_miss(
    env: Path, kernels: list[Kernel]
) -> None:
    # A name the file system refuses (400 bytes in UTF-8, under 255 characters), as a
    # planted or shared entry may hold (put_group refuses it; the container is made by
    # hand): a miss, and Triton compiles and stores anew.
    import struct

    key, metadata, files = kernels[0]
    planted = sorted([("é" * 200).encode(), metadata.encode()])
    container = b"VYREGRP1" + struct.pack("<I", len(planted))
    for name in planted:
        data = b"x" if name.startswith("é".encode()) else b"{}"
        container += struct.pack("<I", len(name)) + name + struct.pack("<I", len(data)) + data
    with PipelineCache.open(env) as cache:
        cache.put_named(vt.NAMESPACE, f"{key}/{vt._GROUP_PREFIX}{metadata}", container)
    manager = vt.CacheManager(key)
    assert manager.get_group(metadata) is None
    assert manager.get_file("é" * 200) is None
    assert compile_like_triton(key, metadata, files) is False  # compiled again
    fresh_triton_process()
    assert compile_like_triton(key, metadata, files) is True


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a tmpfs")
@pytest.mark.parametrize("room", ["small from the start", "filled meanwhile"])
def test_a_small_or_full_folder_of_written_out_files_gives_way_to_the_temporary_folder(
    env: Path,
    kernels: list[Kernel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    room: str,
) -> None:
    # The folder files are written out to is memory-backed, and a container's /dev/shm
    # is 64 MB: once full, `put` raised ENOSPC into Triton's compile, and the part it had
    # written stayed behind (get_group had made a full folder a miss, every time).
    disk = tmp_path / "tmp"
    disk.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    small = tmp_path / "small"
    small.mkdir()
    size = "8m" if room == "small from the start" else f"{(vt.MIN_FREE_MEMORY_BYTES >> 20) + 8}m"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(small))
    caplog.set_level(logging.WARNING, logger="vyre_sqlcache")
    try:
        if room == "filled meanwhile":
            key, metadata, files = kernels[0]
            assert not compile_like_triton(key, metadata, files)
            assert vt.materialised_folder().parent.parent == small
            fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
                os.posix_fallocate(fd, 0, free - (64 << 10))
            finally:
                os.close(fd)
        for key, metadata, files in kernels:
            compile_like_triton(key, metadata, files)  # raises nothing; checks every file
        if room == "filled meanwhile":
            assert vt.materialised_folder().parent.parent == disk
        else:  # passed over for /dev/shm or the temporary folder
            assert small not in vt.materialised_folder().parents
        fresh_triton_process()
        assert all(compile_like_triton(key, metadata, files) for key, metadata, files in kernels)
        left = [p for p in [*small.rglob("*"), *disk.rglob("*")] if ".tmp." in p.name]
        assert left == []
        moved = [r for r in caplog.records if "from now on" in r.getMessage()]
        assert len(moved) == (room == "filled meanwhile")
    finally:
        fresh_triton_process()
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
