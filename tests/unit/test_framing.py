"""The receiver's body reader: frames out of arbitrary chunks, into reused buffers.

The property: whatever the frame sizes and wherever the socket cuts the body,
the groups hold exactly the body's frames in order, and a group's payloads
still hold their bytes until the consumer asks for the group after next
(the reuse contract a worker thread relies on).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hypothesis import given
from hypothesis import strategies as st

from opensmc.receiver.framing import BodyReader, BufferPool
from opensmc.wire.frames import HEADER_SIZE, BadMagic, FrameError, TruncatedFrame, encode_frame, encode_zero_frame


def _body(sizes: list[int]) -> tuple[bytes, list[bytes]]:
    frames = []
    for i, n in enumerate(sizes):
        if n == 0:
            frames.append(encode_zero_frame(i * 4096, 4096))
        else:
            frames.append(encode_frame(i * 4096, bytes([i % 251 + 1]) * n))
    return b"".join(frames), frames


async def _chunks(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    pos = 0
    for c in sorted(set(cuts)):
        if pos < c < len(body):
            yield body[pos:c]
            pos = c
    yield body[pos:]


def _read(body: bytes, cuts: list[int], pool: BufferPool, group: int) -> tuple[list[bytes], FrameError | None]:
    """Read like post_frames does: on group n, the worker finishes group n-1, then takes group n."""

    async def go() -> tuple[list[bytes], FrameError | None]:
        reader = BodyReader(pool, group)
        got: list[bytes] = []
        in_worker: tuple[list[bytes], list[memoryview]] | None = None  # (its bytes when received, views)
        error: FrameError | None = None
        pos = 0
        async for frames, err in reader.groups(_chunks(body, cuts)):
            if in_worker is not None:  # still intact while the next group was read
                assert [bytes(v) for v in in_worker[1]] == in_worker[0]
            copies = []
            for _header, payload in frames:
                copies.append(bytes(payload))
                got.append(body[pos : pos + HEADER_SIZE] + copies[-1])  # frames lie end to end
                pos += HEADER_SIZE + len(payload)
            in_worker = (copies, [p for _h, p in frames])
            error = err
        if in_worker is not None:
            assert [bytes(v) for v in in_worker[1]] == in_worker[0]
        reader.release()
        return got, error

    return asyncio.run(go())


@given(
    sizes=st.lists(st.sampled_from([0, 1, 100, 4096, 5000, 12000, 30000]), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 200_000), max_size=20),
    buffer=st.sampled_from([HEADER_SIZE + 1, 4096, 9000, 20000, 65536]),
    group=st.sampled_from([1, 5000, 20000, 1 << 20]),
)
def test_groups_hold_the_frames_in_order(sizes: list[int], cuts: list[int], buffer: int, group: int) -> None:
    body, frames = _body(sizes)
    got, error = _read(body, cuts, BufferPool(buffer, 4), group)
    assert error is None
    assert got == frames


def test_a_truncated_body_ends_with_an_error_after_the_whole_frames() -> None:
    body, frames = _body([100, 200])
    got, error = _read(body[:-5], [7, 150], BufferPool(4096, 2), 1 << 20)
    assert got == frames[:1]
    assert isinstance(error, TruncatedFrame) and "payload truncated" in str(error)
    got, error = _read(body[: len(frames[0]) + 10], [], BufferPool(4096, 2), 1 << 20)
    assert got == frames[:1]
    assert isinstance(error, TruncatedFrame) and "header truncated" in str(error)


def test_a_bad_header_stops_the_body() -> None:
    body, frames = _body([100])
    got, error = _read(body + b"NOPE" + bytes(HEADER_SIZE), [3], BufferPool(4096, 2), 1 << 20)
    assert got == frames
    assert isinstance(error, BadMagic)


def test_buffers_go_back_to_the_pool_and_are_reused() -> None:
    pool = BufferPool(8192, 2)
    body, frames = _body([5000, 5000, 5000])
    assert _read(body, [1000, 9000], pool, 1)[0] == frames
    kept = list(pool._free)
    assert len(kept) == 2
    assert _read(body, [], pool, 1)[0] == frames
    assert all(any(b is k for k in kept) for b in pool._free)
