"""The chunk frame format: round trips, every rejection, the hash map, compress levels."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.wire import frames as f


def test_round_trip_plain_and_compressed() -> None:
    data = os.urandom(100_000)
    frame = f.decode_frame(f.encode_frame(4096, data, 0))
    assert (frame.offset, frame.length, frame.data, frame.is_zero) == (4096, len(data), data, False)
    text = b"hello disk " * 20_000
    enc = f.encode_frame(0, text, 3)
    assert enc[5] == f.CODEC_ZSTD and len(enc) < len(text) // 10
    assert f.decode_frame(enc).data == text


def test_probe_keeps_random_data_uncompressed() -> None:
    data = os.urandom(256 * 1024)
    enc = f.encode_frame(0, data, 19)
    assert enc[5] == f.CODEC_NONE
    assert len(enc) == f.HEADER_SIZE + len(data)


def test_header_layout_is_as_documented() -> None:
    enc = f.encode_frame(0x0102030405060708, b"x" * 10, 0)
    assert enc[:4] == b"OSMF" and enc[4] == 1 and enc[5] == 0
    assert struct.unpack_from("<HQII", enc, 6) == (0, 0x0102030405060708, 10, 10)
    assert enc[24:40] == f.digest(b"x" * 10)
    assert f.HEADER_SIZE == 40


def test_zero_frame() -> None:
    enc = f.encode_zero_frame(65536, 1 << 30)
    assert len(enc) == f.HEADER_SIZE
    frame = f.decode_frame(enc)
    assert frame.is_zero and frame.length == 1 << 30 and frame.data == b""


def _corrupt(enc: bytes, pos: int, value: int) -> bytes:
    b = bytearray(enc)
    b[pos] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda e: _corrupt(e, 0, ord("X")), f.BadMagic),
        (lambda e: _corrupt(e, 4, 3), f.UnsupportedVersion),
        (lambda e: _corrupt(e, 5, 7), f.UnknownCodec),
        (lambda e: _corrupt(e, 6, 0x80), f.UnknownFlags),
        (lambda e: e[:20], f.TruncatedFrame),
        (lambda e: e[:-1], f.TruncatedFrame),
        (lambda e: e + b"\0", f.LengthMismatch),
        (lambda e: _corrupt(e, 16, 9), f.LengthMismatch),  # plain length != payload length
        (lambda e: _corrupt(e, len(e) - 1, e[-1] ^ 1), f.HashMismatch),
        (lambda e: _corrupt(e, 30, e[30] ^ 1), f.HashMismatch),
    ],
)
def test_rejections(mutate: object, error: type[f.FrameError]) -> None:
    enc = f.encode_frame(0, os.urandom(1000), 0)
    with pytest.raises(error):
        f.decode_frame(mutate(enc))  # type: ignore[operator]


def test_unknown_version_message_names_it() -> None:
    enc = _corrupt(f.encode_frame(0, b"abc", 0), 4, 9)
    with pytest.raises(f.UnsupportedVersion, match="version 9 is not supported"):
        f.decode_frame(enc)
    assert f.UnsupportedVersion.code == "InvalidFrame.UnsupportedVersion"


def test_corrupt_compressed_payload() -> None:
    enc = bytearray(f.encode_frame(0, b"abcd" * 50_000, 1))
    enc[f.HEADER_SIZE + 10] ^= 0xFF
    with pytest.raises((f.HashMismatch, f.LengthMismatch)):
        f.decode_frame(bytes(enc))


def test_zero_frame_with_payload_is_rejected() -> None:
    enc = bytearray(f.encode_zero_frame(0, 4096))
    struct.pack_into("<I", enc, 20, 5)
    with pytest.raises(f.UnknownFlags):
        f.decode_frame(bytes(enc) + b"12345")


def test_iter_frames_stops_at_first_bad_frame() -> None:
    good = [f.encode_frame(i * 4096, os.urandom(4096), 0) for i in range(3)]
    body = b"".join(good) + _corrupt(good[0], 0, 0) + good[1]
    it = f.iter_frames(io.BytesIO(body))
    assert [fr.offset for fr in (next(it), next(it), next(it))] == [0, 4096, 8192]
    with pytest.raises(f.BadMagic):
        next(it)
    assert list(f.iter_frames(io.BytesIO(b""))) == []
    with pytest.raises(f.TruncatedFrame):
        list(f.iter_frames(io.BytesIO(good[0][:-3])))


def test_zstd_level_mapping() -> None:
    assert [f.zstd_level(i) for i in range(11)] == [0, 1, 1, 2, 3, 4, 6, 9, 12, 15, 19]
    with pytest.raises(ValueError):
        f.zstd_level(11)


def test_hash_map_round_trip() -> None:
    m = {i * 7: f.digest(str(i).encode()) for i in range(100)}
    assert f.decode_hash_map(f.encode_hash_map(65536, m)) == (65536, m)
    with pytest.raises(f.LengthMismatch):
        f.decode_hash_map(f.encode_hash_map(65536, m)[:-1])


@settings(max_examples=200, deadline=None)
@given(
    offset=st.integers(0, 2**63),
    data=st.binary(min_size=1, max_size=70_000) | st.builds(lambda n: b"\0" * n, st.integers(1, 200_000)),
    level=st.sampled_from([0, 1, 3, 19]),
)
def test_property_round_trip(offset: int, data: bytes, level: int) -> None:
    enc = f.encode_frame(offset, data, level)
    frame = f.decode_frame(enc)
    assert (frame.offset, frame.data) == (offset, data)
    assert list(f.iter_frames(io.BytesIO(enc + enc))) == [frame, frame]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_property_any_bit_flip_is_caught(data: bytes, pos: int, bit: int) -> None:
    enc = bytearray(f.encode_frame(123, data, 0))
    pos %= len(enc)
    enc[pos] ^= 1 << bit
    try:
        frame = f.decode_frame(bytes(enc))
    except f.FrameError:
        return
    # Only the offset field carries no check of its own; any other flip must be caught.
    assert 8 <= pos < 16 and frame.data == data


@given(st.dictionaries(st.integers(0, 299), st.binary(min_size=16, max_size=16).filter(any), max_size=60))
def test_hash_array_encodes_as_the_map_does(m: dict[int, bytes]) -> None:
    import numpy as np

    digests = np.zeros((300, 16), np.uint8)
    for i, h in m.items():
        digests[i] = np.frombuffer(h, np.uint8)
    assert f.encode_hash_array(16384, digests) == f.encode_hash_map(16384, m)
    assert f.decode_hash_map(f.encode_hash_array(16384, digests)) == (16384, m)


@given(st.dictionaries(st.integers(0, 2**40), st.binary(min_size=16, max_size=16), max_size=80))
def test_hash_array_is_the_map(m: dict[int, bytes]) -> None:
    arr = f.HashArray.decode(f.encode_hash_map(16384, m))
    assert arr == m and len(arr) == len(m) and arr.chunk_size == 16384
    for i in list(m)[:5]:
        assert arr[i] == m[i] and arr.get(i + 2**41) is None
        assert arr.window(i, i + 3) == {k: v for k, v in m.items() if i <= k < i + 3}


def test_hash_array_refuses_unordered_records() -> None:
    raw = bytearray(f.encode_hash_map(16384, {1: b"a" * 16, 2: b"b" * 16}))
    raw[20:28], raw[44:52] = raw[44:52], raw[20:28]
    with pytest.raises(f.LengthMismatch):
        f.HashArray.decode(bytes(raw))


# -- the standard-library family (an agent without xxhash, zstandard, numpy) ---------------------------


def test_blake2b_zlib_frames_round_trip_as_version_2() -> None:
    text = b"an old server's disk " * 10_000
    enc = f.encode_frame(8192, text, 3, hash_id=f.HASH_BLAKE2B, codec=f.CODEC_ZLIB)
    assert enc[4] == 2 and enc[5] == f.CODEC_ZLIB and enc[6] == f.HASH_BLAKE2B and enc[7] == 0
    assert enc[24:40] == hashlib.blake2b(text, digest_size=16).digest() and len(enc) < len(text) // 10
    frame = f.decode_frame(enc)
    assert (frame.offset, frame.data) == (8192, text)
    assert f.parse_header(enc).hash_id == f.HASH_BLAKE2B
    raw = f.encode_frame(0, os.urandom(5000), 0, hash_id=f.HASH_BLAKE2B)
    assert raw[4:8] == bytes([2, f.CODEC_NONE, f.HASH_BLAKE2B, 0]) and f.decode_frame(raw).length == 5000
    # xxh3 frames stay version 1, byte for byte what receivers before version 2 accept
    assert f.encode_frame(0, text, 0)[4] == 1 and f.parse_header(f.encode_frame(0, text, 0)).hash_id == f.HASH_XXH3


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda e: _corrupt(e, 6, 9), f.UnknownHash),
        (lambda e: _corrupt(e, 7, 0x80), f.UnknownFlags),
        (lambda e: _corrupt(e, 6, f.HASH_XXH3), f.HashMismatch),  # a blake2b digest checked as xxh3
        (lambda e: _corrupt(e, len(e) - 1, e[-1] ^ 1), f.HashMismatch),
    ],
)
def test_version_2_rejections(mutate: Any, error: type[f.FrameError]) -> None:
    enc = f.encode_frame(0, os.urandom(1000), 0, hash_id=f.HASH_BLAKE2B)
    with pytest.raises(error):
        f.decode_frame(mutate(enc))


def test_a_zlib_bomb_is_refused_without_inflating_it() -> None:
    plain = 1 << 20
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros claiming to be 1 MiB
    header = struct.pack("<4sBBBBQII16s", f.MAGIC, 2, f.CODEC_ZLIB, f.HASH_BLAKE2B, 0, 0, plain, len(bomb), bytes(16))
    with pytest.raises(f.LengthMismatch):
        f.decode_frame(header + bomb)
    short = zlib.compress(bytes(1000))
    header = struct.pack("<4sBBBBQII16s", f.MAGIC, 2, f.CODEC_ZLIB, f.HASH_BLAKE2B, 0, 0, 2000, len(short), bytes(16))
    with pytest.raises(f.LengthMismatch):
        f.decode_frame(header + short)


def test_hash_maps_name_their_family_and_decode_without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = {3: b"a" * 16, 7: b"b" * 16, 1_000_000: b"c" * 16}
    enc = f.encode_hash_map(4096, hashes, f.HASH_BLAKE2B)
    assert enc[5] == f.HASH_BLAKE2B
    with_numpy = f.HashArray.decode(enc)
    monkeypatch.setattr(f.accel, "numpy", None)
    without = f.HashArray.decode(enc)
    for arr in (with_numpy, without):
        assert arr.hash_id == f.HASH_BLAKE2B and dict(arr) == hashes and arr.window(4, 1_000_000) == {7: b"b" * 16}
    bad = bytearray(enc)
    bad[5] = 9
    with pytest.raises(f.UnknownHash):
        f.HashArray.decode(bytes(bad))


def test_hash_file_spools_the_map_and_searches_it_on_disk(tmp_path: Any) -> None:
    hashes = {i * 3: os.urandom(16) for i in range(100_000)}
    enc = f.encode_hash_map(16384, hashes, f.HASH_XXH3)
    with open(tmp_path / "spool", "w+b") as spool:
        hf = f.HashFile.receive(io.BytesIO(enc), spool, piece=1000)  # many pieces: order checked across them
        assert (hf.chunk_size, hf.hash_id, len(hf)) == (16384, f.HASH_XXH3, len(hashes))
        assert hf == hashes and hf[299_997] == hashes[299_997] and 1 not in hf
        assert hf.window(10, 20) == {12: hashes[12], 15: hashes[15], 18: hashes[18]} and hf.window(1, 3) == {}
        assert hf.window(299_992, 10**9) == {299_994: hashes[299_994], 299_997: hashes[299_997]}
    records = enc[20:]
    swapped = enc[:20] + records[24:48] + records[:24] + records[48:]
    for bad, error in [
        (enc[:-1], f.LengthMismatch),
        (enc + b"\0", f.LengthMismatch),
        (swapped, f.LengthMismatch),
        (enc[:10], f.TruncatedFrame),
        (b"JUNK" + enc[4:], f.BadMagic),
    ]:
        with open(tmp_path / "bad", "w+b") as spool, pytest.raises(error):
            f.HashFile.receive(io.BytesIO(bad), spool, piece=1000)
