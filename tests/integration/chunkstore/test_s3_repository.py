"""A Repository on S3 (a real Ceph RGW): put, flush, get, snapshot, gc and check, as on a directory."""

from __future__ import annotations

from typing import Any

import numpy as np

from opensmc.chunkstore.check import check
from opensmc.chunkstore.gc import collect
from opensmc.chunkstore.location import StoreLocation, backend_for
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.s3 import S3Backend
from opensmc.chunkstore.snapshots import DiskIndex, delete_snapshot, list_snapshots, load_snapshot, save_snapshot
from tests.integration.chunkstore.support import CHUNK, PACK4, blob, h


def _disk(hashes: list[bytes | None]) -> DiskIndex:
    digests = np.zeros((len(hashes), 16), dtype=np.uint8)
    for i, d in enumerate(hashes):
        if d is not None:
            digests[i] = np.frombuffer(d, dtype=np.uint8)
    return DiskIndex(len(hashes) * CHUNK, CHUNK, digests)


def test_round_trip_gc_and_check_on_s3(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    location = StoreLocation(f"s3://{s3_bucket}/images", s3_endpoint=s3_server.endpoint)
    backend = backend_for(location)
    assert isinstance(backend, S3Backend)
    repo = Repository(backend, pack_size=PACK4)
    blobs = [blob(i) for i in range(10)]
    with repo.session():
        for b in blobs:
            repo.put(h(b), b)
        assert repo.flush() >= 3  # ten blobs, four to a pack
        assert repo.durable_seq >= 3
    assert all(repo.get(h(b)) == b for b in blobs)
    assert len(backend.list("data/")) == len(backend.list("index/")) == 3

    # A second view (another process would do the same) sees the same blobs.
    other = Repository(backend_for(location))
    assert other.chunk_size == CHUNK and other.get(h(blobs[7])) == blobs[7]

    keep = _disk([h(b) for b in blobs[:5]] + [None])
    drop = _disk([h(b) for b in blobs[5:]])
    save_snapshot(backend, "img-keep", [keep])
    save_snapshot(backend, "img-drop", [drop])
    assert list_snapshots(backend) == ["img-drop", "img-keep"]
    assert load_snapshot(backend, "img-keep").disks[0].hash_at(2) == h(blobs[2])
    report = check(repo)
    assert report.ok, report.errors
    assert (report.packs, report.blobs, report.snapshots) == (3, 10, 2)

    assert delete_snapshot(backend, "img-drop")
    gc = collect(repo, iter(()))
    assert not gc.deferred and not gc.errors
    assert gc.blobs_freed == 5
    assert all(repo.get(h(b)) == b for b in blobs[:5])
    report = check(repo)
    assert report.ok, report.errors
    assert report.blobs == 5 and report.snapshots == 1
    assert backend.read("generation") == b"2"  # before the sweep and after it


def test_gc_defers_while_another_view_holds_a_session(
    s3_server: Any, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    location = StoreLocation(f"s3://{s3_bucket}/x", s3_endpoint=s3_server.endpoint)
    writer = Repository(backend_for(location))
    collector = Repository(backend_for(location))
    with writer.session():
        assert collect(collector, iter(())).deferred  # the shared lock object keeps the exclusive taker out
    assert not collect(collector, iter(())).deferred
