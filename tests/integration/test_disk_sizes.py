"""Disks of the size the job asked for: the source's bytes, then zeros; metadata only in the chunk store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from opensmc.domain.errors import SmcError
from opensmc.images.store import ImageStore
from opensmc.service.disk_sizes import GIB, asked_sizes, grow, grow_all
from tests.guest import store_image

MiB = 1 << 20


def _source(path: Path, size: int) -> bytes:
    data = bytearray(size)
    data[:5000] = os.urandom(5000)
    data[-3000:] = os.urandom(3000)  # the short last chunk holds data: it must be padded
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("size", [3 * MiB + 12345, 3 * MiB], ids=["short-last-chunk", "whole-chunks"])
def test_grown_disk_is_the_source_then_zeros(tmp_path: Path, size: int) -> None:
    src = _source(tmp_path / "src.img", size)
    store_image(tmp_path / "store", "m-src", [tmp_path / "src.img"], tmp_path)
    store = ImageStore(tmp_path / "store")
    disk = store.get("m-src").disks[0].index
    blobs_before = store.repo.blob_count()
    target = 8 * MiB
    with store.repo.session():
        grown = grow(store, disk, target, "system disk")
        store.create_image("m-grown", [grown])
    out = tmp_path / "grown.raw"
    store.export("m-grown", 0, "raw", out)
    assert out.stat().st_size == target
    assert out.read_bytes() == src + bytes(target - size)
    # metadata only: the extra chunks are zero digests; at most the padded last chunk is a new blob
    manifest = store.get("m-grown").disks[0]
    assert manifest.chunk_count == target // 16384
    assert all(h is None for h in manifest.chunk_hexes()[-((target - size) // 16384) :])
    assert store.repo.blob_count() - blobs_before == (1 if size % 16384 else 0)
    assert store.verify("m-grown").ok
    assert store.verify("m-src").ok  # the source's image is untouched


def test_a_source_larger_than_the_asked_size_is_refused(tmp_path: Path) -> None:
    _source(tmp_path / "src.img", 3 * MiB)
    store_image(tmp_path / "store", "m-src", [tmp_path / "src.img"], tmp_path)
    store = ImageStore(tmp_path / "store")
    disk = store.get("m-src").disks[0].index
    with pytest.raises(SmcError) as err:
        grow(store, disk, 2 * MiB, "source's system disk")
    assert err.value.code == "ReplicationJob.DiskSizeTooSmall" and "at least 1 GiB" in err.value.message


def test_asked_sizes_read_every_parameter_shape() -> None:
    disks = [{"index": 0, "path": "/dev/vda"}, {"index": 1, "path": "/dev/vdb"}, {"index": 2, "path": "/dev/vdc"}]
    old = SimpleNamespace(system_disk_size=40, disk_spec=json.dumps({"DataDisks": [{"Index": 2, "Size": 100}]}))
    assert asked_sizes(old, disks) == [40 * GIB, None, 100 * GIB]
    new = SimpleNamespace(
        system_disk_size=0,
        disk_spec=json.dumps({"Disks": {"System": {"Size": 30}, "Data": [{"DiskId": "/dev/vdb", "Size": 50}]}}),
    )
    assert asked_sizes(new, disks) == [30 * GIB, 50 * GIB, None]
    none = SimpleNamespace(system_disk_size=None, disk_spec=None)
    assert asked_sizes(none, disks) == [None, None, None]


def test_grow_all_leaves_disks_without_a_size_alone(tmp_path: Path) -> None:
    _source(tmp_path / "src.img", MiB)
    store_image(tmp_path / "store", "m-src", [tmp_path / "src.img"], tmp_path)
    store = ImageStore(tmp_path / "store")
    disk = store.get("m-src").disks[0].index
    job = SimpleNamespace(system_disk_size=0, disk_spec="{}")
    assert grow_all(store, job, [{"index": 0, "path": "/dev/sda"}], [disk]) == [disk]
