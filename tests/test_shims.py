"""The fault-injection shims themselves: a broken shim would hide or invent lost writes."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import apsw
import pytest

from torture import shims


def test_concurrent_syncs_of_one_file_each_leave_a_whole_synced_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A flush and the checkpoint thread sync the same write-ahead log at once; a slow
    # copy makes their copies overlap every time.
    copy = shutil.copyfile

    def slow_copy(source: str, target: str) -> object:
        result = copy(source, target)
        time.sleep(0.01)
        return result

    monkeypatch.setattr(shims.shutil, "copyfile", slow_copy)
    vfs = shims.SyncTrackingVFS(name=f"shim-test-{id(tmp_path)}")
    try:
        path = tmp_path / "file.bin"
        path.write_bytes(b"synced bytes")
        flags = [apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_MAIN_DB, 0]
        file = shims._SyncTrackingFile(vfs, str(path), flags)
        errors: list[BaseException] = []

        def sync() -> None:
            try:
                file.xSync(apsw.SQLITE_SYNC_NORMAL)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=sync) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        file.xClose()
    finally:
        vfs.unregister()

    assert errors == []
    assert vfs.syncs == 4
    assert (tmp_path / "file.bin.synced").read_bytes() == b"synced bytes"
    assert not (tmp_path / "file.bin.synced.tmp").exists()
