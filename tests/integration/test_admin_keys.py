"""Issue 7 item 11: accounts and AccessKeys managed with `opensmc admin`, read-only keys, instant revocation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from opensmc import API_VERSION
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.cli.main import main
from opensmc.service.context import Services
from opensmc.signer import sign_acs3, sign_v1
from opensmc.store.db import Database
from opensmc.store.secretbox import SecretBox
from tests.conftest import SECRET_KEY
from tests.live_server import running


@pytest.fixture
def admin(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """`opensmc admin …` against the test database (`--database`), parsed JSON output."""
    monkeypatch.setenv("OPENSMC_MASTER_KEY", SECRET_KEY.decode())

    def run(*argv: str, ok: bool = True) -> Any:
        code = main(["admin", *argv, "--database", database.url, "--data-dir", str(tmp_path / "admin")])
        out, err = capsys.readouterr()
        assert (code == 0) is ok, err
        return json.loads(out) if ok else err

    return run


@pytest.fixture
def endpoints(services: Services) -> Iterator[tuple[str, str]]:
    # Two server processes' worth of apps on one database: revocation must reach both at once.
    other = replace(services)
    with running(create_app(services, image_routes)) as a, running(create_app(other, image_routes)) as b:
        yield a, b


def _call(endpoint: str, key: dict[str, str], action: str, params: dict[str, str] | None = None) -> httpx.Response:
    qs, headers = sign_acs3(
        "POST", endpoint, action, API_VERSION, params or {}, key["access_key_id"], key["access_key_secret"]
    )
    return httpx.post(f"http://{endpoint}/?{qs}", headers=headers, timeout=10)


def test_account_create_and_key_lifecycle(admin: Any, endpoints: tuple[str, str]) -> None:
    acc = admin("account", "create", "--name", "second")
    assert set(acc) == {"account_id", "access_key_id", "access_key_secret"}
    for ep in endpoints:
        assert _call(ep, acc, "DescribeSourceServers").status_code == 200
    assert acc["account_id"] in [a["account_id"] for a in admin("account", "list")]
    extra = admin("key", "create", "--account", acc["account_id"])
    listed = admin("key", "list", "--account", acc["account_id"])
    assert {k["access_key_id"] for k in listed} == {acc["access_key_id"], extra["access_key_id"]}
    assert all("access_key_secret" not in k and k["status"] == "Enabled" for k in listed)
    # disable: refused by every process from the next request on
    admin("key", "disable", acc["access_key_id"])
    for ep in endpoints:
        resp = _call(ep, acc, "DescribeSourceServers")
        assert resp.status_code == 404 and resp.json()["Code"] == "InvalidAccessKeyId.NotFound", resp.text
        assert _call(ep, extra, "DescribeSourceServers").status_code == 200  # the other key still works
    assert {k["access_key_id"]: k["status"] for k in admin("key", "list")}[acc["access_key_id"]] == "Disabled"
    admin("key", "enable", acc["access_key_id"])
    assert _call(endpoints[0], acc, "DescribeSourceServers").status_code == 200
    admin("key", "delete", acc["access_key_id"])
    for ep in endpoints:
        assert _call(ep, acc, "DescribeSourceServers").status_code == 404
    assert acc["access_key_id"] not in [k["access_key_id"] for k in admin("key", "list")]
    assert "no AccessKey" in admin("key", "delete", acc["access_key_id"], ok=False)
    assert "no account" in admin("key", "create", "--account", "acc-nope", ok=False)


def test_read_only_key(admin: Any, endpoints: tuple[str, str]) -> None:
    acc = admin("account", "create", "--name", "audited")
    ro = admin("key", "create", "--account", acc["account_id"], "--read-only")
    assert ro["policy"] == "ReadOnly"
    ep = endpoints[0]
    for action in ("DescribeSourceServers", "ListAccessTokens", "DescribeReplicationJobs", "ListTagResources"):
        params = {"ResourceType": "SourceServer"} if action == "ListTagResources" else {}
        assert _call(ep, ro, action, params).status_code == 200, action
    for action, params in (("CreateAccessToken", {}), ("DeleteSourceServer", {"SourceId": "s-x"}),
                           ("StartReplicationJob", {"JobId": "j-x"})):  # fmt: skip
        resp = _call(ep, ro, action, params)
        assert resp.status_code == 403, resp.text
        assert resp.json()["Code"] == "Forbidden.RAM"
        assert action in resp.json()["Message"]
    # V1 signatures obey the policy too
    qs = sign_v1("POST", "CreateAccessToken", API_VERSION, {}, ro["access_key_id"], ro["access_key_secret"])
    resp = httpx.post(f"http://{ep}/?{qs}", timeout=10)
    assert resp.status_code == 403 and resp.json()["Code"] == "Forbidden.RAM"
    # The full key of the same account can do it.
    assert _call(ep, acc, "CreateAccessToken").status_code == 200
    # Image downloads are not Describe*/List*.
    qs, headers = sign_acs3("GET", ep, "DownloadImage", API_VERSION, {}, ro["access_key_id"], ro["access_key_secret"],
                            path="/opensmc/v1/images")  # fmt: skip
    resp = httpx.get(f"http://{ep}/opensmc/v1/images", headers=headers, timeout=10)
    assert resp.status_code == 403 and resp.json()["Code"] == "Forbidden.RAM"
    listed = {k["access_key_id"]: k["policy"] for k in admin("key", "list")}
    assert listed[ro["access_key_id"]] == "ReadOnly" and listed[acc["access_key_id"]] == "FullAccess"


def test_admin_with_data_dir_and_master_key_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENSMC_MASTER_KEY", raising=False)
    monkeypatch.delenv("OPENSMC_DATABASE_URL", raising=False)
    data = tmp_path / "data"
    assert main(["admin", "key", "list", "--data-dir", str(data)]) == 1
    assert "no database" in capsys.readouterr().err
    data.mkdir()
    (data / "opensmc.db").touch()

    def run(*argv: str) -> Any:
        assert main(["admin", *argv, "--data-dir", str(data)]) == 0
        return json.loads(capsys.readouterr().out)

    acc = run("account", "create", "--name", "local")
    old_key = (data / "master.key").read_bytes()
    assert (data / "master.key").stat().st_mode & 0o077 == 0
    rotated = run("master-key", "rotate")
    assert rotated["resealed"] == 1
    new_key = (data / "master.key").read_bytes()
    assert new_key != old_key and not (data / "master.key.new").exists()
    from opensmc.service import accounts
    from opensmc.service.context import Settings

    db = Database(f"sqlite:///{data / 'opensmc.db'}")
    svc = Services(db=db, settings=Settings(data_dir=data), secrets=SecretBox(new_key.strip()))
    found = accounts.lookup_secret(svc, acc["access_key_id"], cached=False)
    assert found is not None and (found.account_id, found.secret) == (acc["account_id"], acc["access_key_secret"])
    old = Services(db=db, settings=Settings(data_dir=data), secrets=SecretBox(old_key.strip()))
    # the old master key opens nothing now
    assert accounts.lookup_secret(old, acc["access_key_id"], cached=False) is None
    db.dispose()
