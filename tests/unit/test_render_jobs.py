"""A job's stored disk selection in the §3.11 wrapper shapes (api/actions/jobs.py)."""

from __future__ import annotations

from opensmc.api.actions.jobs import render_disks


def test_render_disks_of_a_selection_and_of_none() -> None:
    spec = '{"SystemDiskParts": [{"Device": "0_0", "SizeBytes": 1024, "Block": true}]}'
    first = render_disks(spec)
    assert first == render_disks(spec)
    assert first["SystemDiskParts"] == {"SystemDiskPart": [{"Device": "0_0", "SizeBytes": 1024, "Block": True}]}
    assert (
        render_disks("")
        == render_disks("{}")
        == {"SystemDiskParts": {"SystemDiskPart": []}, "DataDisks": {"DataDisk": []}}
    )
