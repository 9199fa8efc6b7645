"""`opensmc image export`'s progress: a bar on a terminal, one summary line otherwise."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opensmc.cli import images as image_cli
from opensmc.cli.image_access import Images

MiB = 1 << 20
DISK = (b"\1" * MiB) + bytes(2 * MiB) + (b"\2" * MiB)


class FakeImages(Images):
    def show(self, image_id: str, chunks: bool = False) -> dict[str, Any]:
        return {"Disks": [{"Index": 0, "Size": len(DISK), "Sha256": hashlib.sha256(DISK).hexdigest()}]}

    def raw(self, image_id: str, disk: int) -> Iterator[bytes]:
        for i in range(0, len(DISK), 256 * 1024):
            yield DISK[i : i + 256 * 1024]


def test_not_a_terminal_prints_one_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "disk.raw"
    image_cli.export(FakeImages(), "m-test", 0, "raw", out)
    assert out.read_bytes() == DISK
    err = capsys.readouterr().err.splitlines()
    [summary] = [line for line in err if line.startswith("export m-test disk 0 (raw): ")]
    assert f": {len(DISK)} bytes in " in summary and summary.endswith("/s)")


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_cli.export(FakeImages(), "m-test", 0, "raw", tmp_path / "disk.raw", quiet=True)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_that_counts_every_byte(capsys: pytest.CaptureFixture[str]) -> None:
    with image_cli.ExportMeter("export m-test disk 0 (raw)", len(DISK), terminal=True) as meter:
        assert meter._bar is not None
        for block in FakeImages().raw("m-test", 0):
            meter.advance(len(block))
        [task] = meter._bar.tasks
        assert (task.completed, task.total) == (len(DISK), len(DISK))
    assert f"{len(DISK)} bytes in" in capsys.readouterr().err
