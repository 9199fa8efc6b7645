"""The agent pipeline against an in-memory sender: what it sends, and only that."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from opensmc.agent.pipeline import Progress, RateLimitedSender, replicate
from opensmc.agent.reader import nonzero_chunks
from opensmc.wire.frames import decode_frame

CS = 64 * 1024
MiB = 1024 * 1024


class MemorySender:
    """Decodes every frame and applies it to a bytearray, as a receiver would."""

    def __init__(self, size: int) -> None:
        self.disk = bytearray(b"\0" * size)
        self.frames: list[tuple[int, int, bool]] = []
        self.batches = 0
        self.lock = threading.Lock()

    def send_batch(self, frames: Sequence[bytes]) -> None:
        with self.lock:
            self.batches += 1
            for enc in frames:
                fr = decode_frame(enc)
                self.frames.append((fr.offset, fr.length, fr.is_zero))
                self.disk[fr.offset : fr.end] = b"\0" * fr.length if fr.is_zero else fr.data


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Random 256 KiB..1 MiB regions over zeros, about 40% data."""
    rnd = random.Random(seed)
    data = bytearray(b"\0" * size)
    pos = 0
    while pos < size:
        n = rnd.randrange(64 * 1024, MiB)
        if rnd.random() < 0.4:
            data[pos : pos + n] = rnd.randbytes(min(n, size - pos))
        pos += n
    path.write_bytes(data)
    return bytes(data)


def test_nonzero_chunks() -> None:
    buf = bytearray(b"\0" * (3 * CS + 100))
    buf[CS + 5] = 1
    buf[3 * CS + 99] = 1
    assert nonzero_chunks(buf, CS) == [False, True, False, True]


