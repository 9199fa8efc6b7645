"""The compact blob index against a dict, merges and hashes that share their first half included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.chunkstore import blobindex
from opensmc.chunkstore.blobindex import BlobIndex

# Hashes from a small alphabet so that operations hit the same ones; half of them share
# their first 8 bytes with another (what the index bisects on).
HASHES = [bytes([i // 2]) * 8 + bytes([i]) * 8 for i in range(12)]
LOCATIONS = st.integers(0, (1 << 128) - 1)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(HASHES), LOCATIONS),
        st.tuples(st.just("setdefault"), st.sampled_from(HASHES), LOCATIONS),
        st.tuples(st.just("pop"), st.sampled_from(HASHES), st.just(0)),
        st.tuples(st.just("merge"), st.just(b""), st.just(0)),
    ),
    max_size=60,
)


@pytest.fixture(autouse=True)
def _small_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobindex, "MERGE_AT", 3)


@settings(deadline=None, max_examples=300)
@given(OPS)
def test_behaves_as_a_dict(ops: list[tuple[str, bytes, int]]) -> None:
    index, model = BlobIndex(), {}
    for op, h, v in ops:
        if op == "set":
            index[h] = v
            model[h] = v
        elif op == "setdefault":
            index.setdefault(h, v)
            model.setdefault(h, v)
        elif op == "pop":
            index.pop(h)
            model.pop(h, None)
        else:
            index.merge()
        assert len(index) == len(model)
        assert [index.get(x) for x in HASHES] == [model.get(x) for x in HASHES]
        assert index.known(HASHES) == [x in model for x in HASHES]
        assert [x in index for x in HASHES] == [x in model for x in HASHES]


def test_bulk_adds_keep_their_rules() -> None:
    index = BlobIndex()
    index.add_absent([(HASHES[0], 1), (HASHES[1], 2), (HASHES[0], 3)])  # the first wins
    index.merge()
    index.add_absent([(HASHES[1], 9), (HASHES[2], 4)])
    index.update([(HASHES[0], 5), (HASHES[2], 6)])  # the newest wins
    assert [index.get(h) for h in HASHES[:3]] == [5, 2, 6]
    index.merge()
    assert [index.get(h) for h in HASHES[:3]] == [5, 2, 6] and len(index) == 3
    index.clear()
    assert len(index) == 0 and index.get(HASHES[0]) is None and index.known(HASHES[:2]) == [False, False]


def test_many_blobs_take_about_32_bytes_each() -> None:
    import os

    index = BlobIndex()
    index.update([(os.urandom(16), 1 << 100) for _ in range(20_000)])
    index.merge()
    assert len(index) == 20_000
    assert sum(c.nbytes for c in (index._k, index._r, index._hi, index._lo)) == 32 * 20_000
