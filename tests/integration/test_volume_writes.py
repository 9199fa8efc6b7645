"""Staging volume writes over held chunks, short tails, and what scrub leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

from opensmc.receiver.volume import StagingVolume
from opensmc.wire.frames import decode_frame, digest, encode_frame

CS = 64 * 1024
PAGE = 4096


def _chunk(pages: dict[int, bytes]) -> bytes:
    data = bytearray(CS)
    for p, content in pages.items():
        data[p * PAGE : (p + 1) * PAGE] = content
    return bytes(data)


def test_held_chunks_are_overwritten_whole(tmp_path: Path) -> None:
    with StagingVolume.create(tmp_path / "v", 16 * CS, CS) as vol:
        old = os.urandom(2 * CS)
        vol.apply(decode_frame(encode_frame(0, old)))
        # Chunk 0 is held, chunk 1 too; chunk 2 is not: a frame over all three, mostly zeros.
        new = _chunk({5: os.urandom(PAGE)}) + _chunk({}) + _chunk({0: os.urandom(PAGE)})
        vol.apply(decode_frame(encode_frame(0, new)))
        assert vol.read(0, 3 * CS) == new
        assert vol.hashes() == {i: digest(new[i * CS : (i + 1) * CS]) for i in range(3)}


def test_short_tail_page_is_written(tmp_path: Path) -> None:
    size = 2 * CS + 1000  # the last chunk, and its last page, are short
    with StagingVolume.create(tmp_path / "v", size, CS) as vol:
        tail = bytes(500) + b"x" * 500
        frame = bytes(CS) + tail
        vol.apply(decode_frame(encode_frame(CS, _chunk({1: os.urandom(PAGE)}) + tail)))
        assert vol.read(2 * CS, 1000) == tail
        vol.apply(decode_frame(encode_frame(CS, frame)))
        assert vol.read(CS, CS + 1000) == frame


def test_scrub_punches_what_it_forgets(tmp_path: Path) -> None:
    with StagingVolume.create(tmp_path / "v", 4 * CS, CS) as vol:
        data = os.urandom(CS)
        vol.apply(decode_frame(encode_frame(CS, data)))
        vol.flush()
        with open(vol.directory / "data.img", "r+b") as f:
            f.seek(CS + 10)
            f.write(b"\xff" if data[10] != 0xFF else b"\0")
        assert vol.scrub() == [1]
        # Absent from the map means zeros: the rot must not stay in data.img (a run skips a
        # chunk that is zeros at the source and absent from the map).
        assert vol.read(CS, CS) == bytes(CS)
        chunk = _chunk({7: os.urandom(PAGE)})
        vol.apply(decode_frame(encode_frame(CS, chunk)))
        assert vol.read(CS, CS) == chunk
    with StagingVolume.open(tmp_path / "v") as again:
        assert again.hashes() == {1: digest(chunk)}
