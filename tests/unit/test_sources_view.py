"""`opensmc sources` flags agents older than the server (they upgrade at their next heartbeat)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from opensmc.cli import views


@pytest.mark.parametrize(
    ("agent", "server", "older"),
    [
        ("0.1.0", "0.2.0", True),
        ("0.2.0", "0.2.0", False),
        ("0.10.0", "0.9.1", False),  # numbers, not strings
        ("0.9", "0.9.1", True),
        ("0.2.0+dev", "0.2.0", True),  # not a plain version: any difference counts
    ],
)
def test_older(agent: str, server: str, older: bool) -> None:
    assert views._older(agent, server) is older


def test_sources_table_flags_older_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    def source(sid: str, version: str) -> dict[str, Any]:
        return {"SourceId": sid, "Name": sid, "State": "Available", "Platform": "Linux", "JobId": "",
                "ErrorCode": "", "AgentVersion": version, "Disks": {"System": {"Size": 20}}}  # fmt: skip

    monkeypatch.setattr(views, "_all", lambda *_a: [source("s-old", "0.0.9"), source("s-new", "9.9.9")])
    monkeypatch.setattr(views, "server_version", lambda _c: "1.0.0")
    out = io.StringIO()
    views.show_sources(None, Console(file=out, width=400, color_system=None))  # type: ignore[arg-type]
    rows = {line.split()[1]: line for line in out.getvalue().splitlines() if " s-" in line}
    assert "0.0.9 (older than the server's 1.0.0" in rows["s-old"]
    assert "older than" not in rows["s-new"]
