"""The `vyre-sqlcache` command line.

Exit status: 0 success; 1 not found, check failed or a cache error; 2 usage. Every
error is one line on stderr, `vyre-sqlcache: ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import apsw

from . import demo, inspection, vyredir
from ._checks import MAX_BLOB_BYTES
from ._connections import connect
from ._schema import schema_version
from .cache import PipelineCache
from .config import Settings, parse_size
from .errors import CacheError
from .keys import U32_MAX, DeviceFingerprint, FeatureFlags, coerce_digest

__all__ = ["main"]

PROG = "vyre-sqlcache"
T = TypeVar("T")


class UsageError(Exception):
    """A malformed argument value: one line on stderr, exit status 2."""


class Failure(Exception):
    """Something asked for is not there (an entry, a file): one line, exit status 1."""


# -- argument values: each raises UsageError, which argparse lets through -------------


def _named(option: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse`, with `option` named in its error."""

    def parse_named(text: str) -> T:
        try:
            return parse(text)
        except UsageError as error:
            raise UsageError(f"{option}: {error}") from None

    return parse_named


def _u32(text: str) -> int:
    """A u32 from decimal or 0x hex: `4318`, `0x10de`."""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise UsageError(f"expected a number such as 4318 or 0x10de, got {text!r}") from None
    if not 0 <= value <= U32_MAX:
        raise UsageError(f"expected a number in 0..{U32_MAX:#x}, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _entry_key(text: str) -> str:
    try:
        return coerce_digest("an entry key", text.strip().lower()).hex()
    except ValueError as error:
        raise UsageError(str(error)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text, name="a size")
    except ValueError as error:
        raise UsageError(str(error)) from None


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _duration_ms(text: str) -> int:
    match = _DURATION.match(text.strip())
    if match is None:
        raise UsageError(f"expected a duration such as 90s, 30m, 12h or 7d, got {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _flag(text: str) -> int:
    member = FeatureFlags.__members__.get(text.strip().upper())
    if member is not None:
        return int(member)
    if text[:1].isdigit():
        return _u32(text)
    names = ", ".join(FeatureFlags.__members__)
    raise UsageError(f"unknown feature flag {text!r}; use one of {names} or a bit value")


# -- output ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; columns of numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(items: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(items, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *map(line, cells)])


def _json(value: Any) -> str:
    return json.dumps(
        value, indent=2, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)
    )


def _bytes(count: int | None) -> str:
    if count is None:
        return "none"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} ({size:.1f} {unit})" if unit != "B" else f"{count} B"
        size /= 1024
    raise AssertionError("unreachable")


