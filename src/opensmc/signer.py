"""Client-side request signing for our own CLI (``opensmc call``) and agent.

Produces the same requests as the official SDKs (WIRE.md §2-§3): operation
parameters in the query string, an empty body, and either an ACS3
``Authorization`` header or a V1 ``Signature`` parameter. The
canonicalisation is imported from :mod:`opensmc.api.signing`, so whatever we
sign the server verifies.

The returned query string is already percent-encoded (RFC 3986). Send it
verbatim, e.g. ``httpx.post(f"http://{host}/?{qs}", headers=headers)``;
passing the parameters through ``params=`` instead would re-encode them and
break the signature.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from opensmc.api.signing import (
    ACS3_ALGORITHM,
    EMPTY_SHA256,
    V1_METHOD,
    acs3_canonical_request,
    acs3_signature,
    acs3_string_to_sign,
    percent_encode,
    v1_signature,
    v1_string_to_sign,
)

# Parameters sign_v1 writes itself; a caller-supplied copy would be signed
# twice with two values.
_V1_COMMON = frozenset(
    {
        "Action",
        "Version",
        "Format",
        "Timestamp",
        "SignatureMethod",
        "SignatureVersion",
        "SignatureNonce",
        "AccessKeyId",
        "Signature",
    }
)


def _timestamp(now: datetime | None) -> str:
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _nonce(nonce: str | None) -> str:
    # 32 lower-case hex characters, the shape both SDKs send.
    return uuid.uuid4().hex if nonce is None else nonce


def _encode_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()))


def sign_acs3(
    method: str,
    host: str,
    action: str,
    version: str,
    params: Mapping[str, str],
    access_key_id: str,
    secret: str,
    now: datetime | None = None,
    nonce: str | None = None,
    *,
    path: str = "/",
) -> tuple[str, dict[str, str]]:
    """Sign with ACS3-HMAC-SHA256; return ``(query_string, headers)``.

    ``host`` must be exactly the Host header that will be sent, port
    included when it is not the scheme's default (``127.0.0.1:18080``).
    ``path`` is the request path (the canonical URI): ``/`` for RPC calls,
    e.g. ``/opensmc/v1/images/m-…`` for the image routes; send it exactly
    as given. The body must be empty.
    """
    headers = {
        "accept": "application/json",
        "host": host,
        "x-acs-action": action,
        "x-acs-content-sha256": EMPTY_SHA256,
        "x-acs-date": _timestamp(now),
        "x-acs-signature-nonce": _nonce(nonce),
        "x-acs-version": version,
    }
    signed = sorted(headers)
    canonical = acs3_canonical_request(method, path, params, headers, signed, EMPTY_SHA256)
    signature = acs3_signature(secret, acs3_string_to_sign(canonical))
    headers["Authorization"] = (
        f"{ACS3_ALGORITHM} Credential={access_key_id},SignedHeaders={';'.join(signed)},Signature={signature}"
    )
    return _encode_query(params), headers


def sign_v1(
    method: str,
    action: str,
    version: str,
    params: Mapping[str, str],
    access_key_id: str,
    secret: str,
    now: datetime | None = None,
    nonce: str | None = None,
) -> str:
    """Sign with V1 HMAC-SHA1; return the full query string, ``Signature`` included."""
    clash = _V1_COMMON.intersection(params)
    if clash:
        raise ValueError(f"parameters reserved for V1 signing: {', '.join(sorted(clash))}")
    query = {
        **params,
        "Action": action,
        "Version": version,
        "Format": "JSON",
        "Timestamp": _timestamp(now),
        "SignatureMethod": V1_METHOD,
        "SignatureVersion": "1.0",
        "SignatureNonce": _nonce(nonce),
        "AccessKeyId": access_key_id,
    }
    query["Signature"] = v1_signature(secret, v1_string_to_sign(method, query))
    return _encode_query(query)
