"""BlockSource drops the pages behind a sequential reader, and only behind it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opensmc.agent import reader

KiB = 1024


def test_drops_behind_sequential_reads_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "disk.img"
    data = os.urandom(1024 * KiB)
    path.write_bytes(data)
    monkeypatch.setattr(reader, "DROP_BEHIND", 256 * KiB)
    dropped: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    buf = bytearray(128 * KiB)
    with reader.BlockSource(path, offset=64 * KiB, length=768 * KiB) as src:
        for pos in range(0, 512 * KiB, len(buf)):
            assert src.read_into(buf, pos) == len(buf)
            assert buf == data[64 * KiB + pos : 64 * KiB + pos + len(buf)]
        assert dropped == [(64 * KiB, 256 * KiB), (320 * KiB, 256 * KiB)]  # file offsets
        # A jump is not sequential: nothing it skipped over is dropped, only what it reads on.
        src.read_into(buf, 640 * KiB)
        assert len(dropped) == 2
        src.read_into(buf, 0)
        src.read_into(buf, 128 * KiB)
        assert dropped[2:] == [(64 * KiB, 256 * KiB)]