def _progress(items: Iterable[T], total: int, what: str) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal and tqdm (optional: the `progress`
    extra) is installed."""
    if not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(
        items,
        total=total,
        desc=what,
        unit=" entries",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def _note(message: str) -> None:
    bars = sys.modules.get("tqdm")  # loaded only once a bar was drawn: write around it
    if bars is None:
        print(f"{PROG}: {message}", file=sys.stderr)
    else:
        bars.tqdm.write(f"{PROG}: {message}", file=sys.stderr)


# -- opening ----------------------------------------------------------------------------


@contextmanager
def _opened(args: argparse.Namespace, *, create: bool = False) -> Iterator[PipelineCache]:
    """The cache of `--path` (else $VYRE_SQLCACHE_PATH, else the default), opened strict:
    a damaged file is reported, never moved aside. Only `create` makes a new file."""
    try:
        path = args.path or Settings.from_environment().path or PipelineCache.default_path()
        if not create and not Path(path).exists():
            raise Failure(f"no cache at {path} (nothing has been cached there yet)")
        cache = PipelineCache.open(path, strict=True)
    except ValueError as error:
        raise Failure(str(error)) from error
    with cache:
        if cache.disabled:
            raise Failure("the cache is disabled by VYRE_SQLCACHE_DISABLE; unset it to use it")
        yield cache


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total


# -- commands ----------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    with _opened(args) as cache, inspection.read_only(cache.path) as connection:
        stats = cache.stats()
        version = schema_version(connection)
        groups = inspection.totals_by_device(connection)
    info: dict[str, Any] = {
        "path": str(stats.path),
        "schema_version": version,
        "sqlite_version": apsw.sqlite_lib_version(),
        "entries": stats.entries,
        "blob_bytes": stats.blob_bytes,
        "file_bytes": stats.file_bytes,
        "max_bytes": stats.max_bytes,
        "hits": stats.total_hits,
        "misses": stats.total_misses,
        "evictions": stats.total_evictions,
        "checksum_failures": stats.total_checksum_failures,
        "flushes": stats.total_flushes,
        "by_device": groups,
    }
    if args.json:
        print(_json(info))
        return 0
    lookups = stats.total_hits + stats.total_misses
    rate = f" ({100 * stats.total_hits / lookups:.1f}% hits)" if lookups else ""
    lines = [
        ("path", info["path"]),
        ("schema version", version),
        ("SQLite", info["sqlite_version"]),
        ("entries", stats.entries),
        ("blob bytes", _bytes(stats.blob_bytes)),
        ("file bytes", _bytes(stats.file_bytes)),
        ("size cap", _bytes(stats.max_bytes)),
        ("hits / misses", f"{stats.total_hits} / {stats.total_misses}{rate}"),
        ("evictions", stats.total_evictions),
        ("checksum failures", stats.total_checksum_failures),
        ("flushes", stats.total_flushes),
    ]
    print("\n".join(f"{name:<18} {value}" for name, value in lines))
    if groups:
        print()
        print(
            _table(
                ["backend", "vendor", "device", "entries", "bytes", "hits", "last accessed"],
                [
                    [
                        g["backend"],
                        g["vendor_hex"],
                        g["device_hex"],
                        g["entries"],
                        g["bytes"],
                        g["hits"],
                        g["last_accessed"],
                    ]
                    for g in groups
                ],
            )
        )
    return 0


def _filter(args: argparse.Namespace) -> inspection.EntryFilter:
    flags = 0
    for bit in getattr(args, "flag", None) or ():
        flags |= bit
    older = getattr(args, "older_than", None)
    return inspection.EntryFilter(
        backend=args.backend,
        vendor=args.vendor,
        device=args.device,
        flags=flags,
        min_size=getattr(args, "min_size", None),
        created_before_ms=None if older is None else time.time_ns() // 10**6 - older,
        key_version=getattr(args, "key_version", None),
    )


_LS_COLUMNS = (
    ("entry key", "entry_key"),
    ("kind", "kind"),
    ("backend", "backend"),
    ("vendor", "vendor_hex"),
    ("device", "device_hex"),
    ("flags", "feature_flags"),
    ("workgroup", "workgroup"),
    ("size", "blob_size"),
    ("created", "created"),
    ("accessed", "accessed"),
    ("hits", "hits"),
)


def _ls(args: argparse.Namespace) -> int:
    with _opened(args) as cache, inspection.read_only(cache.path) as connection:
        rows = inspection.list_entries(
            connection, _filter(args), sort=args.sort, reverse=args.reverse, limit=args.limit
        )
    if args.json:
        print(_json(rows))
    elif rows:
        print(_table([h for h, _ in _LS_COLUMNS], [[r[c] for _, c in _LS_COLUMNS] for r in rows]))
    return 0


def _get(args: argparse.Namespace) -> int:
    with _opened(args) as cache:
        blob = cache.get_entry(args.key)
    if blob is None:
        raise Failure(f"no entry with key {args.key}")
    if args.output == "-":
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    else:
        Path(args.output).write_bytes(blob)
        print(f"wrote {len(blob)} bytes to {args.output}")
    return 0


def _put(args: argparse.Namespace) -> int:
    source = Path(args.file)
    try:
        size = source.stat().st_size
        if size > MAX_BLOB_BYTES:
            raise Failure(f"{source} is {size} bytes, over the {MAX_BLOB_BYTES}-byte limit")
        blob = source.read_bytes()
    except OSError as error:
        raise Failure(f"cannot read {source}: {error.strerror or error}") from error
    with _opened(args, create=True) as cache:
        cache.put_entry(args.key, blob)
        cache.flush()
    print(f"stored {len(blob)} bytes under {args.key}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    keys = list(dict.fromkeys(args.keys))
    with _opened(args) as cache:
        with inspection.read_only(cache.path) as connection:
            present = {key for key in keys if inspection.has_entry(connection, key)}
        removed = cache.delete_entries([k for k in keys if k in present])
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'}")
    missing = [k for k in keys if k not in present]
    for key in missing:
        print(f"{PROG}: no entry with key {key}", file=sys.stderr)
    return 1 if missing else 0


def _read_digests(path: Path) -> tuple[bytes, ...]:
    """Program digests from a file: 64 hex characters a line; blank lines and # comments."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise Failure(f"cannot read program digests from {path}: {error}") from error
    digests = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                digests.append(coerce_digest(f"{path} line {number}", text.lower()))
            except ValueError as error:
                raise Failure(str(error)) from None
    return tuple(digests)


