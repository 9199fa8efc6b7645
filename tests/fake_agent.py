"""A discovery report as `opensmc.agent.discovery.to_report` writes it, for a made-up machine.

Tests register migration sources with it (through the agent API or
`opensmc.service.agents.register_source`) without running an agent.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

GIB = 1 << 30


def agent_report(name: str, system_gib: int, data_gib: tuple[int, ...]) -> dict[str, Any]:
    """A registration report in `opensmc.agent.discovery.to_report` layout."""
    disks: list[dict[str, Any]] = []
    for index, gib in enumerate((system_gib, *data_gib)):
        if index == 0:
            parts = [
                _part("0_0", 1, "/boot", 1 << 20, 512 << 20, "Boot", need=True),
                _part("0_1", 2, "/", (1 << 20) + (512 << 20), gib * GIB - (600 << 20), "System", need=True),
            ]
        else:
            parts = [
                _part(f"{index}_0", 1, f"/data{index}", 1 << 20, gib * GIB - (2 << 20), "Normal", need=False)
            ]
        disks.append(
            {
                "index": index,
                "path": f"/dev/vd{chr(ord('a') + index)}",
                "size_bytes": gib * GIB,
                "size_gib": gib,
                "sector_size": 512,
                "label": "gpt",
                "warnings": [],
                "parts": parts,
            }
        )
    info = {"agent_mode": "daemon", "agent_type": "opensmc", "client_type": "", "cores": "2",
            "cpu_usage": "0.01", "hostname": name, "ipv4": "10.0.0.5", "ipv6": "",
            "memory": "1.00", "memory_usage": "0.40"}  # fmt: skip
    return {
        "report_version": 1,
        "machine_id": uuid.uuid4().hex,
        "hostname": name,
        "platform": "Ubuntu",
        "os_id": "ubuntu",
        "os_version": "22.04",
        "os_pretty_name": "Ubuntu 22.04.4 LTS",
        "kernel_release": "5.15.0-105-generic",
        "kernel_level": 515,
        "architecture": "x86_64",
        "cores": 2,
        "memory_bytes": GIB,
        "ipv4": ["10.0.0.5"],
        "ipv6": [],
        "system_info": json.dumps(info, separators=(",", ":"), sort_keys=True),
        "system_disk_size": system_gib,
        "disks": disks,
    }


def _part(
    device: str, number: int, path: str, offset: int, size: int, kind: str, *, need: bool
) -> dict[str, Any]:
    return {
        "device": device,
        "number": number,
        "path": path,
        "node": f"/dev/vda{number}",
        "mount_point": path,
        "offset": offset,
        "size_bytes": size,
        "fs_type": "ext4",
        "part_type": "0FC63DAF-8483-4772-8E79-3D69E47DC3E4",
        "name": "",
        "can_block": True,
        "need": need,
        "type": kind,
    }
