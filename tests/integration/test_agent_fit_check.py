"""The agent's check that a file-level partition's files fit its target size.

A first run walks the tree before any data moves; a partition the agent already sent whole has
its tree walked while rsync runs (``agent/files.py`` ``prepare``/``send``), and a tree that no
longer fits stops rsync and builds nothing. Real ``mkfs.ext4`` (for the superblock the agent
reads), real ``du`` and real rsync.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from opensmc.agent import files

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("rsync")), reason="needs mkfs.ext4 and rsync"
)


def _disk(tmp_path: Path, target: int) -> dict[str, Any]:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(img)], check=True)
    part = {"device": "0_1", "offset": 0, "target_size": target, "volume_id": "ti-x-d0.p0_1", "fs_type": "ext4"}
    return {"index": 0, "path": str(img), "files": [part]}


def _tree(root: Path, mib: int) -> Path:
    root.mkdir()
    for i in range(mib):
        (root / f"f{i}").write_bytes(os.urandom(MiB))
    return root


def _options(tree: Path) -> files.FileOptions:
    return files.FileOptions(mounts={"0_1": str(tree)})


def test_a_first_run_that_does_not_fit_is_refused_before_data_moves(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 24)
    with pytest.raises(files.FileLevelError, match="more than its target size of 16777216 bytes"):
        files.prepare(_disk(tmp_path, 16 * MiB), _options(tree), str(tmp_path / "memory"))


def test_a_partition_sent_before_is_checked_while_rsync_runs(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    memory = str(tmp_path / "memory")
    disk = _disk(tmp_path, 64 * MiB)
    (first,) = files.prepare(disk, _options(tree), memory)
    assert first.checked and first.used >= 2 * MiB

    files.remember(memory, first, first.used)
    (later,) = files.prepare(disk, _options(tree), memory)
    assert not later.checked and later.used == first.used  # no walk: the last run's figure

    (elsewhere,) = files.prepare(disk, _options(_tree(tmp_path / "other", 1)), memory)
    assert elsewhere.checked  # another directory: walked first
    disk["files"][0]["target_size"] = 48 * MiB  # another target size: walked first again
    (resized,) = files.prepare(disk, _options(tree), memory)
    assert resized.checked


def test_a_tree_grown_past_its_target_stops_rsync_and_builds_nothing(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    memory = str(tmp_path / "memory")
    disk = _disk(tmp_path, 16 * MiB)
    (first,) = files.prepare(disk, _options(tree), memory)
    files.remember(memory, first, first.used)
    for i in range(2, 24):  # the source grew since that run
        (tree / f"f{i}").write_bytes(os.urandom(MiB))
    (later,) = files.prepare(disk, _options(tree), memory)
    assert not later.checked
    built: list[str] = []

    def build(vid: str, spec: dict[str, Any]) -> dict[str, Any]:
        built.append(vid)
        return {}

    with pytest.raises(files.FileLevelError, match="more than its target size"):
        files.send(
            later,
            "http://127.0.0.1:9",  # nothing listens: rsync fails too, but the misfit is what the user must read
            "token",
            _options(tree),
            all_mounts=[],
            limit_mbit=lambda: 0.0,
            stopped=threading.Event(),
            progress=lambda n: None,
            build=build,
            memory_dir=memory,
        )
    assert built == []


def test_a_fit_check_that_fails_stops_what_it_was_given(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 24)
    (prep,) = files.prepare(_disk(tmp_path, 64 * MiB), _options(tree))
    small = prep._replace(spec=dict(prep.spec, size=16 * MiB), checked=False)
    stopped = threading.Event()
    check = files._FitCheck(small, [], stopped.set)
    with pytest.raises(files.FileLevelError, match="more than its target size"):
        check.result()
    assert stopped.is_set()


def test_what_the_excludes_surely_leave_out_is_not_counted(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree", 2)
    (tree / "var" / "cache").mkdir(parents=True)
    for i in range(24):
        (tree / "var" / "cache" / f"c{i}").write_bytes(os.urandom(MiB))
    (tree / "swapfile").write_bytes(os.urandom(4 * MiB))
    disk = _disk(tmp_path, 20 * MiB)
    with pytest.raises(files.FileLevelError):  # 30 MiB of files: no room in 20 MiB
        files.prepare(disk, _options(tree))
    excludes = tmp_path / "excludes.txt"
    excludes.write_text("/var/cache/\n")  # and /swapfile is a default
    (prep,) = files.prepare(disk, files.FileOptions({"0_1": str(tree)}, str(excludes)))
    assert 2 * MiB <= prep.used < 3 * MiB
    excludes.write_text("/var/ca*/\n")  # a wildcard: what it leaves out is rsync's to say, so it counts
    with pytest.raises(files.FileLevelError):
        files.prepare(disk, files.FileOptions({"0_1": str(tree)}, str(excludes)))


def test_only_anchored_literal_patterns_are_taken_off_once(tmp_path: Path) -> None:
    root = str(tmp_path)
    patterns = ["/var/cache/", "/var/cache/x/*", "/tmp/*", "*.tmp", "/home/*/cache", "/swapfile", "/", "relative/dir"]
    assert files._left_out(root, patterns) == [f"{root}/swapfile", f"{root}/tmp", f"{root}/var/cache"]