def _invalidate(args: argparse.Namespace) -> int:
    entry_filter = _filter(args)
    digests = None if args.program_digests is None else _read_digests(args.program_digests)
    if args.revision is not None:
        if digests is None or args.vendor is None or args.device is None:
            raise UsageError("--revision needs --vendor, --device and --program-digests")
        if args.backend is not None or args.key_version is not None:
            raise UsageError("--revision cannot be combined with --backend or --key-version")
        fingerprint = DeviceFingerprint.from_parts(
            args.vendor, args.device, args.revision, args.revision_extra
        )
        with _opened(args) as cache:
            removed = cache.invalidate_impacted([1] * len(digests), digests, fingerprint)
    else:
        if entry_filter == inspection.EntryFilter() and digests is None and not args.all:
            raise UsageError(
                "say what to invalidate: --backend, --vendor, --device, --key-version, "
                "--program-digests, or --all"
            )
        if digests is not None:
            entry_filter = dataclasses.replace(entry_filter, program_digests=digests)
        with _opened(args) as cache:
            with inspection.read_only(cache.path) as connection:
                keys = inspection.matching_keys(connection, entry_filter)
            removed = cache.delete_entries(keys)
    print(f"invalidated {removed} {'entry' if removed == 1 else 'entries'}")
    return 0


def _sql(args: argparse.Namespace) -> int:
    with _opened(args) as cache, inspection.read_only(cache.path) as connection:
        results = inspection.run_query(connection, args.query)
    if args.json:
        print(_json([dict(zip(r.columns, row, strict=True)) for r in results for row in r.rows]))
        return 0
    print("\n\n".join(_table(r.columns, r.rows) for r in results))
    return 0


