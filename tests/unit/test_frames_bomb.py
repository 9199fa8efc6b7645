"""Issue 7 item 3: a zstd payload cannot make the receiver allocate more than the frame's plain length."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest
import zstandard

from opensmc.wire import frames as f

PLAIN = 64 * 1024
BOMB = 1 << 30  # what the payload decodes to


def _zeros_compressed(size: int, *, declare: bool) -> bytes:
    """`size` zero bytes, zstd-compressed in a streaming way (never `size` bytes in memory)."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    with cctx.stream_writer(out, size=size if declare else -1, closefd=False) as w:
        block = bytes(1 << 20)
        for _ in range(size // len(block)):
            w.write(block)
    return out.getvalue()


def _frame_header(payload: bytes) -> bytes:
    digest = f.digest(bytes(PLAIN))
    return struct.pack(f._HEADER_V1.format, f.MAGIC, 1, f.CODEC_ZSTD, 0, 0, PLAIN, len(payload), digest)


@pytest.mark.parametrize("declare", [True, False], ids=["declared-size", "no-declared-size"])
def test_bomb_is_refused_without_allocating_it(declare: bool) -> None:
    payload = _zeros_compressed(BOMB, declare=declare)
    assert len(payload) < PLAIN  # a valid header: payload shorter than the plain length
    header = f.parse_header(_frame_header(payload))
    tracemalloc.start()
    try:
        with pytest.raises(f.LengthMismatch):
            f.decode_payload(header, payload)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * PLAIN, f"decoding allocated {peak} bytes for a {PLAIN}-byte frame"


def test_declared_size_must_match_header() -> None:
    payload = zstandard.ZstdCompressor(level=1).compress(bytes(PLAIN // 2))
    header = f.parse_header(_frame_header(payload))
    with pytest.raises(f.LengthMismatch, match="declares"):
        f.decode_payload(header, payload)


def test_trailing_data_after_the_zstd_frame_is_refused() -> None:
    payload = zstandard.ZstdCompressor(level=1).compress(bytes(PLAIN)) + b"junk"
    header = f.parse_header(_frame_header(payload))
    with pytest.raises(f.LengthMismatch):
        f.decode_payload(header, payload)


def test_undeclared_size_payload_still_decodes() -> None:
    payload = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(PLAIN))
    assert zstandard.frame_content_size(payload) == -1
    frame = f.decode_payload(f.parse_header(_frame_header(payload)), payload)
    assert frame.data == bytes(PLAIN)
