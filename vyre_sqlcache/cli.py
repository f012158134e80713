"""The `vyre-sqlcache` command line."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import CacheError
from .keys import DeviceFingerprint, FeatureFlags, PipelineCacheKey
from .store import PipelineCache

__all__ = ["main"]

DEMO_BACKEND = "demo"


def _demo(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    fingerprint = DeviceFingerprint.from_parts(0x10DE, 0x2684, "demo-driver-1.0")
    count = args.count
    path = args.path
    with PipelineCache.open(path) as cache:
        print(f"cache: {cache.path}")
        before = len(cache)
        digests = [rng.randbytes(32) for _ in range(count)]
        keys = [
            PipelineCacheKey(
                shader_hash=rng.randbytes(32),
                bind_group_layout_hash=rng.randbytes(32),
                push_constant_size=rng.choice((0, 16, 64, 128)),
                workgroup_size=(rng.choice((32, 64, 128, 256)), 1, 1),
                feature_flags=FeatureFlags(rng.getrandbits(9)),
                backend=DEMO_BACKEND,
            )
            for _ in range(count)
        ]
        blobs = [rng.randbytes(rng.randint(1024, 64 * 1024)) for _ in range(count)]

        start = time.perf_counter()
        cache.put_many(zip(keys, blobs, digests, strict=True), fingerprint)
        cache.flush()
        took = time.perf_counter() - start
        total = sum(map(len, blobs))
        print(
            f"wrote    {count} pipelines ({total / 1e6:.1f} MB) and flushed in {took * 1e3:.1f} ms"
        )

        start = time.perf_counter()
        read = [cache.get(key, fingerprint) for key in keys]
        took = time.perf_counter() - start
        intact = sum(1 for got, want in zip(read, blobs, strict=True) if got == want)
        print(f"read     {count} pipelines in {took * 1e3:.1f} ms: {intact} intact")

        mask = [1 if i % 4 == 0 else 0 for i in range(count)]
        removed = cache.invalidate_impacted(mask, digests, fingerprint)
        gone = sum(1 for key in keys if not cache.contains(key, fingerprint))
        print(
            f"invalidated {removed} pipelines by impact mask ({sum(mask)} marked); {gone} now miss"
        )

        print(f"totals:  {len(cache)} entries in the cache ({before} before the demo)")
        if not args.keep:
            for key in keys:
                cache.delete(key, fingerprint)
            cache.flush()
            print(
                f"removed the demo's entries: {len(cache)} entries remain (use --keep to keep them)"
            )
    ok = intact == count and gone == sum(mask)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vyre-sqlcache", description="Inspect and exercise a vyre-sqlcache pipeline cache."
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=None,
        help=f"cache file (default: {PipelineCache.default_path()})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="write, read and invalidate a few hundred synthetic pipelines",
        description="Write a few hundred synthetic pipelines (backend 'demo'), read them back, "
        "invalidate some by impact mask and print what happened. The demo's entries are "
        "removed at the end unless --keep.",
    )
    demo.add_argument("--count", type=int, default=300, help="pipelines to write (default 300)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's entries")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed, 2 usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "count", 1) < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(8), "big")
    try:
        return int(args.handler(args))
    except CacheError as error:
        print(f"vyre-sqlcache: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