def _check(args: argparse.Namespace) -> int:
    with _opened(args) as cache, inspection.read_only(cache.path) as connection:
        report = inspection.check(cache, connection, repair=args.repair, progress=_progress)
    if args.json:
        print(
            _json(
                {
                    "ok": report.ok,
                    "integrity": report.integrity,
                    "checked": report.checked,
                    "damaged": report.damaged,
                    "missing_blob": report.missing_blob,
                    "dropped": report.dropped,
                }
            )
        )
        return 0 if report.ok else 1
    print(f"integrity: {'; '.join(report.integrity[:5])}")
    print(
        f"checked {report.checked} entries: {len(report.damaged)} fail their checksum, "
        f"{len(report.missing_blob)} have no blob"
    )
    bad = report.bad_entries
    if bad and args.repair:
        print(f"dropped {report.dropped} bad entries")
    elif bad:
        print(f"bad entries: {inspection.describe(bad)}")
        print(f"{PROG}: {len(bad)} bad entries; 'check --repair' drops them", file=sys.stderr)
    if not report.sound_file:
        print(
            f"{PROG}: {report.integrity[0]}: the file is damaged; delete it (it is only a "
            "cache: vyre compiles again what it needs)",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


def _compact(args: argparse.Namespace) -> int:
    with _opened(args) as cache:
        path = cache.path
        readonly = cache.readonly
    if readonly:
        raise Failure(f"{path} cannot be written; compact needs write access")
    before = _file_bytes(path)
    connection = connect(path)
    try:
        connection.execute("VACUUM")
        connection.pragma("wal_checkpoint", "TRUNCATE")
    except apsw.Error as error:
        raise CacheError(f"compacting {path} failed: {error}") from error
    finally:
        connection.close()
    print(f"compacted {path}: {_bytes(before)} -> {_bytes(_file_bytes(path))}")
    return 0


def _import_dir(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise Failure(f"{root} is not a folder; give the root of a vyre pipeline cache")
    with _opened(args, create=True) as cache, inspection.read_only(cache.path) as connection:
        report = vyredir.import_dir(cache, connection, root, progress=_progress, note=_note)
    print(
        f"imported {report.imported} entries from {root} "
        f"({report.unchanged} already there, {report.skipped} skipped)"
    )
    return 0


def _export_dir(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if root.exists() and not root.is_dir():
        raise Failure(f"{root} is not a folder; give a folder to write the vyre cache into")
    with _opened(args) as cache, inspection.read_only(cache.path) as connection:
        report = vyredir.export_dir(connection, root, progress=_progress)
    left_out = f"; {report.keyed} keyed entries left out" if report.keyed else ""
    print(f"exported {report.exported} entries to {root}{left_out}")
    if report.damaged:
        print(
            f"{PROG}: {len(report.damaged)} entries fail their checksum and were not exported "
            f"({inspection.describe(report.damaged)}); 'check --repair' drops them",
            file=sys.stderr,
        )
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(args.path, count=args.count, keep=args.keep, seed=args.seed)


# -- the parser -------------------------------------------------------------------------


def _add_filters(command: argparse.ArgumentParser) -> None:
    command.add_argument("--backend", help="only entries of this backend (e.g. vulkan)")
    command.add_argument(
        "--vendor", type=_named("--vendor", _u32), help="only this PCI vendor id (0x10de or 4318)"
    )
    command.add_argument(
        "--device", type=_named("--device", _u32), help="only this PCI device id (0x2684 or 9860)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, maintain and exercise a vyre-sqlcache pipeline cache.",
        epilog="Exit status: 0 success, 1 not found / check failed / cache error, 2 usage.",
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=None,
        help=f"cache file (default: $VYRE_SQLCACHE_PATH, else {PipelineCache.default_path()})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, text: str, **extra: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, **extra)
        sub.set_defaults(handler=handler)
        return sub

    def json_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    info = command(
        "info",
        _info,
        "the cache's path, versions, size, cap, hit and miss totals, totals per device",
        aliases=["stats"],
    )
    json_option(info)

    ls = command("ls", _ls, "list entries (one row of the pipelines_v view each)")
    _add_filters(ls)
    ls.add_argument(
        "--flag",
        action="append",
        type=_named("--flag", _flag),
        metavar="NAME",
        help="only entries with this feature flag (F16, SUBGROUP_OPS, ...); repeatable",
    )
    ls.add_argument(
        "--min-size",
        type=_named("--min-size", _size),
        metavar="SIZE",
        help="only blobs of SIZE or more",
    )
    ls.add_argument(
        "--older-than",
        type=_named("--older-than", _duration_ms),
        metavar="AGE",
        help="only entries created longer ago than AGE (90s, 30m, 12h, 7d)",
    )
    ls.add_argument(
        "--sort",
        choices=sorted(inspection.SORTS),
        default="created",
        help="largest, newest, most recently used or most hit first (default: created)",
    )
    ls.add_argument("--reverse", action="store_true", help="smallest or oldest first")
    ls.add_argument(
        "--limit", type=_named("--limit", _positive), metavar="N", help="at most N entries"
    )
    json_option(ls)

    get = command("get", _get, "write the blob of an entry to a file")
    get.add_argument("key", type=_entry_key, metavar="KEY", help="the entry key (64 hex)")
    get.add_argument("-o", "--output", required=True, metavar="FILE", help="file, or - for stdout")

    put = command("put", _put, "store a file's bytes under a bare entry key")
    put.add_argument("key", type=_entry_key, metavar="KEY", help="the entry key (64 hex)")
    put.add_argument("file", type=Path, metavar="FILE")

    rm = command("rm", _rm, "delete entries by entry key")
    rm.add_argument("keys", type=_entry_key, nargs="+", metavar="KEY")

    invalidate = command(
        "invalidate",
        _invalidate,
        "delete the entries that match every option given",
        epilog="--program-digests FILE (64 hex a line, # comments) deletes the entries whose "
        "program digest is listed, on every device; imported entries know no program digest, "
        "so to reach them too give the device: --vendor, --device and --revision "
        "[--revision-extra], as vyre's DeviceFingerprint.from_parts.",
    )
    _add_filters(invalidate)
    invalidate.add_argument(
        "--key-version",
        type=_named("--key-version", _u32),
        metavar="N",
        help="key format version N",
    )
    invalidate.add_argument(
        "--program-digests", type=Path, metavar="FILE", help="entries of these programs"
    )
    invalidate.add_argument(
        "--revision", metavar="TEXT", help="driver revision of the device's fingerprint"
    )
    invalidate.add_argument(
        "--revision-extra", default="", metavar="TEXT", help="its extra revision string"
    )
    invalidate.add_argument("--all", action="store_true", help="every entry")

    sql = command("sql", _sql, "run SQL on a read-only connection (views: pipelines_v, stats_v)")
    sql.add_argument("query", metavar="QUERY")
    json_option(sql)

    check = command(
        "check", _check, "integrity_check and every blob's checksum; exit 1 if anything is bad"
    )
    check.add_argument("--repair", action="store_true", help="drop the bad entries")
    json_option(check)

    command("compact", _compact, "checkpoint the write-ahead log and VACUUM the file")

    import_dir = command(
        "import-dir",
        _import_dir,
        "import a vyre directory cache (<2 hex>/<64 hex>.bin); the files' mtimes become "
        "creation times; importing twice changes nothing",
    )
    import_dir.add_argument("dir", type=Path, metavar="DIR")

    export_dir = command(
        "export-dir",
        _export_dir,
        "write the entries vyre can look up as a vyre directory cache (atomic files, "
        "mtime = creation time); keyed entries are left out",
    )
    export_dir.add_argument("dir", type=Path, metavar="DIR")

    demo = command(
        "demo",
        _demo,
        "write, read and invalidate a few hundred synthetic pipelines",
    )
    demo.description = (
        "Write a few hundred synthetic pipelines (backend 'demo'), read them back, "
        "invalidate some by impact mask and print what happened. The demo's entries are "
        "removed at the end unless --keep."
    )
    demo.add_argument("--count", type=int, default=300, help="pipelines to write (default 300)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's entries")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "demo":
            if args.count < 1:
                parser.error(f"--count must be at least 1, got {args.count}")
            if args.seed is None:
                args.seed = int.from_bytes(os.urandom(8), "big")
        return int(args.handler(args))
    except UsageError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except (Failure, CacheError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`ls | head`): stop quietly, and let no flush at exit complain.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
