"""The backend contract on :class:`LocalBackend`, and what only files have: modes, temporaries."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opensmc.chunkstore.backend import LocalBackend
from tests.conformance.backend_contract import BackendContract


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend(tmp_path / "store")

    def child_source(self, backend: Any) -> str:
        return f"from opensmc.chunkstore.backend import LocalBackend\nbackend = LocalBackend({str(backend.root)!r})"


@pytest.fixture(params=[0o000, 0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "deep" / "store"
    b = LocalBackend(root)
    b.write("config", b"{}")
    b.write("data/ab/abcd", b"pack")
    b.write("snapshots/img", b"snap", exclusive=True)
    b.write("index/abcd", b"idx")
    b.write("a/b/c/d", b"nested")
    b.lock("gc", exclusive=False).release()
    seen_dirs = seen_files = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        seen_dirs += 1
        for f in filenames:
            p = os.path.join(dirpath, f)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
            seen_files += 1
    assert seen_dirs >= 8 and seen_files == 6


def test_failing_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path / "s")
    b.write("data/x", b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        b.write("data/x", b"new")
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        b.write("data/y", b"new", exclusive=True)
    monkeypatch.undo()
    assert b.read("data/x") == b"old"
    assert not b.exists("data/y")
    assert b.list("") == ["data/x"]
    # and no temporary file is left to fill the disk further
    assert sorted(p.name for p in (tmp_path / "s" / "data").iterdir()) == ["x"]


def test_hidden_temporaries_never_listed(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "s")
    b.write("data/ab/real", b"1")
    (tmp_path / "s" / "data" / "ab" / ".real.123.tmp").write_bytes(b"partial")
    (tmp_path / "s" / ".config.9.tmp").write_bytes(b"partial")
    (tmp_path / "s" / "data" / ".hiddendir").mkdir()
    (tmp_path / "s" / "data" / ".hiddendir" / "x").write_bytes(b"x")
    assert b.list("") == ["data/ab/real"]
    assert b.list("data/") == ["data/ab/real"]


def test_a_second_backend_on_the_same_root_sees_everything(tmp_path: Path) -> None:
    a = LocalBackend(tmp_path / "s")
    b = LocalBackend(tmp_path / "s")
    a.write("data/ab/x", b"1")
    assert b.read("data/ab/x") == b"1"
    assert b.list("data/") == ["data/ab/x"]
    b.delete("data/ab/x")
    a.write("data/ab/y", b"2")  # a's cached folder still works
    assert a.list("data/") == ["data/ab/y"]
