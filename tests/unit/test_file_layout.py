"""Where partitions land when some are copied file by file (domain/file_layout.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.domain.file_layout import LayoutError, MiB, plan
from opensmc.domain.selection import file_level_sizes


def _disk(*parts: tuple[str, int, int, str], size: int = 192 * MiB, label: str = "gpt") -> dict:
    return {
        "index": 0,
        "size_bytes": size,
        "label": label,
        "sector_size": 512,
        "parts": [
            {"device": d, "number": n + 1, "offset": o, "size_bytes": s, "fs_type": fs}
            for n, (d, o, s, fs) in enumerate(parts)
        ],
    }


DISK = _disk(("0_0", MiB, MiB, ""), ("0_1", 2 * MiB, 96 * MiB, "ext4"), ("0_2", 98 * MiB, 48 * MiB, "ext4"))


def test_a_shrunk_partition_pulls_the_next_one_back_by_whole_mib() -> None:
    layout = plan(DISK, {"0_1": 64 * MiB}, None, "system disk")
    assert [(m.dst_offset, m.dst_size) for m in layout.parts] == [(MiB, MiB), (2 * MiB, 64 * MiB), (66 * MiB, 48 * MiB)]
    assert layout.moved and layout.size == DISK["size_bytes"]
    assert [m.file_level for m in layout.parts] == [False, True, False]


def test_nothing_moves_when_the_file_partition_keeps_its_size() -> None:
    layout = plan(DISK, {"0_1": None}, None, "system disk")
    assert not layout.moved


def test_a_grown_partition_needs_a_larger_disk_and_says_how_large() -> None:
    with pytest.raises(LayoutError, match=r"need .* bytes .*GiB"):
        plan(DISK, {"0_1": 200 * MiB}, None, "system disk")
    layout = plan(DISK, {"0_1": 200 * MiB}, 20 * 1024**3, "system disk")
    assert layout.parts[2].dst_offset == 202 * MiB


def test_a_smaller_target_disk_is_fine_when_the_partitions_fit() -> None:
    disk = _disk(("0_0", MiB, 100 * 1024 * MiB, "ext4"), size=101 * 1024 * MiB)
    layout = plan(disk, {"0_0": 20 * 1024 * MiB - 2 * MiB}, 20 * 1024**3, "system disk")
    assert layout.size == 20 * 1024**3


@pytest.mark.parametrize(
    ("disk", "sizes", "message"),
    [
        (_disk(("0_0", MiB, 96 * MiB, "xfs")), {"0_0": None}, "rebuilds ext2, ext3, ext4"),
        (_disk(("0_0", MiB, 96 * MiB, "ext4")), {"0_9": None}, "has no partition 0_9"),
        (_disk(("0_0", MiB, 96 * MiB, "ext4")), {"0_0": MiB}, "too small"),
    ],
)
def test_what_cannot_be_copied_file_by_file_is_refused_with_what_to_do(disk: dict, sizes: dict, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        plan(disk, sizes, None, "system disk")


def test_logical_partitions_are_not_copied_file_by_file() -> None:
    disk = _disk(("0_0", MiB, 50 * MiB, "ext4"), label="dos")
    disk["parts"][0]["number"] = 5
    with pytest.raises(LayoutError, match="logical partition"):
        plan(disk, {"0_0": None}, None, "system disk")


@settings(deadline=None, max_examples=200)
@given(
    sizes=st.lists(st.integers(min_value=16, max_value=300), min_size=1, max_size=5),
    gaps=st.lists(st.integers(min_value=0, max_value=8), min_size=5, max_size=5),
    targets=st.lists(st.one_of(st.none(), st.integers(min_value=16, max_value=400)), min_size=5, max_size=5),
)
def test_partitions_never_overlap_and_keep_their_order(sizes: list[int], gaps: list[int], targets: list) -> None:
    parts, pos = [], MiB
    for n, s in enumerate(sizes):
        pos += gaps[n] * MiB
        parts.append((f"0_{n}", pos, s * MiB, "ext4"))
        pos += s * MiB
    disk = _disk(*parts, size=pos + MiB)
    wanted = {f"0_{n}": (None if targets[n] is None else targets[n] * MiB) for n in range(len(sizes)) if n % 2 == 0}
    layout = plan(disk, wanted, 64 * 1024**3, "system disk")
    prev_end = 0
    for m in layout.parts:
        assert m.dst_offset >= prev_end and m.dst_offset % MiB == 0
        assert m.dst_size == (m.src_size if not m.file_level or wanted[m.device] is None else wanted[m.device])
        prev_end = m.dst_offset + m.dst_size
    assert layout.parts[0].dst_offset == layout.parts[0].src_offset


def test_the_job_names_file_level_parts_by_device_or_by_path() -> None:
    spec = {
        "SystemDiskParts": [{"Device": "0_1", "SizeBytes": 5 * MiB, "Block": False}, {"Device": "0_0", "Block": True}],
        "Disks": {"System": {"Parts": [{"Path": "/data", "SizeBytes": 7 * MiB, "Block": False}]}},
    }
    parts = [{"device": "0_2", "mount_point": "/data"}]
    assert file_level_sizes(spec, 0, parts) == {"0_1": 5 * MiB, "0_2": 7 * MiB}


def test_a_data_disk_of_the_newer_model_names_its_parts_by_path() -> None:
    spec = {
        "Disks": {"Data": [{"DiskId": "/dev/vdb", "Parts": [{"Path": "/srv", "SizeBytes": 9 * MiB, "Block": False}]}]}
    }
    parts = [{"device": "1_0", "mount_point": "/srv"}]
    assert file_level_sizes(spec, 1, parts, "/dev/vdb") == {"1_0": 9 * MiB}
    assert file_level_sizes(spec, 1, parts, "/dev/vdc") == {}
