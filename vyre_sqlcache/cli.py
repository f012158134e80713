"""The `vyre-sqlcache` command line: a client of the library's public API.

Every cache is opened through `PipelineCache.open`, read-only (and so never migrated
or otherwise written) for the commands that only look: `info`, `ls`, `get`, `sql`,
`check` without `--repair` and `export-dir`.

Exit status: 0 success; 1 not found, check failed or a cache error; 2 usage; 130
interrupted (Ctrl-C); 143 and 129 ended by SIGTERM and SIGHUP, which end a command as
Ctrl-C does. Every error is one line on stderr, `vyre-sqlcache: ...`.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import (
    MAX_BLOB_BYTES,
    SCHEMA_VERSION,
    PipelineCache,
    RemoteSettings,
    RemoteTier,
    __version__,
    vyredir,
)
from . import _cli_demo as demo
from .config import ENV_MAX_SIZE, ENV_PATH, Settings, check_compression, expand_home, parse_size
from .errors import CacheError, CorruptCacheError, ReadOnlyCacheError
from .keys import (
    CURRENT_KEY_VERSION,
    U32_MAX,
    DeviceFingerprint,
    FeatureFlags,
    PipelineCacheKey,
    coerce_digest,
)

__all__ = ["main"]

PROG = "vyre-sqlcache"
T = TypeVar("T")

#: Bounds of number options, so that every value given fits SQLite's 64-bit integers.
INT64_MAX = 2**63 - 1
MAX_AGE_DAYS = 1_000_000
MAX_TIMEOUT_S = 1_000_000


class UsageError(Exception):
    """Options that do not go together: one line on stderr, exit status 2."""


class Failure(Exception):
    """Something asked for is not there (an entry, a file): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error on one line: `vyre-sqlcache: argument --x: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see '{self.prog} --help')\n")


# -- argument values: each raises ArgumentTypeError, which argparse names the option in ---


def _whole(low: int, high: int) -> Callable[[str], int]:
    """A decimal whole number from `low` to `high`."""

    def parse(text: str) -> int:
        digits = text.strip()
        # (ASCII: `isdigit` takes '²', which int() refuses)
        if not (digits.isascii() and digits.isdigit()) or not low <= int(digits) <= high:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low} to {high}, got {text!r}"
            )
        return int(digits)

    return parse


def _named(what: str) -> Callable[[str], str]:
    """An argparse type for the path of `what`: refuses an empty or blank one (a shell's
    unset "$OUT" made `export-dir ""` write into the current folder)."""

    def named(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty; give the path of {what}")
        return text

    return named


def _written(what: str) -> Callable[[str], str]:
    """`_named`, also refusing `-`: `what` is a database written beside its path and renamed
    into place, never to standard output (a file named `-` appeared)."""

    def written(text: str) -> str:
        if text == "-":
            raise argparse.ArgumentTypeError(
                f"'-' (standard output): {what} is a file written and renamed into place; "
                "give its path"
            )
        return _named(what)(text)

    return written


def _u32(text: str) -> int:
    """A u32 from decimal or 0x hex: `4318`, `0x10de`."""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number such as 4318 or 0x10de, got {text!r}"
        ) from None
    if not 0 <= value <= U32_MAX:
        raise argparse.ArgumentTypeError(f"expected a number in 0..{U32_MAX:#x}, got {text!r}")
    return value


def _entry_key(text: str) -> str:
    try:
        return coerce_digest("an entry key", text.strip().lower()).hex()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _hash(text: str) -> bytes:
    try:
        return coerce_digest("a hash", text.strip().lower())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_WORKGROUP = re.compile(r"^(\d+)[x,](\d+)[x,](\d+)$")


def _workgroup(text: str) -> tuple[int, int, int]:
    match = _WORKGROUP.match(text.strip().lower())
    if match is None or not all(0 <= int(v) <= U32_MAX for v in match.groups()):
        raise argparse.ArgumentTypeError(
            f"expected a workgroup size such as 64x1x1 (three numbers up to {U32_MAX}), "
            f"got {text!r}"
        )
    x, y, z = (int(v) for v in match.groups())
    return (x, y, z)


def _size(text: str) -> int:
    try:
        size = parse_size(text, name="a size")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size > INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected a size of at most 2**63-1 bytes, got {text!r}")
    return size


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _duration_ms(text: str) -> int:
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 30m, 12h or 7d, got {text!r}"
        )
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms > MAX_AGE_DAYS * _UNIT_MS["d"]:
        raise argparse.ArgumentTypeError(
            f"expected a duration of at most {MAX_AGE_DAYS}d, got {text!r}"
        )
    return ms


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"expected seconds above 0 and at most {MAX_TIMEOUT_S}, got {text!r}"
        )
    return value


def _compression(text: str) -> str:
    try:
        check_compression(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("compression ")) from error
    return text


def _flag(text: str) -> int:
    member = FeatureFlags.__members__.get(text.strip().upper())
    if member is not None:
        return int(member)
    if text[:1].isdigit():
        return _u32(text)
    names = ", ".join(FeatureFlags.__members__)
    raise argparse.ArgumentTypeError(
        f"unknown feature flag {text!r}; use one of {names} or a bit value"
    )


# -- output ---------------------------------------------------------------------------


#: Characters that would steer a terminal or forge a row (control characters, line and
#: paragraph separators, bidirectional overrides): names come from other machines too.
#: The backslash too, so that no name shows as another's escape.
_CONTROL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        return value.hex()
    return _CONTROL.sub(lambda found: found[0].encode("unicode_escape").decode(), str(value))


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
        _finite(value),
        indent=2,
        allow_nan=False,
        default=lambda v: v.hex() if isinstance(v, bytes) else str(v),
    )


def _finite(value: Any) -> Any:
    """`value` with each float that JSON cannot hold (inf, -inf, nan: SQL can make them)
    as the string Python writes for it; `json.dumps` would write bare Infinity and NaN,
    which strict parsers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _row_object(names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A result row as a JSON object: a column name repeated in the result (two tables'
    `entry_key`) gets `:2`, `:3` ... after it, where one key would hide the other."""
    seen: dict[str, int] = {}
    item: dict[str, Any] = {}
    for name, value in zip(names, row, strict=True):
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}:{seen[name]}"
        while key in item:  # a column really named `a:2` beside two `a`
            key += "'"
        item[key] = value
    return item


def _json_array(items: Iterable[Any]) -> None:
    """Print `items` as `_json(list(items))` would, one item at a time: the list is never
    in memory. Nothing is printed before the first item is there, so an error raised
    by it (a refused query, say) leaves standard output empty."""
    out = sys.stdout
    first = True
    for item in items:
        text = _json(item).replace("\n", "\n  ")
        out.write(f"[\n  {text}" if first else f",\n  {text}")
        first = False
    out.write("[]\n" if first else "\n]\n")


def _bytes(count: int | None) -> str:
    if count is None:
        return "none"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} ({size:.1f} {unit})" if unit != "B" else f"{count} B"
        size /= 1024
    raise AssertionError("unreachable")


def _mb(count: int | None) -> str:
    return "no cap" if count is None else f"{count / 1e6:.1f} MB"


def _describe(keys: Sequence[str], limit: int = 5) -> str:
    """A short list of keys for a message: the first few and how many more."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def _progress(items: Iterable[T], total: int, what: str) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal and tqdm (optional: the `progress`
    extra) is installed."""
    if not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=what, unit=" entries", file=sys.stderr, leave=False)


def _note(message: str) -> None:
    bars = sys.modules.get("tqdm")  # loaded only once a bar was drawn: write around it
    if bars is None:
        print(f"{PROG}: {message}", file=sys.stderr)
    else:
        bars.tqdm.write(f"{PROG}: {message}", file=sys.stderr)


# -- opening ----------------------------------------------------------------------------


def _path(args: argparse.Namespace) -> Path:
    """The cache file of `--path`, else $VYRE_SQLCACHE_PATH, else the default (`~` expanded)."""
    try:
        return PipelineCache.resolve_path(args.path)
    except ValueError as error:
        raise Failure(str(error)) from error


@contextmanager
def _opened(
    args: argparse.Namespace, *, write: bool = False, create: bool = False, **options: Any
) -> Iterator[PipelineCache]:
    """The cache of `--path`, opened strict (a damaged file is reported, never moved
    aside) and, unless `write`, read-only: never migrated, nothing written. Only
    `create` makes a new file; `options` go to `PipelineCache.open`."""
    path = _path(args)
    if not create and not path.exists():
        raise Failure(f"no cache at {path} (nothing has been cached there yet)")
    try:
        # A command's write is committed before it reports it: no write-behind.
        cache = PipelineCache.open(
            args.path, readonly=not write, strict=True, write_behind=False, **options
        )
    except ValueError as error:
        raise Failure(str(error)) from error
    with cache:
        if cache.disabled:
            raise Failure("the cache is disabled by VYRE_SQLCACHE_DISABLE; unset it to use it")
        yield cache


def _environment_layers() -> tuple[Path, ...]:
    """The layers of VYRE_SQLCACHE_LAYERS, none where VYRE_SQLCACHE_DISABLE is set (a
    malformed variable: a Failure naming it)."""
    try:
        settings = Settings.from_environment(ignore=("path", "remote"))
    except ValueError as error:
        raise Failure(str(error)) from error
    return () if settings.disabled else settings.layers


# -- commands ----------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    with _opened(args) as cache:
        stats = cache.stats()
        version = cache.schema_version()
        groups = cache.device_totals()
        cap = cache.file_max_bytes()
        here = cache.max_bytes
    info: dict[str, Any] = {
        "path": str(stats.path),
        "schema_version": version,
        "sqlite_version": PipelineCache.sqlite_version(),
        "entries": stats.entries,
        "blob_bytes": stats.blob_bytes,
        "stored_bytes": stats.stored_bytes,
        "dictionary_bytes": stats.dictionary_bytes,
        "compression_ratio": stats.compression_ratio,
        "file_bytes": stats.file_bytes,
        "max_bytes": cap,
        "hits": stats.total_hits,
        "misses": stats.total_misses,
        "evictions": stats.total_evictions,
        "checksum_failures": stats.total_checksum_failures,
        "flushes": stats.total_flushes,
        "by_device": groups,
        "remote": None if stats.remote is None else vars(stats.remote),
    }
    if args.json:
        print(_json(info))
        return 0
    lookups = stats.total_hits + stats.total_misses
    rate = f" ({100 * stats.total_hits / lookups:.1f}% hits)" if lookups else ""
    cap_text = _bytes(cap)
    if here != cap:
        cap_text += f"; {ENV_MAX_SIZE} gives {_bytes(here)} to processes that set it"
    lines = [
        ("path", info["path"]),
        ("schema version", version),
        ("SQLite", info["sqlite_version"]),
        ("entries", stats.entries),
        ("blob bytes", _bytes(stats.blob_bytes)),
        (
            "stored bytes",
            f"{_bytes(stats.stored_bytes)}, {stats.compression_ratio:.2f}x smaller; "
            f"dictionaries {_bytes(stats.dictionary_bytes)}",
        ),
        ("file bytes", _bytes(stats.file_bytes)),
        ("size cap", cap_text),
        ("hits / misses", f"{stats.total_hits} / {stats.total_misses}{rate}"),
        ("evictions", stats.total_evictions),
        ("checksum failures", stats.total_checksum_failures),
        ("flushes", stats.total_flushes),
    ]
    if stats.remote is not None:  # this command's own counters: it only looked
        remote = stats.remote
        lines += [
            ("remote", f"{remote.where} ({remote.mode}), breaker {remote.breaker}"),
            ("remote hits", f"{remote.hits} / misses {remote.misses}"),
            ("remote errors", f"{remote.errors} (timeouts {remote.timeouts})"),
            ("remote refused", f"{remote.rejected} entries failed verification"),
            ("remote bytes", f"{_bytes(remote.bytes_down)} down, {_bytes(remote.bytes_up)} up"),
            ("remote uploads", f"{remote.uploads} (dropped {remote.queue_drops}, too large "
             f"{remote.too_large}, queued {remote.queued})"),
        ]  # fmt: skip
    print("\n".join(f"{name:<18} {value}" for name, value in lines))
    if groups:
        columns = ["backend", "vendor_hex", "device_hex", "entries", "bytes", "stored_bytes"]
        print()
        print(
            _table(
                [
                    "backend",
                    "vendor",
                    "device",
                    "entries",
                    "bytes",
                    "stored",
                    "hits",
                    "last accessed",
                ],
                [[g[c] for c in columns] + [g["hits"], g["last_accessed"]] for g in groups],
            )
        )
    return 0


def _remote(args: argparse.Namespace) -> int:
    try:
        # The environment's settings (its prefix above all, which `rm --all` empties), with
        # --url standing for VYRE_SQLCACHE_REMOTE.
        env = dict(os.environ)
        if args.url:
            env["VYRE_SQLCACHE_REMOTE"] = args.url
        try:
            configured = Settings.from_environment(env).remote
        except ValueError as error:
            if args.url and str(error).startswith("VYRE_SQLCACHE_REMOTE: "):
                # (the URL in it is --url's)
                raise UsageError(f"argument --url: {str(error).split(': ', 1)[1]}") from None
            raise
        if args.action is None:
            raise UsageError("remote needs an action: ping, ls or rm")
        if configured is None:
            raise Failure("no remote: give --url redis://HOST:PORT/DB or set VYRE_SQLCACHE_REMOTE")
        # A command waits for answers: the cache's short read timeout is for hot paths.
        tier = RemoteTier(RemoteSettings(configured.url, prefix=configured.prefix, timeout_s=5.0))
    except (ValueError, ImportError) as error:
        raise Failure(str(error)) from error
    try:
        if args.action == "ping":
            print(f"PONG from {tier.settings.where} in {1000 * tier.ping():.2f} ms")
        elif args.action == "ls":
            rows = list(tier.scan())
            if args.json:
                _json_array({"entry_key": k.hex(), "bytes": size} for k, size in rows)
            else:
                for key, size in sorted(rows):
                    print(f"{key.hex()}  {size}")
                print(f"{len(rows)} entries, {_bytes(sum(s for _, s in rows))}", file=sys.stderr)
        else:
            if args.all and args.keys:
                raise UsageError("remote rm takes entry keys or --all, not both")
            if args.all:
                if not args.yes:
                    raise UsageError(
                        f"remote rm --all deletes every entry under {tier.settings.prefix!r} "
                        f"on {tier.settings.where} for every user; add --yes to do it"
                    )
                keys = [key for key, _ in tier.scan()]
            elif args.keys:
                keys = [bytes.fromhex(k) for k in args.keys]
            else:
                raise UsageError("remote rm needs entry keys (64 hex) or --all --yes")
            deleted = sum(tier.delete(keys[i : i + 1000]) for i in range(0, len(keys), 1000))
            print(f"{deleted} entries deleted from {tier.settings.where}")
    finally:
        tier.close()
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The `entries()` filters the options ask for (None where they say nothing)."""
    flags = 0
    for bit in getattr(args, "flag", None) or ():
        flags |= bit
    older = getattr(args, "older_than", None)
    return {
        "backend": args.backend,
        "vendor": args.vendor,
        "device": args.device,
        "flags": flags,
        "min_size": getattr(args, "min_size", None),
        "created_before_ms": None if older is None else time.time_ns() // 10**6 - older,
        "key_version": getattr(args, "key_version", None),
    }


#: Rows per page of `ls --json` (each page is one short read of the cache).
_JSON_PAGE = 2000

_LS_COLUMNS = (
    ("entry key", "entry_key"),
    ("kind", "kind"),
    ("backend", "backend"),
    ("vendor", "vendor_hex"),
    ("device", "device_hex"),
    ("flags", "feature_flags"),
    ("workgroup", "workgroup"),
    ("size", "blob_size"),
    ("stored", "stored_size"),
    ("created", "created"),
    ("accessed", "accessed"),
    ("hits", "hits"),
    ("name", "name"),
)


def _ls(args: argparse.Namespace) -> int:
    listing = {
        "sort": args.sort,
        "reverse": args.reverse,
        "limit": args.limit,
        "namespace": args.namespace,
    }
    with _opened(args) as cache:
        if args.json:
            # Page by page: memory stays bounded however many entries there are.
            _json_array(cache.iter_entries(**_filters(args), **listing, page=_JSON_PAGE))
            return 0
        rows = cache.entries(**_filters(args), **listing)
    if rows:
        print(_table([h for h, _ in _LS_COLUMNS], [[r[c] for _, c in _LS_COLUMNS] for r in rows]))
    return 0


def _get(args: argparse.Namespace) -> int:
    path = _path(args)
    layers = _environment_layers()
    if args.output != "-":
        for layer in layers:
            part = PipelineCache.file_of(args.output, layer)
            if part is not None:
                raise UsageError(
                    f"argument -o/--output: {args.output} is {part.replace('cache', 'layer', 1)} "
                    f"{layer}; give another file"
                )
    if not path.exists() and layers:
        # A user who has no cache yet still reads the shipped layers, as a read would.
        try:
            blob = PipelineCache.peek_layers(args.key, layers)
        except ValueError as error:
            raise Failure(str(error)) from error
        part = None
        if blob is None:
            raise Failure(f"no cache at {path}, and no layer holds an entry with key {args.key}")
    else:
        with _opened(args) as cache:
            blob = cache.peek_entry(args.key, layers=True)
            part = None if args.output == "-" else cache.own_file(args.output)
    if blob is None:
        raise Failure(f"no entry with key {args.key}")
    if args.output == "-":
        sys.stdout.buffer.write(blob)
        sys.stdout.buffer.flush()
    else:
        if part is not None:
            raise UsageError(f"argument -o/--output: {args.output} is {part}; give another file")
        if not args.output or Path(args.output).is_dir():
            raise UsageError(
                f"argument -o/--output: {args.output!r} is a folder or empty; give a file"
            )
        _write_file(Path(args.output), blob)
        print(f"wrote {len(blob)} bytes to {args.output}")
    return 0


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a regular file (or a new one, or the
    file a link names) is written beside it and renamed over it, so a full disk leaves it
    as it was; a device or FIFO (`/dev/null`) is written to as it is."""
    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not target.is_file():
        try:
            target.write_bytes(data)
        except OSError as error:  # (a device: /dev/full)
            raise Failure(f"cannot write {len(data)} bytes to {path}: {error.strerror}") from error
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, target)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise Failure(
                f"no room to write {len(data)} bytes to {path} ({error.strerror}); it is left "
                "as it was: free space (or raise the file size limit, `ulimit -f`)"
            ) from error
        # Named by the path given, not the temporary name written first (beside it, in
        # the same folder: a folder that takes no new file, /proc, says so).
        raise Failure(
            f"cannot write {path} (a new file in {target.parent}): {error.strerror or error}"
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


def _read_blob(name: str, *, what: str = "an entry") -> bytes:
    """The bytes of a regular file, or of standard input for `-`; at most 64 MiB are
    accepted, and never more than that (and a byte) is read."""
    too_large = f"over the {MAX_BLOB_BYTES}-byte limit of {what}"
    if name == "-":
        if sys.stdin is None:
            raise Failure("standard input is closed; give a file, or pipe the bytes in")
        data = vyredir.read_bounded(sys.stdin.fileno())
        if len(data) > MAX_BLOB_BYTES:
            raise Failure(f"standard input holds more than {MAX_BLOB_BYTES} bytes, {too_large}")
        return data
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise Failure(f"cannot read {name}: {error.strerror or error}") from error
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Failure(f"cannot read {name}: it is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise Failure(
                f"{name} is not a regular file (a FIFO, socket or device); give a file, "
                "or - to read standard input"
            )
        if info.st_size > MAX_BLOB_BYTES:
            raise Failure(f"{name} is {info.st_size} bytes, {too_large}")
        data = vyredir.read_bounded(fd)
    except OSError as error:
        raise Failure(f"cannot read {name}: {error.strerror or error}") from error
    finally:
        os.close(fd)
    if len(data) > MAX_BLOB_BYTES:
        raise Failure(f"{name} grew past {MAX_BLOB_BYTES} bytes while it was read, {too_large}")
    return data


def _put(args: argparse.Namespace) -> int:
    blob = _read_blob(args.file)
    with _opened(args, write=True, create=True) as cache:
        cache.put_entry(args.key, blob)
        cache.flush()
    print(f"stored {len(blob)} bytes under {args.key}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    keys = list(dict.fromkeys(args.keys))
    with _opened(args, write=True) as cache:
        present = {row["entry_key"] for row in cache.entries(entry_keys=keys)}
        removed = cache.delete_entries([k for k in keys if k in present])
        # The others may be in a read-only layer: deleting them there hides them (one
        # key a call, to know which were found).
        for key in keys:
            if key not in present and cache.delete_entries([key]):
                present.add(key)
                removed += 1
        if removed:
            cache.flush()
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'}")
    missing = [k for k in keys if k not in present]
    for key in missing:
        print(f"{PROG}: no entry with key {key}", file=sys.stderr)
    return 1 if missing else 0


def _read_digests(path: Path) -> tuple[bytes, ...]:
    """Program digests from a file: 64 hex characters a line; blank lines and # comments.
    A regular file or `-` (standard input), of at most 64 MiB (a million digests)."""
    try:
        lines = _read_blob(str(path), what="a digests file").decode("utf-8").splitlines()
    except (Failure, UnicodeDecodeError) as error:
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


def _partner(args: argparse.Namespace, option: str, needs: str) -> None:
    """Raise UsageError if `option` is given without `needs`, which it only qualifies (a
    bundle given --driver-extra alone bundled every driver's entries)."""
    if getattr(args, option) is not None and getattr(args, needs) is None:
        flag, other = (f"--{name.replace('_', '-')}" for name in (option, needs))
        raise UsageError(f"{flag} qualifies {other}: give {other} too, or leave {flag} out")


def _invalidate(args: argparse.Namespace) -> int:
    _partner(args, "revision_extra", "revision")
    filters = _filters(args)
    digests = None if args.program_digests is None else _read_digests(args.program_digests)
    if args.revision is not None:
        if digests is None or args.vendor is None or args.device is None:
            raise UsageError("--revision needs --vendor, --device and --program-digests")
        if args.backend is not None or args.key_version is not None:
            raise UsageError("--revision cannot be combined with --backend or --key-version")
        fingerprint = DeviceFingerprint.from_parts(
            args.vendor, args.device, args.revision, args.revision_extra or ""
        )
        with _opened(args, write=True) as cache:
            removed = cache.invalidate_impacted([1] * len(digests), digests, fingerprint)
            cache.flush()
    else:
        nothing = all(value is None for name, value in filters.items() if name != "flags")
        if nothing and digests is None and not args.all:
            raise UsageError(
                "say what to invalidate: --backend, --vendor, --device, --key-version, "
                "--program-digests, or --all"
            )
        with _opened(args, write=True) as cache:
            removed = cache.delete_where(**filters, program_digests=digests, everything=args.all)
            cache.flush()
    print(f"invalidated {removed} {'entry' if removed == 1 else 'entries'}")
    return 0


def _sql(args: argparse.Namespace) -> int:
    with _opened(args) as cache:
        try:
            if args.json:
                # Row by row as SQLite steps: a result of any size is never in memory.
                rows = cache.iter_query(args.query, timeout=args.timeout)
                try:
                    _json_array(_row_object(names, row) for names, row in rows)
                finally:
                    if isinstance(rows, Generator):
                        rows.close()  # its read transaction ends here, not when it is freed
                return 0
            results = cache.query(args.query, timeout=args.timeout)
        except ReadOnlyCacheError as error:
            raise Failure(
                f"{error}: 'sql' only reads the cache (use rm, invalidate, check --repair "
                "or compact to change it)"
            ) from error
    print("\n\n".join(_table(r.columns, r.rows) for r in results))
    return 0


def _check(args: argparse.Namespace) -> int:
    def checking(ids: list[int]) -> Iterable[int]:
        return _progress(ids, len(ids), "checking")

    moved = None
    try:
        with _opened(args, write=args.repair) as cache:
            report = cache.check(repair=args.repair, progress=checking)
    except CorruptCacheError as error:
        if not args.repair:
            raise
        # Not even its header or schema can be read: nothing to rebuild from. The library
        # moves such a file aside (kept for a post-mortem) and starts an empty cache.
        moved = str(error)
        with PipelineCache.open(args.path, verify=True) as cache:
            report = cache.check()
    if args.json:
        print(
            _json(
                {
                    "ok": report.ok,
                    "integrity": report.integrity,
                    "checked": report.checked,
                    "damaged": report.damaged,
                    "missing_blob": report.missing_blob,
                    "unreadable": report.unreadable,
                    "dropped": report.dropped,
                    "rebuilt": report.rebuilt,
                    "kept": report.kept,
                    "integrity_after": report.integrity_after,
                    "wrong_size": report.wrong_size,
                    "stray_blobs": report.stray_blobs,
                    "wrong_totals": report.wrong_totals,
                    "corrected": report.corrected,
                    "moved_aside": moved,
                }
            )
        )
        return 0 if report.ok else 1
    if moved is not None:
        print(f"moved the damaged file aside ({moved}) and started an empty cache at {cache.path}")
        return 0 if report.ok else 1
    print(f"integrity: {'; '.join(report.integrity[:5])}")
    unreadable = f", {report.unreadable} cannot be read" if report.unreadable else ""
    print(
        f"checked {report.checked} entries: {len(report.damaged)} fail their checksum, "
        f"{len(report.missing_blob)} have no blob{unreadable}"
    )
    wrong = [
        *(
            [f"{len(report.wrong_size)} entries record a size that is not their bytes'"]
            if report.wrong_size
            else []
        ),
        *([f"{report.stray_blobs} blobs have no entry"] if report.stray_blobs else []),
        *(
            [f"the totals in meta are wrong ({'; '.join(report.wrong_totals)})"]
            if report.wrong_totals
            else []
        ),
    ]
    if wrong:
        print(f"{'; '.join(wrong)}{': corrected' if report.corrected else ''}")
    bad = report.bad_entries
    if report.rebuilt:
        print(
            f"rebuilt {cache.path} from its {report.kept} readable entries whose checksums "
            f"hold; integrity now: {'; '.join((report.integrity_after or ('?',))[:5])}"
        )
    elif bad and args.repair:
        print(f"dropped {report.dropped} bad entries")
    elif bad:
        print(f"bad entries: {_describe(bad)}")
    if not report.sound_file and not report.rebuilt:
        print(
            f"{PROG}: {report.integrity[0]}: the file is damaged; 'check --repair' rebuilds "
            "it from its readable entries",
            file=sys.stderr,
        )
    elif bad and not args.repair:
        print(f"{PROG}: {len(bad)} bad entries; 'check --repair' drops them", file=sys.stderr)
    if wrong and not report.corrected:
        print(f"{PROG}: 'check --repair' corrects {'; '.join(wrong)}", file=sys.stderr)
    return 0 if report.ok else 1


def _compact(args: argparse.Namespace) -> int:
    if args.compression is not None and not args.recompress:
        raise UsageError("argument --compression: it is the setting of --recompress; add that")
    options = {} if args.compression is None else {"compression": args.compression}
    with _opened(args, write=True, **options) as cache:
        if args.recompress:
            done = cache.recompress()
            kept = f"; {done.kept} kept as they were (no smaller)" if done.kept else ""
            damaged = f"; {done.damaged} damaged left for `check --repair`" if done.damaged else ""
            print(
                f"recompressed {done.rewritten} entries ({cache.stats().compression}): "
                f"{_bytes(done.before)} -> {_bytes(done.after)} stored{kept}{damaged}"
            )
        before, after = cache.compact()
    print(f"compacted {cache.path}: {_bytes(before)} -> {_bytes(after)}")
    return 0


@contextmanager
def _output_checked() -> Iterator[None]:
    """Report an output file the library refuses (the cache itself) as a usage error."""
    try:
        yield
    except ValueError as error:
        raise UsageError(f"argument -o/--output: {error}") from error


def _bundle(args: argparse.Namespace) -> int:
    driver = None
    _partner(args, "driver_extra", "driver")
    if args.driver is not None:
        extra = args.driver_extra or ""
        driver = DeviceFingerprint.from_parts(0, 0, args.driver, extra).driver_digest
    with _opened(args) as cache, _output_checked():
        report = cache.bundle(
            args.output,
            backend=args.backend,
            vendor=args.vendor,
            device=args.device,
            driver=driver,
            key_version=args.key_version,
            overwrite=args.force,
        )
    bad = f"; {report.skipped_bad} damaged entries skipped" if report.skipped_bad else ""
    print(
        f"bundled {report.entries} entries ({_bytes(report.blob_bytes)} of blobs, "
        f"{report.dictionaries} dictionaries) into {report.path} ({_bytes(report.file_bytes)})"
        f"{bad}"
    )
    return 0


def _copy(args: argparse.Namespace) -> int:
    with _opened(args) as cache, _output_checked():
        report = cache.copy(args.output, overwrite=args.force)
    print(
        f"copied {cache.path} ({report.entries} entries, {_bytes(report.blob_bytes)} of "
        f"blobs) into {report.path} ({_bytes(report.file_bytes)})"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    into = args.into if args.into is not None else args.path
    try:
        cache = PipelineCache.open(into, strict=True, write_behind=False)
    except ValueError as error:
        raise Failure(str(error)) from error
    with cache:
        if cache.disabled:
            raise Failure("the cache is disabled by VYRE_SQLCACHE_DISABLE; unset it to use it")
        report = cache.merge(args.sources)
        path = cache.path
    print(
        f"merged {len(report.sources)} caches into {path}: {report.added} added, "
        f"{report.replaced} replaced (newer), {report.kept_existing} kept (existing as new "
        f"or newer), {report.skipped_bad} damaged skipped, {report.too_large} over the cap, "
        f"{report.evicted} evicted for the cap"
    )
    return 0


def _import_dir(args: argparse.Namespace) -> int:
    root = expand_home(args.dir, name="DIR")
    if not root.is_dir():
        raise Failure(f"{root} is not a folder; give the root of a vyre pipeline cache")
    with _opened(args, write=True, create=True) as cache:
        report = vyredir.import_dir(cache, root, progress=_progress, note=_note)
        cap = cache.max_bytes
    line = (
        f"imported {report.imported} entries from {root} "
        f"({report.unchanged} already there, {report.skipped} skipped)"
    )
    if report.evicted:
        line += (
            f", of which {report.evicted} were evicted by the size cap of {_bytes(cap)}: "
            f"{report.kept} are in the cache"
        )
    print(line)
    return 0


def _export_dir(args: argparse.Namespace) -> int:
    root = expand_home(args.dir, name="DIR")
    if root.exists() and not root.is_dir():
        raise Failure(f"{root} is not a folder; give a folder to write the vyre cache into")
    if root.is_symlink() and not root.exists():
        raise Failure(
            f"{root} is a symbolic link to {os.readlink(root)}, which does not exist; "
            "create that folder, or give another"
        )
    with _opened(args) as cache:
        try:
            report = vyredir.export_dir(cache, root, progress=_progress)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise Failure(
                    f"export-dir stopped: no room for the files under {root} "
                    f"({error.strerror}); the entry files written so far are whole: free "
                    "space (or raise the file size limit, `ulimit -f`) and run it again"
                ) from error
            raise Failure(
                f"export-dir stopped: cannot write {error.filename or root} ({error.strerror}); "
                "the entry files written so far are whole: make it writable (or give "
                "another DIR) and run it again"
            ) from error
    left = [
        f"{n} {kind} entries" for n, kind in ((report.keyed, "keyed"), (report.named, "named")) if n
    ]
    left_out = f"; {' and '.join(left)} left out" if left else ""
    print(f"exported {report.exported} entries to {root}{left_out}")
    problems = []
    if report.damaged:
        problems.append(
            f"{len(report.damaged)} entries fail their checksum and were not exported "
            f"({_describe(report.damaged)}); 'check --repair' drops them"
        )
    if report.refused:
        count = sum(report.refused.values())
        problems.append(
            f"{count} entries were not exported: {_describe(sorted(report.refused))} "
            "is a symbolic link or not a folder, and export never writes through one"
        )
    if report.blocked:
        problems.append(
            f"{len(report.blocked)} entries were not exported: a folder stands where each "
            f"one's file goes ({_describe(report.blocked)}); move it and export again"
        )
    if problems:
        print(f"{PROG}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def _run_demo(
    writer: PipelineCache, workload: demo.Workload, *, keep: bool
) -> tuple[demo.Outcome, Any, int]:
    """The demo on `writer`'s file: its outcome, the stats after it, what it removed."""
    with PipelineCache.open(writer.path, readonly=True) as reader:
        outcome = demo.run(writer, reader, workload)
    after = writer.stats()
    return outcome, after, 0 if keep else demo.remove(writer, workload)


def _demo(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "big")
    workload = demo.Workload(seed=seed, count=args.count)
    created = not _path(args).exists()
    # The folders the demo will make (~/.cache and ~/.cache/vyre, in a new home), deepest
    # first: removed with the file.
    made = [folder for folder in _path(args).parents if not folder.exists()]
    # Uncompressed, so that its bytes are known (the room below) and it trains no
    # dictionary, and kept from a shared tier unless kept at all (the team's Redis would
    # hold the made-up entries).
    options: dict[str, Any] = {"compression": "off"}
    if not args.keep:
        options["remote"] = None
    with _opened(args, write=True, create=True, **options) as cache:
        path = cache.path
        before = cache.stats()
        cap = cache.max_bytes
        # The cap counts bytes as stored and the dictionaries: where those and the demo's
        # bytes pass it, the oldest entries (the user's) would be evicted.
        held = before.stored_bytes + before.dictionary_bytes
        room = cap is None or held + workload.total_bytes <= cap
        print(f"cache: {path}")
        if room:
            outcome, after, removed = _run_demo(cache, workload, keep=args.keep)
            left = len(cache)
    if created and (not room or not args.keep):
        # The demo made the file (and its folders): leave none behind, as there was none.
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        with suppress(OSError):  # (one another program filled meanwhile stays)
            for made_folder in made:
                made_folder.rmdir()
    if not room:
        print(
            f"the cache holds {_mb(held)} as stored under its size cap of "
            f"{_mb(cap)}: the demo's {_mb(workload.total_bytes)} would evict entries, so the "
            "demo runs on a temporary file and leaves the cache as it is"
        )
        with (
            tempfile.TemporaryDirectory(prefix="vyre-sqlcache-demo-") as folder,
            PipelineCache.open(
                Path(folder) / "demo.sqlite3",
                max_bytes=None,
                write_behind=False,
                compression="off",
                layers=[],
                remote=None,  # (a temporary file's entries are nobody's to share)
            ) as scratch,
        ):
            print(f"cache: {scratch.path} (temporary)")
            outcome, after, removed = _run_demo(scratch, workload, keep=True)
    print(
        f"wrote    {outcome.written} pipelines ({workload.total_bytes / 1e6:.1f} MB) in "
        f"{outcome.write_s * 1e3:.1f} ms"
    )
    print(
        f"read     {outcome.written} pipelines in {outcome.read_s * 1e3:.1f} ms: "
        f"{outcome.intact} intact"
    )
    print(
        f"invalidated {outcome.invalidated} pipelines by impact mask ({outcome.marked} "
        f"marked); {outcome.missing_after} now miss"
    )
    print(
        f"totals:  {after.entries} entries, {after.blob_bytes / 1e6:.1f} MB of blobs in a "
        f"{after.file_bytes / 1e6:.1f} MB file ({before.entries if room else 0} entries "
        "before the demo)"
    )
    if not room:
        kept = " (--keep keeps nothing there)" if args.keep else ""
        print(f"removed the temporary file{kept}")
    elif created and not args.keep:
        print(f"removed {path}, which the demo had created")
    elif not args.keep:
        print(
            f"removed the demo's {removed} entries: {left} entries remain (use --keep to keep them)"
        )
    return 0 if outcome.ok(workload.count) else 1


def _asked_fingerprint(args: argparse.Namespace, what: str) -> DeviceFingerprint:
    """The device of `explain`'s options: --vendor, --device and the driver, as
    --revision [--revision-extra] (vyre's from_parts) or --driver-digest."""
    if args.vendor is None or args.device is None:
        raise UsageError(f"{what} needs --vendor and --device, and --revision or --driver-digest")
    if (args.revision is None) == (args.driver_digest is None):
        raise UsageError(f"{what} needs --revision or --driver-digest (one of them)")
    if args.driver_digest is not None:
        return DeviceFingerprint(args.vendor, args.device, args.driver_digest)
    return DeviceFingerprint.from_parts(
        args.vendor, args.device, args.revision, args.revision_extra or ""
    )


def _explanation_lines(why: Any) -> list[str]:
    """An explanation for people: the summary, then the details."""
    lines = [
        why.summary,
        f"  outcome    {why.outcome}",
        f"  reason     {why.reason}",
        f"  entry key  {why.entry_key}",
    ]
    if why.where is not None:
        lines.append(f"  where      {why.where}")
    if why.departure is not None:
        lines.append(f"  departed   {why.departure.reason} at {why.departure.at}")
    if why.nearest:
        lines.append("  nearest entries (field: cached -> asked):")
        for near in why.nearest:
            differs = "; ".join(f"{d.field}: {d.cached} -> {d.asked}" for d in near.differences)
            lines.append(f"    {near.entry_key}  {differs}")
    return lines


def _explain(args: argparse.Namespace) -> int:
    _partner(args, "revision_extra", "revision")
    given = [
        name
        for name, value in (
            ("--entry-key", args.entry_key),
            ("--program-digest", args.program_digest),
            ("--shader-hash", args.shader_hash),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise UsageError(
            "give --entry-key, --program-digest or --shader-hash (with the other key fields), "
            "one of them"
        )
    key = None
    fingerprint = None
    if args.shader_hash is not None:
        missing = [
            option
            for option, value in (
                ("--layout-hash", args.layout_hash),
                ("--push-constant-size", args.push_constant_size),
                ("--workgroup", args.workgroup),
                ("--backend", args.backend),
            )
            if value is None
        ]
        if missing:
            raise UsageError(f"--shader-hash needs {', '.join(missing)} too")
        flags = 0
        for bit in args.flag or ():
            flags |= bit
        try:
            key = PipelineCacheKey(
                args.shader_hash,
                args.layout_hash,
                args.push_constant_size,
                args.workgroup,
                FeatureFlags(flags),
                args.backend,
                args.key_version,
            )
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from error
        fingerprint = _asked_fingerprint(args, "--shader-hash")
    elif args.program_digest is not None:
        fingerprint = _asked_fingerprint(args, "--program-digest")
    with _opened(args) as cache:
        if key is not None and fingerprint is not None:
            why = cache.explain(key, fingerprint)
        elif fingerprint is not None:
            why = cache.explain_program(args.program_digest, fingerprint)
        else:
            why = cache.explain_entry(args.entry_key)
    if args.json:
        print(_json(why.as_dict()))
    else:
        print("\n".join(_explanation_lines(why)))
    return 0


def _misses(args: argparse.Namespace) -> int:
    with _opened(args) as cache:
        misses = cache.misses(limit=args.limit)
    if args.json:
        print(
            _json(
                [
                    {
                        "at": miss.at,
                        "call": miss.call,
                        "pid": miss.pid,
                        "entry_key": miss.entry_key,
                        "explanation": miss.explanation.as_dict(),
                    }
                    for miss in misses
                ]
            )
        )
        return 0
    if not misses:
        print(
            "no misses logged (the miss log is kept by processes that set "
            "VYRE_SQLCACHE_LOG_MISSES=1 or open the cache with log_misses=True)"
        )
    for miss in misses:
        print(f"{miss.at}  {miss.call:<8} pid {miss.pid:<7} {miss.entry_key}")
        reason, summary = miss.explanation.reason, miss.explanation.summary
        print(f"    {summary}" if summary.startswith(reason) else f"    {reason}: {summary}")
    return 0


# -- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    try:
        default = str(PipelineCache.default_path())
    except CacheError:  # no home folder: the command that needs it says so
        default = "the user's cache folder, which this user lacks"
    path_help = f"cache file (default: ${ENV_PATH}, else {default})"
    parser = _Parser(
        prog=PROG,
        description="Inspect, maintain and exercise a vyre-sqlcache pipeline cache.",
        epilog="Exit status: 0 success, 1 not found / check failed / cache error, 2 usage, "
        "130 interrupted. Options go before or after the command.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (SQLite {PipelineCache.sqlite_version()}, "
        f"schema {SCHEMA_VERSION})",
    )
    parser.add_argument(
        "--path", type=_named("the cache file"), metavar="FILE", default=None, help=path_help
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, text: str, **extra: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, **extra)
        sub.set_defaults(handler=handler)
        # Also after the command (`info --path X`); SUPPRESS keeps one given before it.
        sub.add_argument(
            "--path",
            type=_named("the cache file"),
            metavar="FILE",
            default=argparse.SUPPRESS,
            help=path_help,
        )
        return sub

    def json_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--backend", help="only entries of this backend (e.g. vulkan)")
        sub.add_argument("--vendor", type=_u32, help="only this PCI vendor id (0x10de or 4318)")
        sub.add_argument("--device", type=_u32, help="only this PCI device id (0x2684 or 9860)")

    info = command(
        "info",
        _info,
        "the cache's path, versions, size, cap, hit and miss totals, totals per device",
        aliases=["stats"],
    )
    json_option(info)

    ls = command("ls", _ls, "list entries (one row of the pipelines_v view each)")
    filters(ls)
    ls.add_argument(
        "--flag",
        action="append",
        type=_flag,
        metavar="NAME",
        help="only entries with this feature flag (F16, SUBGROUP_OPS, ...); repeatable",
    )
    ls.add_argument("--min-size", type=_size, metavar="SIZE", help="only blobs of SIZE or more")
    ls.add_argument(
        "--namespace", help="only named entries of this namespace (e.g. triton: Triton's kernels)"
    )
    ls.add_argument(
        "--older-than",
        type=_duration_ms,
        metavar="AGE",
        help="only entries created longer ago than AGE (90s, 30m, 12h, 7d)",
    )
    ls.add_argument(
        "--sort",
        choices=PipelineCache.ENTRY_SORTS,
        default="created",
        help="largest, newest, most recently used or most hit first (default: created)",
    )
    ls.add_argument("--reverse", action="store_true", help="smallest or oldest first")
    ls.add_argument("--limit", type=_whole(1, INT64_MAX), metavar="N", help="at most N entries")
    json_option(ls)

    get = command("get", _get, "write the blob of an entry to a file")
    get.add_argument("key", type=_entry_key, metavar="KEY", help="the entry key (64 hex)")
    get.add_argument(
        "-o",
        "--output",
        type=_named("the file to write"),
        required=True,
        metavar="FILE",
        help="file, or - for stdout",
    )

    put = command("put", _put, "store a file's bytes (64 MiB at most) under a bare entry key")
    put.add_argument("key", type=_entry_key, metavar="KEY", help="the entry key (64 hex)")
    put.add_argument(
        "file",
        type=_named("the file to read"),
        metavar="FILE",
        help="a regular file, or - for standard input",
    )

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
    filters(invalidate)
    invalidate.add_argument("--key-version", type=_u32, metavar="N", help="key format version N")
    invalidate.add_argument(
        "--program-digests",
        type=lambda text: Path(_named("the file of program digests")(text)),
        metavar="FILE",
        help="entries of these programs",
    )
    invalidate.add_argument(
        "--revision", metavar="TEXT", help="driver revision of the device's fingerprint"
    )
    invalidate.add_argument(
        "--revision-extra", metavar="TEXT", help="its extra revision string (with --revision)"
    )
    invalidate.add_argument("--all", action="store_true", help="every entry")

    sql = command(
        "sql",
        _sql,
        "run SQL that only reads (views: pipelines_v, stats_v, departures_v, misses_v, "
        "layer_masks_v, info_v); Ctrl-C stops it",
    )
    sql.add_argument("query", metavar="QUERY")
    sql.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="stop the query after SECONDS"
    )
    json_option(sql)

    check = command(
        "check", _check, "integrity_check and every blob's checksum; exit 1 if anything is bad"
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="drop the bad entries; rebuild a damaged file from its readable entries",
    )
    json_option(check)

    compact = command("compact", _compact, "checkpoint the write-ahead log and VACUUM the file")
    compact.add_argument(
        "--recompress",
        action="store_true",
        help="first store every entry again as the compression setting decides (dictionaries "
        "retrained; with 'off', raw)",
    )
    compact.add_argument(
        "--compression",
        type=_compression,
        metavar="SETTING",
        help="auto, off or a zstd level from 1 to 22, for --recompress (default: "
        "$VYRE_SQLCACHE_COMPRESSION, else auto)",
    )

    bundle = command(
        "bundle",
        _bundle,
        "write the entries that match into a read-only layer file to ship (see "
        "VYRE_SQLCACHE_LAYERS); every entry verified, the file vacuumed",
    )
    bundle.add_argument(
        "-o",
        "--output",
        type=_written("the layer file"),
        required=True,
        metavar="FILE",
        help="the layer file",
    )
    filters(bundle)
    bundle.add_argument(
        "--driver", metavar="REVISION", help="only entries of this driver revision string"
    )
    bundle.add_argument(
        "--driver-extra", metavar="TEXT", help="its extra revision string (with --driver)"
    )
    bundle.add_argument("--key-version", type=_u32, metavar="N", help="key format version N")
    bundle.add_argument("--force", action="store_true", help="replace FILE if it exists")

    copy = command(
        "copy",
        _copy,
        "write a snapshot of the whole cache into a new file, safe while processes use "
        "the cache (a file copy then is torn)",
    )
    copy.add_argument(
        "-o",
        "--output",
        type=_written("the copy"),
        required=True,
        metavar="FILE",
        help="the new file",
    )
    copy.add_argument("--force", action="store_true", help="replace FILE if it exists")

    merge = command(
        "merge",
        _merge,
        "admit the entries of other cache files (only read) into a cache: every entry "
        "verified, the newest created wins, the cap holds",
    )
    merge.add_argument(
        "sources",
        type=_named("a cache to merge from"),
        nargs="+",
        metavar="SRC",
        help="cache files to merge from",
    )
    merge.add_argument(
        "--into",
        type=_named("the cache to merge into"),
        metavar="DST",
        default=None,
        help="the cache to merge into (default: --path)",
    )

    explain = command(
        "explain",
        _explain,
        "why a lookup hits or misses: the entry, the departure record (evicted, "
        "invalidated, deleted, damaged), or the nearest entries and the fields that differ",
        epilog="Give --entry-key; or --program-digest (vyre's read) with the device; or "
        "--shader-hash with the other key fields and the device. The device is --vendor, "
        "--device and --revision [--revision-extra] (as vyre's DeviceFingerprint.from_parts) "
        "or --driver-digest.",
    )
    explain.add_argument("--entry-key", type=_entry_key, metavar="HEX", help="the entry key")
    explain.add_argument(
        "--program-digest", type=_hash, metavar="HEX", help="the program digest (vyre's read)"
    )
    explain.add_argument("--shader-hash", type=_hash, metavar="HEX")
    explain.add_argument("--layout-hash", type=_hash, metavar="HEX", help="bind group layout hash")
    explain.add_argument("--push-constant-size", type=_u32, metavar="N")
    explain.add_argument("--workgroup", type=_workgroup, metavar="XxYxZ", help="e.g. 64x1x1")
    explain.add_argument(
        "--flag",
        action="append",
        type=_flag,
        metavar="NAME",
        help="a feature flag (F16, SUBGROUP_OPS, ... or a bit value); repeatable",
    )
    explain.add_argument("--backend", help="e.g. vulkan")
    explain.add_argument(
        "--key-version",
        type=_u32,
        default=CURRENT_KEY_VERSION,
        metavar="N",
        help=f"key format version (default {CURRENT_KEY_VERSION})",
    )
    explain.add_argument("--vendor", type=_u32, help="PCI vendor id (0x10de or 4318)")
    explain.add_argument("--device", type=_u32, help="PCI device id (0x2684 or 9860)")
    explain.add_argument("--revision", metavar="TEXT", help="driver revision")
    explain.add_argument(
        "--revision-extra", metavar="TEXT", help="its extra revision string (with --revision)"
    )
    explain.add_argument(
        "--driver-digest", type=_hash, metavar="HEX", help="the fingerprint's driver digest"
    )
    json_option(explain)

    misses = command(
        "misses",
        _misses,
        "recent misses from the miss log (VYRE_SQLCACHE_LOG_MISSES=1), newest first, each "
        "with its explanation",
    )
    misses.add_argument(
        "--limit",
        type=_whole(1, 10_000),
        default=20,
        metavar="N",
        help="at most N misses (default 20)",
    )
    json_option(misses)

    import_dir = command(
        "import-dir",
        _import_dir,
        "import a vyre directory cache (<2 hex>/<64 hex>.bin); the files' mtimes become "
        "creation times; importing twice changes nothing",
    )
    import_dir.add_argument("dir", type=_named("the folder to import"), metavar="DIR")

    export_dir = command(
        "export-dir",
        _export_dir,
        "write the entries vyre can look up as a vyre directory cache (atomic files, "
        "mtime = creation time); keyed entries are left out",
    )
    export_dir.add_argument("dir", type=_named("the folder to export to"), metavar="DIR")

    remote = command(
        "remote",
        _remote,
        "look at and clean the shared tier (VYRE_SQLCACHE_REMOTE or --url): ping, ls, rm",
    )
    remote.add_argument("action", nargs="?", choices=["ping", "ls", "rm"])
    remote.add_argument("keys", type=_entry_key, nargs="*", metavar="KEY", help="for rm")
    remote.add_argument(
        "--url",
        type=_named("the shared tier (redis://HOST:PORT/DB)"),
        help="redis://[user:password@]host:port/db (default: $VYRE_SQLCACHE_REMOTE)",
    )
    remote.add_argument("--all", action="store_true", help="rm: every entry under the prefix")
    remote.add_argument("--yes", action="store_true", help="rm --all: yes, delete them all")
    json_option(remote)

    demo_command = command(
        "demo", _demo, "write, read and invalidate a few hundred synthetic pipelines"
    )
    demo_command.description = (
        "Write a few hundred synthetic pipelines (backend 'demo'), read them back, "
        "invalidate some by impact mask and print what happened. The demo's entries are "
        "removed at the end unless --keep; the cache's other entries and its counters are "
        "left as they were. Where the cache has no room for the demo under its size cap, "
        "the demo runs on a temporary file instead."
    )
    demo_command.add_argument(
        "--count",
        type=_whole(demo.MIN_COUNT, demo.MAX_COUNT),
        default=300,
        help=f"pipelines to write, {demo.MIN_COUNT} to {demo.MAX_COUNT} (default 300)",
    )
    demo_command.add_argument("--keep", action="store_true", help="keep the demo's entries")
    demo_command.add_argument(
        "--seed", type=int, default=None, help="random seed (default: random)"
    )
    return parser


#: Signals that end a command as Ctrl-C does (its cleanup runs), with status 128 + signal.
_ENDING_SIGNALS = ("SIGTERM", "SIGHUP")


#: How long after the first Ctrl-C (or SIGTERM) more are ignored while the command ends.
ENDING_S = 2.0


class _Ended:
    """How the command is being ended, if it is: by Ctrl-C, or by the signal named."""

    interrupted = False
    signum: int | None = None
    at = 0.0  # when the first came (time.monotonic)


def _interrupt_once(signum: int, frame: object) -> None:
    """SIGINT's handler in `console`: the first ends the command (KeyboardInterrupt);
    more within `ENDING_S` are ignored, so that they do not cut the cleanup short (an
    export's temporary files) nor print a traceback over the message. One after that
    ends it again, should the command still run."""
    now = time.monotonic()
    if not _Ended.interrupted or now - _Ended.at > ENDING_S:
        _Ended.interrupted, _Ended.at = True, now
        raise KeyboardInterrupt


def _end_as_ctrl_c(signum: int, frame: object) -> None:
    """Turn SIGTERM or SIGHUP (`timeout`, systemd, a closed terminal) into Ctrl-C: the
    library holds Ctrl-C where a transaction must end first, and every command cleans up
    after it (temporary files of export-dir, bundle, copy, check --repair)."""
    now = time.monotonic()
    if (_Ended.interrupted or _Ended.signum is not None) and now - _Ended.at <= ENDING_S:
        return  # the command is ending already
    _Ended.signum = signum
    if not callable(signal.getsignal(signal.SIGINT)):
        _Ended.interrupted, _Ended.at = True, now
        raise KeyboardInterrupt  # Ctrl-C ignored (started in the background): no hold
    _Ended.at = now
    signal.raise_signal(signal.SIGINT)


def _prepare_streams() -> None:
    """Standard streams a command can rely on: a closed stderr is discarded (errors
    would go to stdout instead), and output that the encoding cannot hold is escaped
    (never a failure after the work is done)."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            with suppress(ValueError):
                stream.reconfigure(errors="backslashreplace")


def console() -> int:
    """The `vyre-sqlcache` program: `main`, with SIGTERM and SIGHUP ending a command as
    Ctrl-C does (status 143 and 129)."""
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt_once)
        for name in _ENDING_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) == signal.SIG_DFL:
                signal.signal(number, _end_as_ctrl_c)
    status = main()
    if main_thread:
        # The command is done: a signal arriving as Python exits (which puts the default
        # handlers back) would end the process by that signal, not with `status`.
        for name in ("SIGINT", *_ENDING_SIGNALS):
            number = getattr(signal, name, None)
            if number is not None:
                with suppress(ValueError, OSError):
                    signal.signal(number, signal.SIG_IGN)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed, 2 usage, 130 Ctrl-C,
    and with `console`, 143 SIGTERM and 129 SIGHUP)."""
    _prepare_streams()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    if sys.stdout is None:
        print(
            f"{PROG}: standard output is closed; redirect it instead (> /dev/null to "
            "discard what the command prints); nothing was done",
            file=sys.stderr,
        )
        return 1
    _Ended.interrupted, _Ended.signum = False, None
    try:
        return int(args.handler(args))
    except UsageError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except (Failure, CacheError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as error:
        # An argument the library refused (its message names it): a usage error.
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`ls | head`): stop quietly, and let no flush at exit complain.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _Ended.signum is not None:
            name = signal.Signals(_Ended.signum).name
            print(f"{PROG}: ended by {name}", file=sys.stderr)
            return 128 + _Ended.signum
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
