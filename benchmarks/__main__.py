"""Command line: ``python -m benchmarks [--quick] [--workloads ...] ...``."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import report, runner
from benchmarks.stores import STORES
from benchmarks.workloads import KIB, MIB, WORKLOADS, Config

_MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmM]?)(?:i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """'4KiB', '4k', '1MiB', '4096' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": KIB, "m": MIB}[unit]


def _names(choices: list[str]) -> Callable[[str], list[str]]:
    """A parser of comma-separated names among ``choices`` (or 'all')."""

    def parse(text: str) -> list[str]:
        if text == "all":
            return list(choices)
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)} (choose from {', '.join(choices)})"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark vyre-sqlcache against a file per blob (vyre's "
        "original cache), diskcache and LMDB.",
    )
    parser.add_argument(
        "--workloads",
        type=_names(list(WORKLOADS)),
        default=list(WORKLOADS),
        help="comma-separated workloads, or 'all' (default): " + ", ".join(WORKLOADS),
    )
    parser.add_argument(
        "--stores",
        type=_names(list(STORES)),
        default=list(STORES),
        help="comma-separated stores, or 'all' (default): " + ", ".join(STORES),
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(part) for part in text.split(",")],
        default=None,
        help="blob sizes, e.g. 4KiB,64KiB,1MiB (the default)",
    )
    parser.add_argument(
        "--n", type=int, default=None, help="entries per store (default 1000, quick 100)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts everywhere: a smoke run, not figures to publish",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="even smaller than --quick (implies it): for the test suite",
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs"),
        help=f"report directory (default docs/): {report.MARKDOWN_NAME}, "
        f"{report.JSON_NAME}, {report.CHART_NAME}",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON results, not Markdown")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the stores are built (a fresh temporary directory is made "
        "inside it); default: the system temp dir unless it is tmpfs, else the "
        "current directory",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the stores")
    return parser


def _default_workdir_base() -> Path:
    """The temp dir, unless it lives in memory (fsync and cold starts would lie)."""
    temp = Path(tempfile.gettempdir())
    if runner.filesystem(temp) in _MEMORY_FILESYSTEMS:
        return Path.cwd()
    return temp


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    base = args.workdir if args.workdir is not None else _default_workdir_base()
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vyre-bench-", dir=base))
    if runner.filesystem(workdir) in _MEMORY_FILESYSTEMS:
        _progress(f"warning: {workdir} is in memory; durability and cold figures lie")
    config = Config(
        sizes=tuple(args.sizes or Config.sizes),
        n=args.n or (20 if args.tiny else 100 if args.quick else Config.n),
        rounds=args.rounds or (2 if args.quick or args.tiny else Config.rounds),
        quick=args.quick or args.tiny,
        tiny=args.tiny,
        seed=args.seed,
        stores=tuple(args.stores),
        workdir=workdir,
    )
    try:
        doc = runner.run(config, args.workloads, _progress)
    finally:
        if args.keep_workdir:
            _progress(f"stores kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        import matplotlib  # noqa: F401

        with_chart = True
    except ImportError:
        _progress("matplotlib is not installed: no chart")
        with_chart = False
    paths = report.write(doc, args.out, with_chart=with_chart)
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(paths["markdown"].read_text(encoding="utf-8"))
    _progress("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
