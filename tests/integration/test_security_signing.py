"""Issue 7 item 1: the action that runs is the action that was signed.

A duplicated ``x-acs-action`` header, or a V1 request whose Action is only in
an (unsigned) header, must never run an action other than the signed one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from opensmc import API_VERSION
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.api.signing import v1_signature, v1_string_to_sign
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Services
from opensmc.signer import sign_acs3, sign_v1
from tests.live_server import running


@pytest.fixture
def client(services: Services) -> Iterator[httpx.Client]:
    with (
        running(create_app(services, image_routes)) as endpoint,
        httpx.Client(base_url=f"http://{endpoint}", timeout=10) as c,
    ):
        yield c


@pytest.fixture
def key(services: Services) -> KeyPair:
    return create_account(services, "sig")


def _acs3(client: httpx.Client, key: KeyPair, action: str, params: dict[str, str]) -> tuple[str, dict[str, str]]:
    return sign_acs3(
        "POST", client.base_url.netloc.decode(), action, API_VERSION, params, key.access_key_id, key.access_key_secret
    )


def _token(client: httpx.Client, key: KeyPair) -> str:
    qs, headers = _acs3(client, key, "CreateAccessToken", {"Name": "t1", "Count": "1"})
    resp = client.post(f"/?{qs}", headers=headers)
    assert resp.status_code == 200, resp.text
    token_id: str = resp.json()["AccessTokenId"]
    return token_id


def _tokens(client: httpx.Client, key: KeyPair) -> list[dict[str, Any]]:
    qs, headers = _acs3(client, key, "ListAccessTokens", {})
    resp = client.post(f"/?{qs}", headers=headers)
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["AccessTokens"]["AccessToken"]
    return items


def test_duplicated_action_header_is_refused(client: httpx.Client, key: KeyPair) -> None:
    token_id = _token(client, key)
    qs, headers = _acs3(client, key, "DisableAccessToken", {"AccessTokenId": token_id})
    # The forged header goes first: a server reading the first value would delete the code.
    forged = [("x-acs-action", "DeleteAccessToken"), *headers.items()]
    resp = client.post(f"/?{qs}", headers=forged)
    assert resp.status_code == 400, resp.text
    assert resp.json()["Code"] == "IncompleteSignature"
    assert "x-acs-action" in resp.json()["Message"]
    assert [t["AccessTokenId"] for t in _tokens(client, key)] == [token_id]
    # Forged header last: same refusal (never "last one wins" either).
    qs, headers = _acs3(client, key, "DisableAccessToken", {"AccessTokenId": token_id})
    resp = client.post(f"/?{qs}", headers=[*headers.items(), ("x-acs-action", "DeleteAccessToken")])
    assert resp.status_code == 400, resp.text
    assert [t["AccessTokenId"] for t in _tokens(client, key)] == [token_id]


def test_duplicated_version_and_nonce_headers_are_refused(client: httpx.Client, key: KeyPair) -> None:
    for name in ("x-acs-version", "x-acs-signature-nonce", "authorization", "x-acs-date"):
        qs, headers = _acs3(client, key, "ListAccessTokens", {})
        resp = client.post(f"/?{qs}", headers=[*headers.items(), (name, headers.get(name, "x"))])
        assert resp.status_code == 400, (name, resp.text)
        assert resp.json()["Code"] == "IncompleteSignature", name


def test_query_action_must_match_signed_header(client: httpx.Client, key: KeyPair) -> None:
    token_id = _token(client, key)
    # Both the query and the header are signed here, but they name two actions: the
    # server must not pick one by a precedence rule the client cannot know.
    qs, headers = _acs3(client, key, "DisableAccessToken", {"AccessTokenId": token_id, "Action": "DeleteAccessToken"})
    resp = client.post(f"/?{qs}", headers=headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["Code"] == "InvalidParameter"
    assert "x-acs-action" in resp.json()["Message"]
    assert [t["AccessTokenId"] for t in _tokens(client, key)] == [token_id]


def _v1_without(key: KeyPair, params: dict[str, str], drop: str) -> str:
    """A V1 query signed over everything but `drop` (a client that left it out)."""
    full = {
        "Format": "JSON",
        "Action": "ListAccessTokens",
        "Version": API_VERSION,
        "AccessKeyId": key.access_key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": uuid.uuid4().hex,
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **params,
    }
    del full[drop]
    full["Signature"] = v1_signature(key.access_key_secret, v1_string_to_sign("POST", full))
    return urlencode(full)


def test_v1_action_only_from_signed_parameters(client: httpx.Client, key: KeyPair) -> None:
    token_id = _token(client, key)
    # Signed without Action; the action in the header is unauthenticated (V1 signs no header).
    qs = _v1_without(key, {"AccessTokenId": token_id}, "Action")
    resp = client.post(f"/?{qs}", headers={"x-acs-action": "DeleteAccessToken"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["Code"] == "MissingParameter"
    assert "Action" in resp.json()["Message"]
    assert [t["AccessTokenId"] for t in _tokens(client, key)] == [token_id]
    qs = _v1_without(key, {}, "Version")
    resp = client.post(f"/?{qs}", headers={"x-acs-version": API_VERSION})
    assert resp.status_code == 400, resp.text
    assert resp.json()["Code"] == "MissingParameter"
    # With both signed, the same request works (the test can tell the two apart).
    qs = sign_v1("POST", "ListAccessTokens", API_VERSION, {}, key.access_key_id, key.access_key_secret)
    assert client.post(f"/?{qs}").status_code == 200


def test_image_route_refuses_duplicated_headers(client: httpx.Client, key: KeyPair) -> None:
    _qs, headers = sign_acs3(
        "GET",
        client.base_url.netloc.decode(),
        "DownloadImage",
        API_VERSION,
        {},
        key.access_key_id,
        key.access_key_secret,
        path="/opensmc/v1/images",
    )
    resp = client.get("/opensmc/v1/images", headers=[("x-acs-action", "Other"), *headers.items()])
    assert resp.status_code == 400, resp.text
    assert resp.json()["Code"] == "IncompleteSignature"
    _qs, headers = sign_acs3(
        "GET",
        client.base_url.netloc.decode(),
        "DownloadImage",
        API_VERSION,
        {},
        key.access_key_id,
        key.access_key_secret,
        path="/opensmc/v1/images",
    )
    assert client.get("/opensmc/v1/images", headers=headers).status_code == 200


def test_nonce_limit_fits_the_nonce_column() -> None:
    from opensmc.api.signing import MAX_NONCE_LEN
    from opensmc.store.tables import nonces

    assert nonces.c.nonce.type.length == MAX_NONCE_LEN  # type: ignore[attr-defined]


def test_long_nonce_is_refused_not_a_server_error(client: httpx.Client, key: KeyPair) -> None:
    # 128 characters fit the column on both databases; 129-256 used to pass the check and
    # then fail the insert on PostgreSQL (500).
    for length, status in ((128, 200), (129, 400), (256, 400)):
        qs, headers = sign_acs3(
            "POST",
            client.base_url.netloc.decode(),
            "ListAccessTokens",
            API_VERSION,
            {},
            key.access_key_id,
            key.access_key_secret,
            nonce="n" * (length - 6) + uuid.uuid4().hex[:6],
        )
        resp = client.post(f"/?{qs}", headers=headers)
        assert resp.status_code == status, (length, resp.text)
        if status == 400:
            assert resp.json()["Code"] == "InvalidParameter"
            assert "SignatureNonce" in resp.json()["Message"]
        qs = sign_v1(
            "POST",
            "ListAccessTokens",
            API_VERSION,
            {},
            key.access_key_id,
            key.access_key_secret,
            nonce="v" * (length - 6) + uuid.uuid4().hex[:6],
        )
        resp = client.post(f"/?{qs}")
        assert resp.status_code == status, (length, resp.text)