def test_full_then_incremental(tmp_path: Path) -> None:
    size = 16 * MiB + 12345  # a short last chunk too
    src = tmp_path / "disk.img"
    data = bytearray(make_image(src, size))
    sink = MemorySender(size)
    first = replicate(str(src), sink)
    assert sink.disk == data
    nonzero = sum(1 for i in range(0, size, CS) if any(data[i : i + CS]))
    assert first.chunks_sent == nonzero == len(first.hashes)
    assert first.bytes_plain == sum(ln for _, ln, _ in sink.frames)
    assert len(sink.frames) < nonzero  # adjacent chunks were coalesced

    # Change three chunks, zero one that held data, and write into a zero area.
    data_chunks = sorted(first.hashes)
    changed = data_chunks[1], data_chunks[10], data_chunks[-1]
    for idx in changed:
        data[idx * CS + 17] ^= 0xFF
    zeroed = data_chunks[5]
    data[zeroed * CS : (zeroed + 1) * CS] = b"\0" * CS
    fresh = next(i for i in range(size // CS) if i not in first.hashes)
    data[fresh * CS] = 7
    src.write_bytes(data)

    sink.frames.clear()
    second = replicate(str(src), sink, previous=first.hashes)
    assert sink.disk == data
    assert second.chunks_sent == 4 and second.chunks_zeroed == 1
    assert sorted(o // CS for o, _, z in sink.frames if not z) == sorted([*changed, fresh])
    assert [(o // CS, ln) for o, ln, z in sink.frames if z] == [(zeroed, CS)]
    assert zeroed not in second.hashes and fresh in second.hashes

    sink.frames.clear()
    third = replicate(str(src), sink, previous=second.hashes)
    assert third.frames == 0 and sink.frames == []


def test_offset_length_and_compression(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    body = (b"compressible text block " * 150_000)[: 3 * MiB]
    src.write_bytes(os.urandom(MiB) + body + os.urandom(MiB))
    sink = MemorySender(3 * MiB)
    res = replicate(str(src), sink, offset=MiB, length=3 * MiB, level=3)
    assert sink.disk == body
    assert res.bytes_wire < res.bytes_plain // 10


def test_progress_and_frame_limit(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(10 * MiB))
    seen: list[Progress] = []
    sink = MemorySender(10 * MiB)
    replicate(str(src), sink, max_frame=MiB, read_size=2 * MiB, progress=seen.append)
    assert all(ln <= MiB for _, ln, _ in sink.frames)
    assert seen[-1].to_move == 10 * MiB
    assert max(p.scanned for p in seen) == 10 * MiB
    assert max(p.sent for p in seen) >= 10 * MiB


def test_sender_error_stops_the_run(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(20 * MiB))

    class Failing:
        calls = 0

        def send_batch(self, frames: Sequence[bytes]) -> None:
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("receiver gone")

    failing = Failing()
    with pytest.raises(ConnectionError, match="receiver gone"):
        replicate(str(src), failing, batch_bytes=MiB, encoders=2)
    assert failing.calls == 2


def test_rate_limiter_holds_the_rate_and_can_change() -> None:
    """On a simulated clock: 10 MB/s within 10%, and a limit change applies at once."""
    now = [0.0]
    got: list[tuple[float, int]] = []

    class Clocked:
        def send_batch(self, frames: Sequence[bytes]) -> None:
            got.append((now[0], sum(map(len, frames))))

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limited = RateLimitedSender(Clocked(), 80, clock=lambda: now[0], sleep=sleep)  # 10 MB/s
    frame = b"x" * 250_000
    for _ in range(60):  # 15 MB: 1.5 s at the limit
        limited.send_batch([frame])
    elapsed = now[0]
    rate = 59 * 250_000 / elapsed  # the last batch's charge is not waited for
    assert 9e6 <= rate <= 11e6
    limited.set_limit(0)
    start = now[0]
    for _ in range(40):
        limited.send_batch([frame])
    assert now[0] == start  # no limit: nothing waits
    with pytest.raises(ValueError):
        limited.set_limit(-1)


def test_target_offset_places_ranges_in_one_volume(tmp_path: Path) -> None:
    """Two ranges of a disk (selected partitions) land at their own places; the rest stays zero."""
    src = tmp_path / "disk.img"
    data = make_image(src, 8 * MiB, seed=7)
    sink = MemorySender(8 * MiB)
    first = replicate(str(src), sink, offset=MiB, length=MiB, target_offset=MiB)
    second = replicate(str(src), sink, offset=5 * MiB, length=2 * MiB, target_offset=5 * MiB)
    assert sink.disk[MiB : 2 * MiB] == data[MiB : 2 * MiB]
    assert sink.disk[5 * MiB : 7 * MiB] == data[5 * MiB : 7 * MiB]
    assert sink.disk[:MiB] == b"\0" * MiB and sink.disk[2 * MiB : 5 * MiB] == b"\0" * (3 * MiB)
    assert first.hashes and min(first.hashes) >= MiB // CS  # chunk indexes count from the volume start
    assert all(5 * MiB // CS <= i < 7 * MiB // CS for i in second.hashes)
    with pytest.raises(ValueError, match="target_offset"):
        replicate(str(src), sink, offset=0, length=MiB, target_offset=CS // 2)


class GatedSender(MemorySender):
    """Holds every batch until the test releases it, and records what progress said meanwhile."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        #: (Progress.acked so far, first byte of the batch) when each batch arrived
        self.arrivals: list[tuple[int, int]] = []
        self.gate = threading.Semaphore(0)
        self.last_acked = 0

    def send_batch(self, frames: Sequence[bytes]) -> None:
        self.arrivals.append((self.last_acked, min(decode_frame(f).offset for f in frames)))
        self.gate.acquire()
        super().send_batch(frames)


@pytest.mark.parametrize("encoders", [1, 3])
def test_progress_counts_only_acknowledged_bytes(tmp_path: Path, encoders: int) -> None:
    """Acked moves over zero and unchanged regions, but never past a frame not yet acknowledged."""
    size = 24 * MiB
    data = bytearray(b"\0" * size)
    for start in (2 * MiB, 9 * MiB, 17 * MiB):  # data here and there, zeros between
        data[start : start + MiB] = random.Random(start).randbytes(MiB)
    src = tmp_path / "disk.img"
    src.write_bytes(data)
    sink = GatedSender(size)
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        sink.last_acked = max(sink.last_acked, p.acked)

    done = threading.Event()

    def run() -> None:
        replicate(str(src), sink, read_size=MiB, max_frame=MiB, batch_bytes=MiB, encoders=encoders, progress=progress)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    while not done.is_set():
        sink.gate.release()
        done.wait(0.01)
    t.join()
    acked = [p.acked for p in seen]
    assert acked == sorted(acked), "acknowledged bytes went back"
    assert acked[-1] == size  # the zeros after the last data region count once passed
    # While a batch waits for its acknowledgement, progress has not counted it: acked stops at its start
    # (the reader meanwhile ran ahead: scanned is no measure of what is safe).
    assert len(sink.arrivals) >= 3
    assert all(acked_then <= first for acked_then, first in sink.arrivals), sink.arrivals
    assert max(p.scanned for p in seen) == size


def test_nonzero_chunks_without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    from opensmc.wire import accel

    buf = bytearray(b"\0" * (3 * CS + 100))
    buf[CS + 5] = 1
    buf[3 * CS + 99] = 1
    monkeypatch.setattr(accel, "numpy", None)
    assert nonzero_chunks(buf, CS) == [False, True, False, True]
    assert nonzero_chunks(bytes(2 * CS + 7), CS) == [False, False, False]
