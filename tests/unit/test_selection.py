"""Which ranges of a disk a job copies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from opensmc.domain.selection import copy_ranges, file_level_sizes

MiB = 1 << 20
CS = 64 * 1024
PARTS = [
    {"device": "0_0", "offset": MiB, "size_bytes": 100 * MiB, "path": "/boot"},
    {"device": "0_1", "offset": 101 * MiB, "size_bytes": 900 * MiB, "path": "/"},
    {"device": "0_2", "offset": 1001 * MiB, "size_bytes": 23 * MiB, "path": "/data"},
]


def test_nothing_excluded_is_the_whole_disk() -> None:
    assert copy_ranges(1024 * MiB, PARTS, set(), CS) == [(0, 1024 * MiB)]


def test_excluded_partition_leaves_a_hole() -> None:
    assert copy_ranges(1024 * MiB, PARTS, {"0_1"}, CS) == [(0, 101 * MiB), (1001 * MiB, 23 * MiB)]


def test_unaligned_partition_keeps_the_neighbours_chunks() -> None:
    parts = [{"device": "0_0", "offset": MiB + 512, "size_bytes": 4 * MiB}]
    assert copy_ranges(8 * MiB, parts, {"0_0"}, CS) == [(0, MiB + CS), (5 * MiB, 3 * MiB)]


def test_excluded_devices_from_every_shape() -> None:
    spec = {
        "SystemDiskParts": [{"Device": "0_1", "SizeBytes": 1, "Block": False}, {"Device": "0_0", "Block": True}],
        "DataDisks": [{"Index": 1, "Parts": [{"Device": "1_0", "SizeBytes": 1, "Block": False}]}],
        "Disks": {"System": {"Parts": [{"Path": "/data", "SizeBytes": 1, "Block": False}]}},
    }
    assert set(file_level_sizes(spec, 0, PARTS)) == {"0_1", "0_2"}
    assert set(file_level_sizes(spec, 1, [])) == {"1_0"}
    assert set(file_level_sizes({}, 0, PARTS)) == set()


@settings(deadline=None)  # no time limits in tests: a busy machine must not fail them
@given(
    st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 600), st.booleans()), max_size=6),
)
def test_ranges_cover_everything_but_whole_excluded_chunks(parts_in: list[tuple[int, int, bool]]) -> None:
    size = 5000 * 4096
    parts = [{"device": f"0_{i}", "offset": o * 4096, "size_bytes": n * 4096} for i, (o, n, _x) in enumerate(parts_in)]
    excluded = {f"0_{i}" for i, (_o, _n, x) in enumerate(parts_in) if x}
    ranges = copy_ranges(size, parts, excluded, CS)
    covered = [False] * size
    for off, length in ranges:
        assert off % CS == 0 and length > 0
        for b in range(off // 4096, (off + length) // 4096):
            covered[b * 4096] = True
    for b in range(0, size, 4096):
        inside = [
            p
            for p in parts
            if p["device"] in excluded and p["offset"] <= b and b + 4096 <= p["offset"] + p["size_bytes"]
        ]
        if not covered[b]:
            assert inside, f"block at {b} dropped without an excluded partition around it"
    starts = [o for o, _ in ranges]
    assert starts == sorted(starts)
