"""`opensmc store copy`: a data dir's image store moved onto S3 (a real Ceph RGW) or another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.location import StoreLocation, backend_for
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.snapshots import DiskIndex, list_snapshots, load_snapshot, save_snapshot
from tests.integration.chunkstore.support import CHUNK, PACK4, blob, h


def make_store(data_dir: Path) -> list[bytes]:
    repo = Repository(LocalBackend(data_dir / "store"), pack_size=PACK4)
    blobs = [blob(i) for i in range(9)]
    with repo.session():
        for b in blobs:
            repo.put(h(b), b)
        repo.flush()
    digests = np.zeros((len(blobs) + 1, 16), dtype=np.uint8)
    for i, b in enumerate(blobs):
        digests[i] = np.frombuffer(h(b), dtype=np.uint8)
    save_snapshot(repo.backend, "m-one", [DiskIndex((len(blobs) + 1) * CHUNK, CHUNK, digests)])
    return blobs


def store_copy(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opensmc.cli.main", "store", "copy", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def same_store(location: StoreLocation | str, blobs: list[bytes]) -> None:
    repo = Repository(backend_for(location))
    assert list_snapshots(repo.backend) == ["m-one"]
    disk = load_snapshot(repo.backend, "m-one").disks[0]
    assert [repo.get(disk.hash_at(i)) for i in range(len(blobs))] == blobs


def test_copy_to_another_directory_is_resumable_and_refuses_another_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    blobs = make_store(data)
    dest = tmp_path / "elsewhere"
    first = store_copy(data, "--to", str(dest))
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["ok"] and out["images"] == 1 and out["copied"] == len(LocalBackend(data / "store").list(""))
    same_store(str(dest), blobs)
    # An interrupted copy (here: a pack and the snapshot lost) is finished by running it again.
    pack = LocalBackend(dest).list("data/")[0]
    (dest / pack).unlink()
    (dest / "snapshots" / "m-one").unlink()
    again = json.loads(store_copy(data, "--to", str(dest)).stdout)
    assert (again["copied"], again["ok"]) == (2, True)
    same_store(str(dest), blobs)
    # Another store is never mixed into.
    other = tmp_path / "other"
    Repository(LocalBackend(other), chunk_size=2 * CHUNK)
    refused = store_copy(data, "--to", str(other))
    assert refused.returncode == 1 and "holds another store" in refused.stderr and "Traceback" not in refused.stderr
    bad = store_copy(data, "--to", "ftp://nowhere/x")
    assert bad.returncode == 2 and "--to" in bad.stderr


def test_copy_to_s3(tmp_path: Path, s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    data = tmp_path / "data"
    blobs = make_store(data)
    url = f"s3://{s3_bucket}/site1"
    done = store_copy(data, "--to", url, "--s3-endpoint", s3_server.endpoint, env=s3_env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]
    same_store(StoreLocation(url, s3_endpoint=s3_server.endpoint), blobs)
    first = json.loads(done.stdout)
    again = json.loads(store_copy(data, "--to", url, "--s3-endpoint", s3_server.endpoint, env=s3_env).stdout)
    assert (again["copied"], again["skipped"]) == (0, first["copied"])
