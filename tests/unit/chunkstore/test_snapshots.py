"""Snapshot objects: encode/decode round trip, and damage refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from opensmc.chunkstore.gc import live_hashes
from opensmc.chunkstore.packs import PackCorrupt
from opensmc.chunkstore.snapshots import DiskIndex, Snapshot, chunks_of, decode_snapshot, encode_snapshot


def disk(size: int, chunk_size: int, seed: int, sha: str | None = None) -> DiskIndex:
    rng = np.random.default_rng(seed)
    n = chunks_of(size, chunk_size)
    digests = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    digests[rng.random(n) < 0.3] = 0  # some zero chunks
    return DiskIndex(size, chunk_size, digests, sha)


@given(
    st.lists(st.tuples(st.integers(1, 300_000), st.sampled_from([4096, 16384]), st.integers(0, 99)), max_size=4),
    st.floats(0, 2e9, allow_nan=False),
)
def test_round_trip(specs: list[tuple[int, int, int]], created: float) -> None:
    disks = tuple(disk(s, c, seed, "ab" * 32 if seed % 2 else None) for s, c, seed in specs)
    snap = Snapshot("m-abc", created, disks)
    back = decode_snapshot(encode_snapshot(snap))
    assert back.image_id == "m-abc" and back.created == created
    assert len(back.disks) == len(disks)
    for a, b in zip(disks, back.disks, strict=True):
        assert (a.size, a.chunk_size, a.sha256) == (b.size, b.chunk_size, b.sha256)
        assert np.array_equal(a.digests, b.digests)
        assert a.hashes() == b.hashes()


def test_layout() -> None:
    d = DiskIndex(20000, 16384, np.arange(32, dtype=np.uint8).reshape(2, 16))
    raw = encode_snapshot(Snapshot("i", 1.5, (d,)))
    assert raw[:8] == b"OSMSNAP\x01"
    (n,) = struct.unpack_from("<I", raw, 8)
    header = json.loads(raw[12 : 12 + n])
    assert header == {"image_id": "i", "created": 1.5, "disks": [{"size": 20000, "chunk_size": 16384, "sha256": None}]}
    assert raw[12 + n : 12 + n + 32] == bytes(range(32))
    assert raw[-16:] == xxhash.xxh3_128_digest(raw[:-16])
    assert len(raw) == 12 + n + 32 + 16


@given(st.data())
def test_any_flipped_byte_is_caught(data: st.DataObject) -> None:
    raw = encode_snapshot(Snapshot("img", 3.0, (disk(100_000, 16384, 1), disk(5000, 4096, 2))))
    pos = data.draw(st.integers(0, len(raw) - 1))
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PackCorrupt):
        decode_snapshot(bytes(bad))


@pytest.mark.parametrize("cut", [1, 16, 17, 40])
def test_truncated_is_caught(cut: int) -> None:
    raw = encode_snapshot(Snapshot("img", 3.0, (disk(100_000, 16384, 1),)))
    with pytest.raises(PackCorrupt):
        decode_snapshot(raw[:-cut])
    with pytest.raises(PackCorrupt):
        decode_snapshot(raw[:cut])


def test_header_promising_more_chunks_than_present() -> None:
    head = json.dumps({"image_id": "x", "created": 0, "disks": [{"size": 10**6, "chunk_size": 4096}]}).encode()
    body = b"OSMSNAP\x01" + struct.pack("<I", len(head)) + head + bytes(32)
    with pytest.raises(PackCorrupt, match="shorter"):
        decode_snapshot(body + xxhash.xxh3_128_digest(body))


def test_wrong_digest_shape_refused() -> None:
    bad = DiskIndex(50000, 16384, np.zeros((3, 16), np.uint8))  # 4 chunks
    with pytest.raises(ValueError):
        encode_snapshot(Snapshot("x", 0.0, (bad,)))


def test_disk_index_helpers_and_live_hashes() -> None:
    digests = np.zeros((3, 16), np.uint8)
    digests[1] = 7
    d = DiskIndex(40000, 16384, digests)
    assert d.chunks == 3 and d.chunk_length(2) == 40000 - 32768
    assert d.hash_at(0) is None and d.hash_at(1) == bytes([7] * 16)
    assert d.hashes() == {1: bytes([7] * 16)}
    other = DiskIndex(16384, 16384, np.full((1, 16), 9, np.uint8))
    live = live_hashes([d, other])
    assert live == {bytes([7] * 16), bytes([9] * 16)}
    assert all(type(x) is bytes for x in live)
