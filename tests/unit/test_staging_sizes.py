"""What a run may write to the server's disk, for the space check before it starts."""

from __future__ import annotations

from opensmc.service.staging import copy_bytes

GiB = 1 << 30


def test_block_disk_counts_its_selected_ranges_or_all_of_it() -> None:
    assert copy_bytes({"size_bytes": 8 * GiB}) == 8 * GiB
    assert copy_bytes({"size_bytes": 8 * GiB, "ranges": [(0, GiB), (4 * GiB, 2 * GiB)]}) == 3 * GiB


def test_file_level_partition_counts_tree_store_and_kept_image() -> None:
    disk = {"size_bytes": 8 * GiB, "ranges": [(0, GiB)], "files": [{"target_size": 2 * GiB}]}
    assert copy_bytes(disk) == GiB + 3 * 2 * GiB
