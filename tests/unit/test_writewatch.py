"""agent/writewatch.py: what counts as a write, and how many passes a written disk gets."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from opensmc.agent import writewatch


def test_an_image_file_written_or_resized_has_changed(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(65536))
    before = writewatch.mark(str(disk))
    assert before is not None and not writewatch.changed_since(str(disk), before)
    with disk.open("r+b") as f:
        f.write(b"x")  # same size: mtime moves
    assert writewatch.changed_since(str(disk), before)
    again = writewatch.mark(str(disk))
    os.truncate(disk, 131072)
    assert writewatch.changed_since(str(disk), again)


def test_a_block_device_is_marked_by_its_write_counters() -> None:
    devices = [d for d in sorted(glob.glob("/dev/[sv]d[a-z]") + glob.glob("/dev/nvme[0-9]n1")) if os.path.exists(d)]
    if not devices:
        pytest.skip("no block device to read counters of")
    found = writewatch.mark(devices[0])
    assert found is not None and len(found) == 2 and all(n >= 0 for n in found)


def test_what_cannot_be_known_never_counts_as_written(tmp_path: Path) -> None:
    assert writewatch.mark("/dev/null") is None  # a character device: no counters
    assert writewatch.mark(str(tmp_path / "gone")) is None
    assert not writewatch.changed_since("/dev/null", None)


def test_passes_repeat_while_written_and_stop_after_the_extra_ones(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    again: list[int] = []

    def write_during(ranges_seen: list[str], times: int) -> None:
        # a write during each of the first `times` passes
        for item in writewatch.passes(str(disk), ["a", "b"], lambda: again.append(1), written):
            ranges_seen.append(item)
            if item == "b" and len(ranges_seen) // 2 <= times:
                with disk.open("r+b") as f:
                    f.write(os.urandom(16))

    written: dict[str, int] = {}
    seen: list[str] = []
    write_during(seen, 0)
    assert seen == ["a", "b"] and written == {} and again == []

    seen = []
    write_during(seen, 1)  # written in pass 1, quiet in pass 2: synced again, consistent
    assert seen == ["a", "b"] * 2 and written == {str(disk): 1} and len(again) == 1
    assert writewatch.note(written)["still_changing"] == []

    written, seen, again[:] = {}, [], []
    write_during(seen, 99)  # written in every pass: 1 + EXTRA_PASSES passes, then a warning
    assert len(seen) == 2 * (1 + writewatch.EXTRA_PASSES) and len(again) == writewatch.EXTRA_PASSES
    assert writewatch.note(written) == {
        "disks_written": [str(disk)],
        "passes_with_writes": 1 + writewatch.EXTRA_PASSES,
        "still_changing": [str(disk)],
    }
