"""The real API app on a real socket, and the official SDK clients pointed at it.

`smc_server` runs ``create_app`` under uvicorn on 127.0.0.1 (a free port, a
background thread) on top of the ``services`` fixture, so every compat test
runs on both SQLite and PostgreSQL. It bootstraps an account with
``create_account`` and yields a :class:`SmcServer`. Clients are built the way
WIRE.md §1 measured: Tea with ``protocol='http'`` (ACS3, or V1 with
``signature_algorithm='v2'``), legacy ``AcsClient`` with an ``http://``
endpoint on each request (which also defeats the six HTTPS-forced classes).

Migration sources only come into being when an agent registers: `add_source`
registers one through the agent API (``POST /agent/v1/register`` with an
activation code from CreateAccessToken and a discovery report in
``opensmc.agent.discovery.to_report`` layout).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from opensmc.api.agent_routes import routes as agent_routes
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Services
from opensmc.signer import sign_v1
from tests.fake_agent import agent_report
from tests.live_server import running


@dataclass
class SmcServer:
    endpoint: str  #: host:port, as Tea's Config.endpoint wants it
    access_key_id: str
    secret: str
    services: Services
    account_id: str

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def new_account(self, name: str = "other") -> KeyPair:
        return create_account(self.services, name)


@pytest.fixture
def smc_server(services: Services) -> Iterator[SmcServer]:
    from opensmc.api.app import create_app

    with running(create_app(services, agent_routes)) as endpoint:
        pair = create_account(services, "compat")
        yield SmcServer(
            endpoint=endpoint,
            access_key_id=pair.access_key_id,
            secret=pair.access_key_secret,
            services=services,
            account_id=pair.account_id,
        )


@pytest.fixture(params=["acs3", "v2"])
def tea(request: pytest.FixtureRequest, smc_server: SmcServer) -> Any:
    """A Tea client signing with ACS3, or with V1 (`signature_algorithm='v2'`)."""
    return tea_client(smc_server, v2=request.param == "v2")


# clients ------------------------------------------------------------------------------


def tea_client(
    server: SmcServer, *, v2: bool = False, key_id: str | None = None, secret: str | None = None
) -> Any:
    from alibabacloud_smc20190601.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    cfg = open_api_models.Config(
        access_key_id=key_id or server.access_key_id,
        access_key_secret=secret or server.secret,
        endpoint=server.endpoint,
        protocol="http",
    )
    if v2:
        cfg.signature_algorithm = "v2"
    return Client(cfg)


class Legacy:
    """An AcsClient that sends every request to the test server over plain HTTP."""

    def __init__(
        self, server: SmcServer, key_id: str | None = None, secret: str | None = None, region: str = "local"
    ) -> None:
        from aliyunsdkcore.client import AcsClient

        self.server = server
        # The legacy SDK sends its client region as RegionId on every request;
        # "local" is the test server's one configured region.
        self.client = AcsClient(key_id or server.access_key_id, secret or server.secret, region)

    def __call__(self, request_class: type, **setters: Any) -> dict[str, Any]:
        """`legacy(StartReplicationJobRequest, JobId="j-1")`: calls `set_JobId`, sends, parses."""
        req = request_class()
        for name, value in setters.items():
            getattr(req, f"set_{name}")(value)
        req.set_endpoint(self.server.url)
        body = self.client.do_action_with_exception(req)
        parsed: dict[str, Any] = json.loads(body)
        return parsed


# migration sources --------------------------------------------------------------------


def add_source(
    server: SmcServer,
    name: str,
    *,
    account: KeyPair | None = None,
    system_gib: int = 20,
    data_gib: tuple[int, ...] = (20,),
) -> str:
    """A registered, Available migration source of `account` (default: the server's); its SourceId."""
    report = agent_report(name, system_gib, data_gib)
    key_id = account.access_key_id if account else server.access_key_id
    secret = account.access_key_secret if account else server.secret
    # An activation code from CreateAccessToken, then the agent's registration call.
    qs = sign_v1("POST", "CreateAccessToken", "2019-06-01", {"Count": "1"}, key_id, secret)
    token = httpx.post(f"{server.url}/?{qs}", timeout=10).json()
    resp = httpx.post(
        f"{server.url}/agent/v1/register",
        json={
            "token_id": token["AccessTokenId"],
            "token_code": token["AccessTokenCode"],
            "agent_version": "0.1.0",
            "report": report,
        },
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    source_id = resp.json()["source_id"]
    assert isinstance(source_id, str) and source_id.startswith("s-")
    return source_id


def set_source_state(server: SmcServer, source_id: str, state: str) -> None:
    """Force a source's state (an agent going offline is out of this suite's scope)."""
    from opensmc.store.tables import sources

    with server.services.db.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == source_id).values(state=state))
