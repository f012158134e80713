"""Named entries: blobs, and groups of files, under a (namespace, name) pair.

For compilers whose cache keys are names rather than vyre's pipeline keys (Triton's
kernel hash and file names, say). A named entry goes through the same store path as
every other entry (write-behind queue, checksum, compression with the namespace's
dictionaries, the size cap and LRU eviction); its entry key is
`keys.named_entry_key(namespace, name)`, and `ls`, the views and `stats_v` show it
with kind 'named', its namespace (also its `backend`) and its name.

A group is one named entry whose blob is the files packed in a small container, so
a group is written and read in one transaction and compressed as one blob. The
container (all integers little-endian u32):

    b"VYREGRP1"  count  { name_length  name (UTF-8)  data_length  data } * count

with the files in ascending order of their UTF-8 names, each name used once. Nothing
else is ever decoded from it (no pickle): a blob that does not follow this layout
exactly is not a group.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._checks import MAX_BLOB_BYTES, check_blob
from ._rows import NewEntry
from .errors import BlobTooLargeError
from .keys import check_text, named_entry_key

__all__ = ["GROUP_MAGIC", "MAX_FILE_NAME_BYTES", "NamedEntries", "pack_group", "unpack_group"]

GROUP_MAGIC = b"VYREGRP1"
#: Longest file name in a group, in bytes of UTF-8 (a file name on common file systems:
#: Linux counts bytes, so 255 characters of 'é' are too long for a folder).
MAX_FILE_NAME_BYTES = 255
_U32 = struct.Struct("<I")


def _check_file_name(index: int, name: Any) -> bytes:
    """A group's file name as UTF-8: usable as one file name in a folder."""
    what = f"files name {index}"
    text = check_text(what, name, MAX_FILE_NAME_BYTES)
    if "/" in text or text in (".", ".."):
        raise ValueError(
            f"{what} must be a plain file name (no '/', not '.' or '..'), got {text[:80]!r}"
        )
    raw = text.encode("utf-8")
    if len(raw) > MAX_FILE_NAME_BYTES:
        raise ValueError(
            f"{what} must be at most {MAX_FILE_NAME_BYTES} bytes in UTF-8 (one file name in a "
            f"folder), got {len(raw)} bytes: {text[:80]!r}"
        )
    return raw


def pack_group(files: Mapping[str, bytes]) -> bytes:
    """The container holding `files` (file name -> bytes), as stored by `put_group`.

    Raises TypeError/ValueError for a mapping that is not str -> bytes, a name that is
    not a plain file name of 1..255 bytes of UTF-8; BlobTooLargeError (a ValueError) for a
    group over 64 MiB in all.
    """
    if not isinstance(files, Mapping):
        raise TypeError(
            f"files must be a mapping of file name to bytes, got {type(files).__name__}"
        )
    items = []
    for index, (name, data) in enumerate(files.items()):
        raw_name = _check_file_name(index, name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"files[{name!r}] must be bytes, got {type(data).__name__}")
        try:
            items.append((raw_name, bytes(data)))
        except ValueError as error:  # a released memoryview
            raise ValueError(f"files[{name!r}] cannot be read: {error}; pass bytes") from None
    items.sort()
    parts = [GROUP_MAGIC, _U32.pack(len(items))]
    for raw_name, data in items:
        parts += [_U32.pack(len(raw_name)), raw_name, _U32.pack(len(data)), data]
    packed = b"".join(parts)
    if len(packed) > MAX_BLOB_BYTES:
        raise BlobTooLargeError(
            f"the group's files take {len(packed)} bytes packed, over the {MAX_BLOB_BYTES}-byte "
            "limit of one entry; store large files as entries of their own"
        )
    return packed


def unpack_group(blob: bytes) -> dict[str, bytes]:
    """The files of a container made by `pack_group`.

    Raises ValueError for anything that is not exactly such a container (wrong magic,
    lengths past the end, bytes left over, names out of order or not file names).
    """
    view = memoryview(blob)
    if bytes(view[: len(GROUP_MAGIC)]) != GROUP_MAGIC or len(view) < len(GROUP_MAGIC) + 4:
        raise ValueError("not a vyre-sqlcache group (no VYREGRP1 header)")
    at = len(GROUP_MAGIC)

    def u32() -> int:
        nonlocal at
        if at + 4 > len(view):
            raise ValueError(f"a group cut short at byte {at} of {len(view)}")
        (value,) = _U32.unpack_from(view, at)
        at += 4
        return int(value)

    def take(size: int) -> bytes:
        nonlocal at
        if at + size > len(view):
            raise ValueError(f"a group cut short at byte {at} of {len(view)}")
        chunk = bytes(view[at : at + size])
        at += size
        return chunk

    files: dict[str, bytes] = {}
    previous = b""
    for index in range(u32()):
        raw_name = take(u32())
        if index and raw_name <= previous:
            raise ValueError(f"a group's file names are out of order at file {index}")
        previous = raw_name
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"a group's file name {index} is not UTF-8") from None
        _check_file_name(index, name)
        files[name] = take(u32())
    if at != len(view):
        raise ValueError(f"a group has {len(view) - at} bytes past its last file")
    return files


class NamedEntries:
    """`PipelineCache`'s methods for named entries and groups (see the module docstring)."""

    if TYPE_CHECKING:

        def _store(self, entries: list[NewEntry]) -> None: ...

        def _load(self, entry_key: bytes) -> bytes | None: ...

        def _load_or_fetch(self, entry_key: bytes, origin: Any) -> bytes | None: ...

        def delete_entries(self, entry_keys: Iterable[bytes | str]) -> int: ...

    def put_named(self, namespace: str, name: str, blob: bytes) -> None:
        """Store `blob` as entry `name` of `namespace`, atomically (durable after `flush()`).

        Raises TypeError/ValueError for a namespace (1..64 characters) or name (1..1024)
        that is not valid text without NUL, and as `write` does.
        """
        entry_key = named_entry_key(namespace, name)
        self._store(
            [NewEntry(entry_key, None, None, None, check_blob(blob), named=(namespace, name))]
        )

    def get_named(self, namespace: str, name: str) -> bytes | None:
        """The blob of entry `name` of `namespace`, or None on a miss.

        Raises TypeError/ValueError for a bad namespace or name; a damaged entry is a miss.
        """
        # The file, its layers, then the shared tier (README "Sharing a cache").
        return self._load_or_fetch(
            named_entry_key(namespace, name), (None, None, None, (namespace, name))
        )

    def delete_named(self, namespace: str, name: str) -> bool:
        """Delete entry `name` of `namespace`; return whether there was one."""
        return self.delete_entries([named_entry_key(namespace, name)]) > 0

    def put_group(self, namespace: str, name: str, files: Mapping[str, bytes]) -> None:
        """Store `files` (file name -> bytes) as ONE entry `name` of `namespace`: written,
        read, evicted and compressed together.

        Raises as `put_named` and `pack_group` do; nothing is written when it raises.
        """
        entry_key = named_entry_key(namespace, name)
        blob = pack_group(files)
        self._store([NewEntry(entry_key, None, None, None, blob, named=(namespace, name))])

    def get_group(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The files of group `name` of `namespace`, or None on a miss (also when the entry
        holds something other than a group).

        Raises TypeError/ValueError for a bad namespace or name; a damaged entry is a miss.
        """
        entry_key = named_entry_key(namespace, name)
        blob = self._load_or_fetch(entry_key, (None, None, None, (namespace, name)))
        if blob is None:
            return None
        try:
            return unpack_group(blob)
        except ValueError:
            return None
