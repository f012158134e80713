"""Triton's kernel cache on a GPU: Triton's own folder against vyre-sqlcache's manager.

``python -m benchmarks.triton_gpu [--kernels N] [--warm-rounds R] [--out DIR]`` (needs a
CUDA GPU, torch and Triton). Every measured process is fresh (``python -m
benchmarks.triton_gpu --child MODE``) and compiles or loads the same N distinct Triton
kernels (matmul, softmax, layernorm and elementwise variants over block sizes, dtypes and
warps), launches each once and checks its output against torch, then runs a small
``torch.compile`` model and checks it against eager mode. The modes:

- ``triton-cold``: Triton's FileCacheManager, empty folder (every kernel compiled);
- ``triton-warm``: the same folder again (every kernel read from it);
- ``vyre-cold``: ``TRITON_CACHE_MANAGER=vyre_sqlcache.triton:CacheManager`` on an empty
  cache file (compiles, fills the file);
- ``vyre-warm``: the same file again;
- ``vyre-capped``: a fresh file under a small ``VYRE_SQLCACHE_MAX_SIZE``, twice.

Readiness is the time from the end of the imports to every kernel launched once and
synchronised (imports are reported apart: they are the same for both). Results go to
``DIR/triton_gpu.json`` after every process, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# -- the kernels (child side) --------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32")


def variants() -> list[tuple[str, tuple[Any, ...]]]:
    """Every kernel variant, interleaved by family so that any prefix mixes them."""
    matmul = [
        ("matmul", (dt, bm, bn, bk, w))
        for dt in DTYPES
        for (bm, bn, bk) in (
            (32, 32, 32),
            (64, 64, 32),
            (64, 32, 32),
            (32, 64, 32),
            (128, 64, 32),
            (64, 128, 32),
        )
        for w in (4, 8)
    ]
    softmax = [
        ("softmax", (dt, b, w))
        for dt in DTYPES
        for b in (256, 512, 1024, 2048, 4096)
        for w in (4, 8)
    ]
    layernorm = [
        ("layernorm", (dt, b, w))
        for dt in DTYPES
        for b in (256, 512, 1024, 2048, 4096)
        for w in (4, 8)
    ]
    add = [
        ("add", (dt, b, w))
        for dt in DTYPES
        for b in (128, 256, 512, 1024, 2048, 4096)
        for w in (2, 4)
    ]
    families = [matmul, softmax, layernorm, add]
    out: list[tuple[str, tuple[Any, ...]]] = []
    for i in range(max(map(len, families))):
        out += [family[i] for family in families if i < len(family)]
    return out


def run_child(mode: str, count: int) -> dict[str, Any]:
    started = time.perf_counter()
    if mode.startswith("vyre"):
        from vyre_sqlcache import triton as vt

        vt.install()  # the torch.compile recipe: before torch and Triton start
    import torch
    import triton
    import triton.language as tl

    imported = time.perf_counter()

    @triton.jit
    def matmul_kernel(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
            y = tl.load(b + (k + rk)[:, None] * N + rn[None, :])
            acc += tl.dot(x, y)
        tl.store(c + rm[:, None] * N + rn[None, :], acc.to(c.dtype.element_ty))

    @triton.jit
    def softmax_kernel(x, y, n, B: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, B)
        v = tl.load(x + row * n + cols, mask=cols < n, other=-float("inf")).to(tl.float32)
        v = v - tl.max(v, axis=0)
        e = tl.exp(v)
        tl.store(y + row * n + cols, (e / tl.sum(e, axis=0)).to(y.dtype.element_ty), mask=cols < n)

    @triton.jit
    def layernorm_kernel(x, y, n, eps, B: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, B)
        mask = cols < n
        v = tl.load(x + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / n
        d = tl.where(mask, v - mean, 0.0)
        var = tl.sum(d * d, axis=0) / n
        tl.store(y + row * n + cols, (d / tl.sqrt(var + eps)).to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def add_kernel(x, y, z, n, B: tl.constexpr):
        offs = tl.program_id(0) * B + tl.arange(0, B)
        mask = offs < n
        tl.store(
            z + offs, tl.load(x + offs, mask=mask) * 2 + tl.load(y + offs, mask=mask), mask=mask
        )

    torch.manual_seed(0)
    device = "cuda"
    wrong: list[str] = []

    def check(name: str, got: Any, want: Any, dtype: Any) -> None:
        # tl.dot on float32 uses TF32; bfloat16 keeps 8 bits of mantissa.
        tol = 1e-1 if dtype == torch.bfloat16 else 5e-2
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            wrong.append(name)

    launches = []
    for family, params in variants()[:count]:
        dtype = getattr(torch, params[0])
        name = f"{family}-{'-'.join(map(str, params))}"
        if family == "matmul":
            _, bm, bn, bk, w = params
            m, n, k = 256, 256, 128
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            c = torch.empty(m, n, device=device, dtype=dtype)
            matmul_kernel[(m // bm, n // bn)](a, b, c, m, n, k, BM=bm, BN=bn, BK=bk, num_warps=w)
            launches.append((name, c, lambda a=a, b=b: a.float() @ b.float(), dtype))
        elif family in ("softmax", "layernorm"):
            _, block, w = params
            rows, n = 64, block - block // 4
            x = torch.randn(rows, n, device=device, dtype=dtype)
            y = torch.empty_like(x)
            if family == "softmax":
                softmax_kernel[(rows,)](x, y, n, B=block, num_warps=w)
                launches.append((name, y, lambda x=x: torch.softmax(x.float(), -1), dtype))
            else:
                layernorm_kernel[(rows,)](x, y, n, 1e-5, B=block, num_warps=w)
                launches.append(
                    (
                        name,
                        y,
                        lambda x=x, n=n: torch.nn.functional.layer_norm(x.float(), (n,)),
                        dtype,
                    )
                )
        else:
            _, block, w = params
            n = 10_000
            x = torch.randn(n, device=device, dtype=dtype)
            y = torch.randn(n, device=device, dtype=dtype)
            z = torch.empty_like(x)
            add_kernel[(triton.cdiv(n, block),)](x, y, z, n, B=block, num_warps=w)
            launches.append((name, z, lambda x=x, y=y: x.float() * 2 + y.float(), dtype))
    torch.cuda.synchronize()
    ready = time.perf_counter()
    for name, got, want, dtype in launches:
        check(name, got, want(), dtype)

    # torch.compile: Inductor's kernels through the same Triton cache.
    import logging

    bypassed: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Bypassing" in record.getMessage():
                bypassed.append(record.getMessage()[:200])

    heuristics = logging.getLogger("torch._inductor.runtime.triton_heuristics")
    heuristics.setLevel(logging.INFO)
    heuristics.addHandler(Catch())
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024),
        torch.nn.GELU(),
        torch.nn.LayerNorm(1024),
        torch.nn.Linear(1024, 256),
    ).to(device)
    x = torch.randn(64, 512, device=device)
    compiled_start = time.perf_counter()
    compiled = torch.compile(model)
    got = torch.softmax(compiled(x), -1)
    torch.cuda.synchronize()
    compiled_s = time.perf_counter() - compiled_start
    check("torch.compile", got, torch.softmax(model(x), -1), torch.float32)

    result: dict[str, Any] = {
        "mode": mode,
        "kernels": len(launches),
        "wrong": wrong,
        "import_s": imported - started,
        "ready_s": ready - imported,
        "torch_compile_s": compiled_s,
        "static_launcher_bypassed": len(bypassed),
        "bypass_examples": bypassed[:2],
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if mode.startswith("vyre"):
        from vyre_sqlcache import triton as vt

        folder = vt.materialised_folder()
        files = [p for p in folder.rglob("*") if p.is_file()]
        cache = vt.cache()
        result["materialised"] = {
            "folder": str(folder),
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        }
        if cache is not None:
            stats = cache.stats()
            result["cache_hits"], result["cache_misses"] = stats.hits, stats.misses
    return result


# -- the parent ----------------------------------------------------------------------------


def tree_size(folder: Path) -> dict[str, int]:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return {
        "files": len(files),
        "folders": sum(1 for p in folder.rglob("*") if p.is_dir()) if folder.exists() else 0,
        "bytes": sum(p.stat().st_size for p in files),
        "disk_bytes": sum(p.stat().st_blocks * 512 for p in files),
    }


def cache_size(path: Path) -> dict[str, Any]:
    from vyre_sqlcache import PipelineCache

    files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    with PipelineCache.open(path, readonly=True) as cache:
        stats = cache.stats()
        entries = len(cache.entries(namespace="triton"))
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "disk_bytes": sum(p.stat().st_blocks * 512 for p in files),
        "entries": entries,
        "blob_bytes": stats.blob_bytes,
        "stored_bytes": stats.stored_bytes,
        "dictionary_bytes": stats.dictionary_bytes,
        "max_bytes": stats.max_bytes,
        "evictions": stats.total_evictions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_gpu", description=__doc__)
    parser.add_argument("--kernels", type=int, default=len(variants()))
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--cap", default="1M", help="VYRE_SQLCACHE_MAX_SIZE of the capped runs")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.kernels)), flush=True)
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="triton-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = work / "triton-folder"
    cache_file = work / "vyre" / "triton.sqlite3"
    capped_file = work / "vyre-capped" / "triton.sqlite3"
    for path in (folder, cache_file.parent, capped_file.parent):
        shutil.rmtree(path, ignore_errors=True)
    # Where the manager writes files out: memory-backed, as $XDG_RUNTIME_DIR is on a
    # desktop (a folder of its own, so that folders left behind can be counted).
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        runtime = Path(tempfile.mkdtemp(dir=shm, prefix="triton-gpu-run-"))
    else:
        runtime = work / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
    results_runtime = str(runtime)
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("TRITON_CACHE", "VYRE_SQLCACHE"))
    }
    base.update(
        PYTHONUNBUFFERED="1",
        TORCHINDUCTOR_FX_GRAPH_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_CACHE="0",
        TORCHINDUCTOR_COMPILE_THREADS="1",
        XDG_RUNTIME_DIR=str(runtime),
    )
    results: dict[str, Any] = {"kernels": args.kernels, "runs": [], "runtime": results_runtime}

    def run(mode: str, **env: str) -> dict[str, Any]:
        environment = dict(base, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(dir=work), **env)
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.triton_gpu",
                "--child",
                mode,
                "--kernels",
                str(args.kernels),
            ],
            env=environment,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            row: dict[str, Any] = {
                "mode": mode,
                "failed": done.returncode,
                "stderr": done.stderr[-3000:],
            }
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        row["wall_s"] = wall
        if "materialised" in row:
            row["materialised"]["left_after_exit"] = Path(row["materialised"]["folder"]).exists()
        results["runs"].append(row)
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in (
                        "mode",
                        "ready_s",
                        "import_s",
                        "torch_compile_s",
                        "wall_s",
                        "wrong",
                        "static_launcher_bypassed",
                        "failed",
                    )
                }
            ),
            flush=True,
        )
        (args.out / "triton_gpu.json").write_text(json.dumps(results, indent=1))
        return row

    triton_env = {"TRITON_CACHE_DIR": str(folder)}
    vyre_env = {
        "TRITON_CACHE_MANAGER": "vyre_sqlcache.triton:CacheManager",
        "VYRE_SQLCACHE_PATH": str(cache_file),
    }
    run("triton-cold", **triton_env)
    run("vyre-cold", **vyre_env)
    for _ in range(args.warm_rounds):
        run("triton-warm", **triton_env)
        run("vyre-warm", **vyre_env)
    results["disk"] = {"triton": tree_size(folder), "vyre": cache_size(cache_file)}
    capped_env = dict(
        vyre_env, VYRE_SQLCACHE_PATH=str(capped_file), VYRE_SQLCACHE_MAX_SIZE=args.cap
    )
    run("vyre-capped", **capped_env)
    run("vyre-capped", **capped_env)
    results["disk"]["vyre_capped"] = cache_size(capped_file)
    results["leftover_folders"] = [
        str(p) for p in runtime.rglob("*") if p.is_dir() and p.parent != runtime
    ]

    def median(mode: str, field: str) -> float | None:
        values = [r[field] for r in results["runs"] if r["mode"] == mode and field in r]
        return statistics.median(values) if values else None

    summary = {
        mode: {f: median(mode, f) for f in ("ready_s", "import_s", "torch_compile_s", "wall_s")}
        for mode in ("triton-cold", "triton-warm", "vyre-cold", "vyre-warm", "vyre-capped")
    }
    tw, vw = summary["triton-warm"]["ready_s"], summary["vyre-warm"]["ready_s"]
    results["summary"] = summary
    if tw and vw:
        results["warm_ready_ratio"] = vw / tw
    disk = results["disk"]
    if disk["vyre"]["bytes"]:
        results["disk_ratio"] = disk["triton"]["disk_bytes"] / disk["vyre"]["disk_bytes"]
    results["all_correct"] = all(not r.get("wrong") and "failed" not in r for r in results["runs"])
    (args.out / "triton_gpu.json").write_text(json.dumps(results, indent=1))
    print(
        json.dumps(
            {
                k: results.get(k)
                for k in (
                    "summary",
                    "warm_ready_ratio",
                    "disk_ratio",
                    "all_correct",
                    "disk",
                    "leftover_folders",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
