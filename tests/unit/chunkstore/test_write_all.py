"""LocalBackend's vectored write: every part, in order, whatever the kernel takes per call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from opensmc.chunkstore import backend


@pytest.mark.parametrize("cap", [1, 3, 7, 4096, 1 << 30])
def test_short_writes_resume_mid_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int) -> None:
    real = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: Sequence[memoryview]) -> int:
        assert len(buffers) <= backend._IOV_MAX
        taken: list[memoryview] = []
        left = cap
        for b in buffers:  # hand the kernel at most `cap` bytes, splitting a part if need be
            if left <= 0:
                break
            taken.append(b[:left])
            left -= len(taken[-1])
        calls.append(len(taken))
        return real(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)
    parts = [bytes([i % 256]) * (i % 5 + 1) for i in range(2500)]
    path = tmp_path / "obj"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        backend._write_all(fd, parts)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(parts)
    assert calls
