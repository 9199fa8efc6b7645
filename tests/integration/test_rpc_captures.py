"""The captured official-SDK requests (spec/captures) replayed against the app, byte for byte.

Signed with AccessKeyId ``testid`` / secret ``testsecret`` at a past time, so
the test adds that key and fixes the server clock to the capture's timestamp.
Whatever the action then answers, it must not be a signature or time error.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from opensmc.api.app import create_app
from opensmc.service.context import Services
from opensmc.store import accounts as account_store
from tests.integration.test_rpc_app import AUTH_CODES, XML_TYPE
from tests.live_server import running

CAPTURES = (
    (
        Path(os.environ["OPENSMC_SHARED_DIR"])
        if os.environ.get("OPENSMC_SHARED_DIR")
        else Path(__file__).resolve().parents[2].parent / "shared"
    )
    / "spec"
    / "captures"
)


def _captures() -> list[Any]:
    out = []
    for name in ("tea.jsonl", "tea_v2.jsonl", "legacy.jsonl", "misc.jsonl"):
        path = CAPTURES / name
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines()):
            out.append(pytest.param(json.loads(line), id=f"{name}:{n + 1}"))
    return out


def _capture_time(req: dict[str, Any]) -> datetime:
    headers = {k.lower(): v for k, v in req["headers"]}
    stamp = headers.get("x-acs-date") or dict(parse_qsl(req["path"].partition("?")[2]))["Timestamp"]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@pytest.mark.parametrize("req", _captures())
def test_captured_sdk_requests_verify(req: dict[str, Any], services: Services) -> None:
    """Real SDK requests (signed with testid/testsecret) pass the signature checks unchanged."""
    with services.db.begin() as conn:
        account_store.create_account(conn, "acc-captures", "captures", services.clock())
        account_store.add_access_key(
            conn, "testid", "acc-captures", services.secrets.seal("testsecret"), services.clock()
        )
    services.clock = lambda: _capture_time(req)
    headers = [(k, v) for k, v in req["headers"] if k.lower() not in ("content-length", "accept-encoding")]
    with running(create_app(services)) as endpoint:
        # The captured Host header (127.0.0.1:18080) is signed: send it as captured.
        with httpx.Client(base_url=f"http://{endpoint}", timeout=10) as c:
            resp = c.request(req["method"], req["path"], headers=headers, content=req["body"].encode())
    if resp.headers["content-type"] == XML_TYPE:
        code = ET.fromstring(resp.content).findtext("Code")
    else:
        code = resp.json().get("Code")
    assert code not in AUTH_CODES, resp.text
    assert resp.status_code < 500, resp.text
