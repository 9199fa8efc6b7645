"""The RPC endpoint over raw HTTP: routing, parameters, signatures, formats and error bodies.

Requests are built with `opensmc.signer` (or by hand for the odd cases) and
sent with httpx to the app served by uvicorn on a real socket; both databases.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from opensmc import API_VERSION
from opensmc.api.app import create_app
from opensmc.api.signing import percent_encode, v1_signature, v1_string_to_sign
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.agents import register_source
from opensmc.service.context import Services
from opensmc.signer import sign_acs3, sign_v1
from tests.fake_agent import agent_report
from tests.live_server import running

JSON_TYPE = "application/json;charset=utf-8"
XML_TYPE = "text/xml;charset=utf-8"
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
AUTH_CODES = {
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidTimeStamp.Expired",
    "InvalidTimeStamp.Format",
    "InvalidAccessKeyId.NotFound",
    "SignatureNonceUsed",
    "InvalidSignatureMethod",
}


@pytest.fixture
def client(services: Services) -> Iterator[httpx.Client]:
    with (
        running(create_app(services)) as endpoint,
        httpx.Client(base_url=f"http://{endpoint}", timeout=10) as c,
    ):
        yield c


def host(client: httpx.Client) -> str:
    return client.base_url.netloc.decode()


@pytest.fixture
def key(services: Services) -> KeyPair:
    return create_account(services, "rpc")


def v1_query(
    key: KeyPair, params: dict[str, str], *, method: str = "POST", secret: str | None = None, **common: str
) -> dict[str, str]:
    """Every parameter of a V1-signed request, `Signature` included (unencoded)."""
    full = {
        "Format": "JSON",
        "Version": API_VERSION,
        "AccessKeyId": key.access_key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": uuid.uuid4().hex,
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **common,
        **params,
    }
    full["Signature"] = v1_signature(secret or key.access_key_secret, v1_string_to_sign(method, full))
    return full


def encode(params: dict[str, str]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in params.items())


def v1(
    client: httpx.Client, key: KeyPair, action: str, params: dict[str, str] | None = None, **kw: Any
) -> Any:
    qs = sign_v1("POST", action, API_VERSION, params or {}, key.access_key_id, key.access_key_secret, **kw)
    return client.post(f"/?{qs}")


def acs3(
    client: httpx.Client, key: KeyPair, action: str, params: dict[str, str] | None = None, **kw: Any
) -> Any:
    qs, headers = sign_acs3(
        "POST",
        host(client),
        action,
        API_VERSION,
        params or {},
        key.access_key_id,
        key.access_key_secret,
        **kw,
    )
    return client.post(f"/?{qs}", headers=headers)


def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == JSON_TYPE
    body: dict[str, Any] = resp.json()
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}, body
    assert body["Code"] == code, body
    assert REQUEST_ID.match(body["RequestId"])
    assert body["Message"] and body["HostId"]
    assert code in body["Recommend"]
    assert resp.headers["x-acs-request-id"] == body["RequestId"]
    return body


def assert_ok(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == JSON_TYPE
    body: dict[str, Any] = resp.json()
    assert REQUEST_ID.match(body["RequestId"])
    assert resp.headers["x-acs-request-id"] == body["RequestId"]
    return body


# routing and parameters ---------------------------------------------------------------


def test_post_v1_and_acs3(client: httpx.Client, key: KeyPair) -> None:
    body = assert_ok(v1(client, key, "DescribeSourceServers", {"PageSize": "5"}))
    assert (body["TotalCount"], body["PageSize"], body["SourceServers"]) == (0, 5, {"SourceServer": []})
    body = assert_ok(acs3(client, key, "DescribeSourceServers", {"PageSize": "7"}))
    assert body["PageSize"] == 7


def test_get_with_query(client: httpx.Client, key: KeyPair) -> None:
    params = v1_query(key, {"Action": "ListAccessTokens"}, method="GET")
    body = assert_ok(client.get(f"/?{encode(params)}"))
    assert body["AccessTokens"] == {"AccessToken": []}
    qs, headers = sign_acs3(
        "GET", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    assert_ok(client.get(f"/?{qs}", headers=headers))


def test_form_body_parameters(client: httpx.Client, key: KeyPair) -> None:
    """V1 parameters may travel in a form body; the signature covers query and form alike."""
    params = v1_query(key, {"Action": "CreateAccessToken", "Name": "form-made", "Count": "3"})
    query = {k: params.pop(k) for k in ("Action", "Version", "Signature")}
    resp = client.post(
        f"/?{urlencode(query)}",
        content=urlencode(params),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    token = assert_ok(resp)["AccessTokenId"]
    listed = assert_ok(v1(client, key, "ListAccessTokens", {"AccessTokenId.1": token}))
    (item,) = listed["AccessTokens"]["AccessToken"]
    assert (item["Name"], item["Count"]) == ("form-made", "3")


def test_action_and_version_from_headers_or_query(client: httpx.Client, key: KeyPair) -> None:
    # ACS3 puts them only in x-acs-* headers
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    assert "Action" not in qs
    assert_ok(client.post(f"/?{qs}", headers=headers))
    # V1 in the query, with unrelated headers present (as the SDKs send them, unsigned)
    params = v1_query(key, {"Action": "DescribeWorkgroups"})
    assert_ok(client.post(f"/?{encode(params)}", headers={"x-acs-action": "DescribeWorkgroups"}))


def test_unknown_action(client: httpx.Client, key: KeyPair) -> None:
    body = assert_error(v1(client, key, "DescribeInstances"), 404, "InvalidAction.NotFound")
    assert body["Message"] == "Specified api is not found, please check your url and method."
    assert_error(acs3(client, key, "RunCommand"), 404, "InvalidAction.NotFound")


def test_wrong_or_missing_version(client: httpx.Client, key: KeyPair) -> None:
    qs = sign_v1("POST", "DescribeWorkgroups", "2014-05-26", {}, key.access_key_id, key.access_key_secret)
    assert_error(client.post(f"/?{qs}"), 400, "InvalidVersion")
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", "2020-01-01", {}, key.access_key_id, key.access_key_secret
    )
    assert_error(client.post(f"/?{qs}", headers=headers), 400, "InvalidVersion")
    params = v1_query(key, {"Action": "DescribeWorkgroups"})
    del params["Version"]
    assert_error(client.post(f"/?{encode(params)}"), 400, "MissingParameter")


def test_missing_action(client: httpx.Client) -> None:
    assert_error(client.post("/"), 400, "MissingParameter")


def test_ignored_common_parameters(client: httpx.Client, key: KeyPair) -> None:
    """OwnerId, ResourceOwnerAccount, RegionId (off CreateReplicationJob) and SignatureType are accepted."""
    params = {
        "OwnerId": "1234567890123",
        "ResourceOwnerAccount": "x",
        "RegionId": "cn-hangzhou",
        "SignatureType": "",
    }
    assert_ok(v1(client, key, "DescribeSourceServers", params))


def test_booleans_any_case(client: httpx.Client, key: KeyPair, services: Services) -> None:
    report = agent_report("web-1", 20, ())
    source = register_source(services, key.account_id, report, machine_id="m-bool").source_id
    tag = {"ResourceType": "sourceserver", "ResourceId.1": source}

    def tags() -> int:
        listed = assert_ok(v1(client, key, "ListTagResources", tag))
        return len(listed["TagResources"]["TagResource"])

    for value in ("true", "True", "TRUE"):
        assert_ok(v1(client, key, "TagResources", {**tag, "Tag.1.Key": "k", "Tag.1.Value": "v"}))
        assert tags() == 1
        assert_ok(v1(client, key, "UntagResources", {**tag, "All": value}))
        assert tags() == 0
    for value in ("false", "False", "FALSE"):
        assert_ok(v1(client, key, "TagResources", {**tag, "Tag.1.Key": "k", "Tag.1.Value": "v"}))
        assert_ok(v1(client, key, "UntagResources", {**tag, "All": value, "TagKey.1": "k"}))
        assert tags() == 0
    body = assert_error(v1(client, key, "UntagResources", {**tag, "All": "yes"}), 400, "InvalidParameter")
    assert "All" in body["Message"]


# signatures ---------------------------------------------------------------------------


def test_missing_signature(client: httpx.Client, key: KeyPair) -> None:
    params = v1_query(key, {"Action": "DescribeWorkgroups"})
    del params["Signature"]
    body = assert_error(client.post(f"/?{encode(params)}"), 400, "MissingParameter")
    assert "Signature" in body["Message"]


def test_wrong_signature_message_carries_string_to_sign(client: httpx.Client, key: KeyPair) -> None:
    params = v1_query(key, {"Action": "DescribeWorkgroups"}, secret="wrong")
    body = assert_error(client.post(f"/?{encode(params)}"), 400, "SignatureDoesNotMatch")
    # the legacy SDK compares split(':')[1] with its own string-to-sign
    assert body["Message"].split(":")[1] == v1_string_to_sign("POST", params)
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, "wrong"
    )
    body = assert_error(client.post(f"/?{qs}", headers=headers), 400, "SignatureDoesNotMatch")
    assert ":" in body["Message"]


def test_tampered_requests(client: httpx.Client, key: KeyPair) -> None:
    qs, headers = sign_acs3(
        "POST",
        host(client),
        "DescribeWorkgroups",
        API_VERSION,
        {"PageSize": "5"},
        key.access_key_id,
        key.access_key_secret,
    )
    assert_error(client.post(f"/?{qs.replace('5', '6')}", headers=headers), 400, "SignatureDoesNotMatch")
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    assert_error(client.post(f"/?{qs}", headers=headers, content=b"x=1"), 400, "SignatureDoesNotMatch")
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    headers["x-acs-action"] = "DeleteWorkgroup"  # a signed header changed in flight
    assert_error(client.post(f"/?{qs}", headers=headers), 400, "SignatureDoesNotMatch")
    # a required header left out of SignedHeaders
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    headers["Authorization"] = headers["Authorization"].replace("x-acs-signature-nonce;", "")
    assert_error(client.post(f"/?{qs}", headers=headers), 400, "IncompleteSignature")
    # V1 with a parameter added after signing
    params = v1_query(key, {"Action": "DescribeWorkgroups"})
    params["PageSize"] = "2"
    assert_error(client.post(f"/?{encode(params)}"), 400, "SignatureDoesNotMatch")


def test_unknown_key(client: httpx.Client, key: KeyPair) -> None:
    qs = sign_v1("POST", "DescribeWorkgroups", API_VERSION, {}, "LTAInobody", "x")
    assert_error(client.post(f"/?{qs}"), 404, "InvalidAccessKeyId.NotFound")
    qs, headers = sign_acs3("POST", host(client), "DescribeWorkgroups", API_VERSION, {}, "LTAInobody", "x")
    assert_error(client.post(f"/?{qs}", headers=headers), 404, "InvalidAccessKeyId.NotFound")


def test_timestamps(client: httpx.Client, key: KeyPair) -> None:
    old = datetime.now(UTC) - timedelta(minutes=20)
    future = datetime.now(UTC) + timedelta(minutes=20)
    assert_error(v1(client, key, "DescribeWorkgroups", now=old), 400, "InvalidTimeStamp.Expired")
    assert_error(acs3(client, key, "DescribeWorkgroups", now=future), 400, "InvalidTimeStamp.Expired")
    assert_ok(v1(client, key, "DescribeWorkgroups", now=datetime.now(UTC) - timedelta(minutes=10)))
    params = v1_query(key, {"Action": "DescribeWorkgroups"}, Timestamp="2026-11-28 12:00:00")
    assert_error(client.post(f"/?{encode(params)}"), 400, "InvalidTimeStamp.Format")


def test_replayed_nonce(client: httpx.Client, key: KeyPair) -> None:
    qs = sign_v1("POST", "CreateAccessToken", API_VERSION, {}, key.access_key_id, key.access_key_secret)
    assert_ok(client.post(f"/?{qs}"))
    assert_error(client.post(f"/?{qs}"), 400, "SignatureNonceUsed")
    qs, headers = sign_acs3(
        "POST", host(client), "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret
    )
    assert_ok(client.post(f"/?{qs}", headers=headers))
    body = assert_error(client.post(f"/?{qs}", headers=headers), 400, "SignatureNonceUsed")
    assert body["Message"] == "Specified signature nonce was used already."
    # the replay created nothing
    assert assert_ok(v1(client, key, "ListAccessTokens"))["TotalCount"] == 1


def test_nonce_is_per_key(client: httpx.Client, key: KeyPair, services: Services) -> None:
    other = create_account(services, "other")
    assert_ok(v1(client, key, "DescribeWorkgroups", nonce="a" * 32))
    assert_ok(v1(client, other, "DescribeWorkgroups", nonce="a" * 32))


# formats and error bodies -------------------------------------------------------------


def test_xml_format(client: httpx.Client, key: KeyPair) -> None:
    assert_ok(v1(client, key, "CreateWorkgroup", {"Name": "wave-1", "Tag.1.Key": "k", "Tag.1.Value": "v"}))
    params = v1_query(key, {"Action": "DescribeWorkgroups"}, Format="XML")
    resp = client.post(f"/?{encode(params)}")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == XML_TYPE
    root = ET.fromstring(resp.content)
    assert root.tag == "DescribeWorkgroupsResponse"
    assert REQUEST_ID.match(root.findtext("RequestId") or "")
    assert root.findtext("TotalCount") == "1"
    assert root.findtext("Workgroups/Workgroup/Name") == "wave-1"
    assert root.findtext("Workgroups/Workgroup/Tags/Tag/Key") == "k"

    params = v1_query(key, {"Action": "StartReplicationJob", "JobId": "j-nope"}, Format="xml")
    resp = client.post(f"/?{encode(params)}")
    assert resp.status_code == 404
    assert resp.headers["content-type"] == XML_TYPE
    err = ET.fromstring(resp.content)
    assert err.tag == "Error"
    assert {child.tag for child in err} == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert err.findtext("Code") == "InvalidJobId.NotFound"


def test_json_format_lower_case_and_absent(client: httpx.Client, key: KeyPair) -> None:
    params = v1_query(key, {"Action": "DescribeWorkgroups"}, Format="json")
    assert_ok(client.post(f"/?{encode(params)}"))
    assert_ok(acs3(client, key, "DescribeWorkgroups"))  # Tea sends no Format


def test_error_bodies_for_every_kind(client: httpx.Client, key: KeyPair) -> None:
    assert_error(v1(client, key, "StartReplicationJob"), 400, "MissingParameter")
    assert_error(v1(client, key, "StartReplicationJob", {"JobId": "j-nope"}), 404, "InvalidJobId.NotFound")
    assert_error(v1(client, key, "DescribeReplicationJobs", {"PageSize": "51"}), 400, "InvalidParameter")
    assert_error(v1(client, key, "DescribeReplicationJobs", {"PageNumber": "abc"}), 400, "InvalidParameter")
    assert_error(v1(client, key, "ListTagResources"), 400, "MissingParameter.ResourceType")
    assert_error(v1(client, key, "DescribeReplicationJobs", {"JobId.0": "j-1"}), 400, "InvalidParameter")


def test_nul_characters_are_invalid(client: httpx.Client, key: KeyPair) -> None:
    """PostgreSQL text cannot hold NUL: the API must refuse it, not fail with a 500."""
    for params in ({"JobId": "j-\x00"}, {"JobId": "\x00"}):
        body = assert_error(v1(client, key, "DeleteReplicationJob", params), 400, "InvalidParameter")
        assert "JobId" in body["Message"]
    assert_error(v1(client, key, "CreateAccessToken", {"Name": "a\x00b"}), 400, "InvalidParameter")
    assert_error(acs3(client, key, "CreateWorkgroup", {"Name": "wave\x00"}), 400, "InvalidParameter")
    assert_error(v1(client, key, "DescribeWorkgroups", {"Foo\x00": "x"}), 400, "InvalidParameter")


def test_success_bodies_are_json_with_request_id(client: httpx.Client, key: KeyPair) -> None:
    token = assert_ok(v1(client, key, "CreateAccessToken"))["AccessTokenId"]
    body = assert_ok(v1(client, key, "DeleteAccessToken", {"AccessTokenId": token}))
    assert set(body) == {"RequestId"}  # an "empty" operation still answers JSON


def test_body_too_large(client: httpx.Client, key: KeyPair) -> None:
    qs = sign_v1("POST", "DescribeWorkgroups", API_VERSION, {}, key.access_key_id, key.access_key_secret)
    resp = client.post(
        f"/?{qs}",
        content=b"a=" + b"x" * (1 << 20),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_error(resp, 400, "InvalidParameter")


def test_other_methods_and_head_on_the_rpc_path_keep_their_answers(client: httpx.Client, key: KeyPair) -> None:
    """GET and POST / take the RPC endpoint's direct path; HEAD and other methods still go through Starlette."""
    params = v1_query(key, {"Action": "DescribeSourceServers"}, method="GET")
    got = client.get("/", params=params)
    assert got.status_code == 200 and REQUEST_ID.match(got.headers["x-acs-request-id"])
    assert got.headers["content-type"] == JSON_TYPE and int(got.headers["content-length"]) == len(got.content)
    head = client.head("/", params=v1_query(key, {"Action": "DescribeSourceServers"}, method="HEAD"))
    assert head.status_code == 200 and head.content == b""
    assert client.head("/healthz").status_code == 200  # a HEAD answer has no body part to carry its head
    assert client.put("/", params=params).status_code == 405


def test_an_over_large_rpc_body_is_refused_before_it_is_read(client: httpx.Client) -> None:
    from opensmc.api.serving import MAX_BODY

    for body in (b"a" * (MAX_BODY + 1), iter([b"a" * MAX_BODY, b"b"])):
        got = client.post("/", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert got.status_code == 400 and got.json()["Code"] == "InvalidParameter"
        assert f"larger than {MAX_BODY} bytes" in got.json()["Message"] and got.headers["connection"] == "close"
