"""The pack format: encode, parse, and every kind of damage refused with PackCorrupt."""

from __future__ import annotations

import os
import struct

import pytest
import xxhash
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from opensmc.chunkstore import packs
from opensmc.chunkstore.packs import (
    CODEC_NONE,
    CODEC_ZSTD,
    PACK_MAGIC,
    BlobEntry,
    PackBuilder,
    PackCorrupt,
    decode_blob,
    encode_index,
    parse_index,
    parse_pack,
)


def h(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def build(blobs: list[bytes], compress: bool = False) -> tuple[str, bytes, bytes]:
    b = PackBuilder()
    for data in blobs:
        b.add(h(data), data, compress=compress)
    return b.finish()


def test_layout_bytes() -> None:
    data = b"\x01" * 100
    name, pack, index = build([data])
    assert pack[:8] == PACK_MAGIC == b"OSMPACK\x01"
    assert struct.unpack_from("<16sB3xII", pack, 8) == (h(data), CODEC_NONE, 100, 100)
    assert pack[36:136] == data
    assert pack[136:] == index
    assert len(index) == 36 + 28
    assert struct.unpack_from("<16sB3xQII", index, 0) == (h(data), CODEC_NONE, 36, 100, 100)
    count, digest, magic = struct.unpack_from("<I16s8s", index, 36)
    assert (count, digest, magic) == (1, h(index[:36]), b"OSMPIDX\x01")
    assert name == xxhash.xxh3_128_hexdigest(pack)


@given(st.lists(st.binary(min_size=0, max_size=3000), max_size=12), st.booleans())
def test_round_trip(blobs: list[bytes], compress: bool) -> None:
    name, pack, index = build(blobs, compress)
    entries = parse_pack(pack, name)
    assert entries == parse_index(index) == parse_index(pack)
    assert [e.hash for e in entries] == [h(b) for b in blobs]
    for e, data in zip(entries, blobs, strict=True):
        assert e.plain_length == len(data)
        assert decode_blob(e, pack[e.offset : e.offset + e.stored_length]) == data


def test_compression_kept_only_when_it_pays() -> None:
    sparse = b"\0" * 8192 + os.urandom(8192)
    noise = os.urandom(16384)
    _, pack, _ = build([sparse, noise], compress=True)
    a, b = parse_pack(pack)
    assert a.codec == CODEC_ZSTD and a.stored_length < a.plain_length
    assert b.codec == CODEC_NONE and b.stored_length == 16384
    assert decode_blob(a, pack[a.offset : a.offset + a.stored_length]) == sparse


def test_empty_pack_parses() -> None:
    name, pack, index = build([])
    assert parse_pack(pack, name) == [] == parse_index(index)


@given(st.data())
def test_any_flipped_byte_in_a_pack_is_caught(data: st.DataObject) -> None:
    name, pack, _ = build([b"a" * 500, b"b" * 300], compress=False)
    pos = data.draw(st.integers(0, len(pack) - 1))
    bad = bytearray(pack)
    bad[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PackCorrupt):
        parse_pack(bytes(bad), name)


@given(st.data())
def test_any_flipped_byte_in_an_index_is_caught(data: st.DataObject) -> None:
    _, _, index = build([b"a" * 500, b"b" * 300])
    pos = data.draw(st.integers(0, len(index) - 1))
    bad = bytearray(index)
    bad[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PackCorrupt):
        parse_index(bytes(bad))


def test_damaged_blob_data_without_the_name_is_caught_by_decode() -> None:
    _, pack, _ = build([b"x" * 1000])
    (e,) = parse_pack(pack)
    stored = bytearray(pack[e.offset : e.offset + e.stored_length])
    stored[10] ^= 1
    with pytest.raises(PackCorrupt, match="does not match its hash"):
        decode_blob(e, bytes(stored))
    with pytest.raises(PackCorrupt, match="bytes read"):
        decode_blob(e, bytes(stored[:-1]))


def test_index_damage_kinds() -> None:
    with pytest.raises(PackCorrupt, match="too short"):
        parse_index(b"short")
    _, pack, index = build([b"q" * 10])
    with pytest.raises(PackCorrupt, match="magic"):
        parse_index(index[:-1] + b"\x02")
    count_lie = bytearray(index)
    struct.pack_into("<I", count_lie, len(index) - 28, 1000)
    with pytest.raises(PackCorrupt, match="more than it holds"):
        parse_index(bytes(count_lie))
    with pytest.raises(PackCorrupt, match="magic"):
        parse_pack(b"OSMPACK\x02" + pack[8:])
    with pytest.raises(PackCorrupt, match="its name"):
        parse_pack(pack, "data/00/" + "0" * 32)


def test_index_pointing_outside_or_disagreeing_with_headers() -> None:
    data = b"z" * 64
    _, pack, _ = build([data])
    body_end = 8 + 28 + 64
    for entry, what in [
        (BlobEntry(h(data), CODEC_NONE, 10_000, 64, 64), "outside"),
        (BlobEntry(h(data), CODEC_NONE, 4, 64, 64), "outside"),
        (BlobEntry(h(data), CODEC_NONE, 36, 64, 63), "disagree"),
        (BlobEntry(h(b"other"), CODEC_NONE, 36, 64, 64), "disagree"),
    ]:
        forged = pack[:body_end] + encode_index([entry])
        with pytest.raises(PackCorrupt, match=what):
            parse_pack(forged)


def test_unknown_codec_refused() -> None:
    with pytest.raises(PackCorrupt, match="unknown codec"):
        decode_blob(BlobEntry(h(b"ab"), 7, 0, 2, 2), b"ab")


def test_garbage_zstd_refused() -> None:
    with pytest.raises(PackCorrupt):
        decode_blob(BlobEntry(h(b"ab"), CODEC_ZSTD, 0, 2, 5), b"hello")


class _NoDecompress:
    def decompress(self, *args: object, **kwargs: object) -> bytes:
        raise AssertionError("decompressed a frame that declares more than the blob holds")


def test_zstd_frame_declaring_more_than_plain_length_refused_before_decompressing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = b"\0" * (64 * 1024 * 1024)  # declares 64 MiB in its header, a few bytes stored
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(big)
    assert zstandard.frame_content_size(frame) == len(big) and len(frame) < 10_000
    entry = BlobEntry(h(b"\0" * 16384), CODEC_ZSTD, 0, 16384, len(frame))
    monkeypatch.setattr(packs, "_dctx", _NoDecompress())
    with pytest.raises(PackCorrupt, match="declares 67108864 bytes, 16384 expected"):
        decode_blob(entry, frame)


def test_zstd_frame_without_declared_size_is_bounded() -> None:
    big = b"\0" * (1024 * 1024)
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(big)
    assert zstandard.frame_content_size(frame) == -1
    entry = BlobEntry(h(b"\0" * 16384), CODEC_ZSTD, 0, 16384, len(frame))
    with pytest.raises(PackCorrupt):
        decode_blob(entry, frame)


def test_zstd_frame_declaring_less_is_caught_by_the_hash() -> None:
    small = b"\1" * 100
    frame = zstandard.ZstdCompressor(level=1).compress(small)
    entry = BlobEntry(h(b"\1" * 200), CODEC_ZSTD, 0, 200, len(frame))
    with pytest.raises(PackCorrupt):
        decode_blob(entry, frame)
