"""Server-side verification of the two SMC request-signing schemes.

Both official SDKs sign every request (WIRE.md §3):

* ``ACS3-HMAC-SHA256``: the Tea SDK's default. The signature travels in the
  ``Authorization`` header and covers the query, the listed headers and the
  SHA-256 of the body.
* V1 ``HMAC-SHA1``: the legacy SDK, and Tea with ``signature_algorithm='v2'``.
  The signature is the ``Signature`` query (or form) parameter and covers
  every other query and form parameter, but **no header**.

This module is pure: it gets the request as plain data, the clock, and a
callback that maps an AccessKeyId to its secret. It does no I/O and keeps no
state, so **nonce replay is not checked here**: :func:`verify` returns the
nonce in the :class:`Credential` and the caller must reject a nonce it has
already seen within the time window (``SignatureNonceUsed``).

The canonicalisation helpers are shared with :mod:`opensmc.signer`, so our
own clients sign exactly what this module verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal
from urllib.parse import quote

from opensmc.domain.errors import AuthError, InvalidParameter, MissingParameter

ACS3_ALGORITHM: Final = "ACS3-HMAC-SHA256"
V1_METHOD: Final = "HMAC-SHA1"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Headers a client must sign for ACS3: together they bind the request to
# this server, this operation, this instant and this body. Anything less
# would let a captured signature be replayed against another action.
REQUIRED_SIGNED_HEADERS = (
    "host",
    "x-acs-action",
    "x-acs-version",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
)

MISMATCH_PREFIX = "Specified signature does not match our calculation. server string to sign is:"

# Both SDKs send whole seconds; a fraction is accepted because hand-written
# clients (curl scripts, other SDK languages) sometimes add milliseconds.
_TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z")

# The nonce is stored by the caller for replay detection; bound it so a
# client cannot make us store arbitrarily large keys. It must fit the
# `nonces.nonce` column (String(128)): a longer nonce passing here would
# fail the insert on PostgreSQL with a 500. A test checks the two agree.
MAX_NONCE_LEN = 128

Params = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True)
class SignedRequest:
    """The parts of an HTTP request that a signature can cover.

    ``query`` and ``form`` are already decoded (``+`` is a space) and keep
    empty values: the legacy SDK signs ``SignatureType=``, so decode with
    ``keep_blank_values=True``. ``headers`` has lower-case names; repeated
    headers must be joined with ``,`` and their names listed in ``repeated``
    (a signed header must not repeat: see :func:`collect_headers`). ``path``
    is the request path as sent, without the query.
    """

    method: str
    path: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    repeated: frozenset[str] = frozenset()


#: Headers that decide who is calling and what runs: never accepted twice,
#: signed or not. With two values, one part of a server (routing) may read
#: the first while another (the signature check) reads the last, and a
#: forged header in front then swaps a signed action.
SECURITY_HEADERS = frozenset(
    {
        "authorization",
        "host",
        "x-acs-action",
        "x-acs-version",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-content-sha256",
        "x-acs-security-token",
        "content-type",
    }
)


def collect_headers(raw: Iterable[tuple[str, str]]) -> tuple[dict[str, str], frozenset[str]]:
    """Lower-cased headers (repeats joined with ``,``) and the names that repeated.

    Raises ``IncompleteSignature`` when a :data:`SECURITY_HEADERS` name
    repeats; :func:`verify` refuses any other signed header that repeated.
    """
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in raw:
        low = name.lower()
        if low in headers:
            repeated.add(low)
            headers[low] = f"{headers[low]},{value}"
        else:
            headers[low] = value
    for low in sorted(repeated & SECURITY_HEADERS):
        raise _incomplete(f"The header {low} is given more than once; send it once.")
    return headers, frozenset(repeated)


@dataclass(frozen=True)
class Credential:
    """Who signed a request, when, and with which single-use nonce."""

    access_key_id: str
    timestamp: datetime
    nonce: str
    scheme: Literal["ACS3-HMAC-SHA256", "HMAC-SHA1"]
    security_token: str | None


# --------------------------------------------------------------------------
# Canonicalisation (shared with opensmc.signer)


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
_RESERVED_CHAR = re.compile(r"[^A-Za-z0-9_.~-]")
_ASCII_ESCAPES = {chr(c): f"%{c:02X}" for c in range(128)}


def _escape(match: re.Match[str]) -> str:
    return _ASCII_ESCAPES[match.group()]


def percent_encode(s: str) -> str:
    """RFC 3986 encoding of UTF-8 text: only ``A-Za-z0-9-_.~`` stay literal."""
    # What quote() gives, faster for the ASCII text nearly every parameter is (a signed request
    # encodes each of its keys and values): quote() goes byte by byte in Python.
    if _UNRESERVED.fullmatch(s):
        return s
    if s.isascii():
        return _RESERVED_CHAR.sub(_escape, s)
    # surrogatepass keeps this total: a malformed value must give a
    # signature mismatch, never an unhandled UnicodeEncodeError.
    return quote(s, safe="", encoding="utf-8", errors="surrogatepass")


def _items(params: Params) -> list[tuple[str, str]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


def _canonical_query(params: Params, *, exclude: str | None = None) -> str:
    # Sort on the decoded key, like both SDKs; the value breaks ties so that
    # a repeated key still yields one deterministic string.
    pairs = sorted((k, v) for k, v in _items(params) if k != exclude)
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in pairs)


def v1_string_to_sign(method: str, params: Params) -> str:
    """The V1 string-to-sign; a ``Signature`` parameter is left out."""
    canonical = _canonical_query(params, exclude="Signature")
    # percent_encode(canonical), in three C calls: every character of the canonical query is
    # unreserved but the '%' of its escapes and the '&' and '=' that join it, and quote() would
    # encode its few hundred bytes one by one in Python (a visible share of a request's CPU).
    encoded = canonical.replace("%", "%25").replace("&", "%26").replace("=", "%3D")
    return f"{method.upper()}&%2F&{encoded}"


def v1_signature(secret: str, string_to_sign: str) -> str:
    """Base64 HMAC-SHA1 keyed with ``secret + "&"``."""
    # hmac.digest: one C call (hmac.new builds an HMAC object in Python first)
    mac = hmac.digest((secret + "&").encode(), string_to_sign.encode(), "sha1")
    return base64.b64encode(mac).decode("ascii")


def acs3_canonical_request(
    method: str,
    path: str,
    query: Params,
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
) -> str:
    """The ACS3 canonical request.

    ``headers`` must have lower-case names and hold every name in
    ``signed_headers`` (lower case, in the order the client listed them).
    The Tea SDK does not percent-encode query keys; SMC keys are
    ``[A-Za-z0-9.]``, so encoding them, as the published algorithm says,
    gives the same string.
    """
    canonical_headers = "".join(f"{name}:{headers[name].strip()}\n" for name in signed_headers)
    return "\n".join(
        [
            method.upper(),
            path or "/",
            _canonical_query(query),
            canonical_headers,
            ";".join(signed_headers),
            payload_hash,
        ]
    )


def acs3_string_to_sign(canonical_request: str) -> str:
    return f"{ACS3_ALGORITHM}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"


def acs3_signature(secret: str, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 keyed with the bare secret (no ``&``, unlike V1)."""
    return hmac.digest(secret.encode(), string_to_sign.encode(), "sha256").hex()


# --------------------------------------------------------------------------
# Verification


def verify(
    req: SignedRequest,
    lookup_secret: Callable[[str], str | None],
    now: datetime,
    window: timedelta = timedelta(minutes=15),
) -> Credential:
    """Check the request's signature and freshness; return who signed it.

    Raises an :class:`~opensmc.domain.errors.SmcError` with the gateway's
    code on any failure. The caller still has to reject a replayed
    ``Credential.nonce`` (not checked here: this function keeps no state).
    """
    auth = req.headers.get("authorization", "")
    if auth.startswith("ACS3-"):
        return _verify_acs3(req, auth, lookup_secret, now, window)
    if any(k == "Signature" for k, _ in [*req.query, *req.form]):
        return _verify_v1(req, lookup_secret, now, window)
    if auth:
        raise _incomplete("The Authorization header uses a scheme other than ACS3.")
    raise MissingParameter("Signature")


def _verify_acs3(
    req: SignedRequest,
    auth: str,
    lookup_secret: Callable[[str], str | None],
    now: datetime,
    window: timedelta,
) -> Credential:
    algorithm, _, rest = auth.partition(" ")
    if algorithm != ACS3_ALGORITHM:
        raise AuthError("InvalidSignatureMethod", f"Specified signature method {algorithm} is not supported.")
    fields: dict[str, str] = {}
    # The SDK writes the fields with bare commas; tolerate ", " from others.
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields:
            raise _incomplete("The Authorization header is malformed.")
        fields[name] = value
    key_id, signed, signature = (fields.get(n, "") for n in ("Credential", "SignedHeaders", "Signature"))
    if not key_id or not signed or not signature:
        raise _incomplete("The Authorization header needs Credential, SignedHeaders and Signature.")

    names = signed.split(";")
    if any(not n or n != n.strip().lower() for n in names):
        # Lower-case names without blanks, as the SDK writes them, so the
        # list we rebuild is byte-for-byte the one the client signed.
        raise _incomplete("SignedHeaders must be lower-case header names joined by ';'.")
    for required in REQUIRED_SIGNED_HEADERS:
        if required not in names:
            raise _incomplete(f"The header {required} must be signed.")
    for name in names:
        if name not in req.headers:
            raise _incomplete(f"The signed header {name} is not in the request.")
        if name in req.repeated:
            raise _incomplete(f"The signed header {name} is given more than once; send it once.")
    token = req.headers.get("x-acs-security-token")
    if token is not None and "x-acs-security-token" not in names:
        # An unsigned token could be swapped by anyone on the path.
        raise _incomplete("The header x-acs-security-token must be signed.")

    timestamp = _check_time(req.headers["x-acs-date"].strip(), now, window)
    nonce = _check_nonce(req.headers["x-acs-signature-nonce"].strip())
    secret = _lookup(lookup_secret, key_id)

    content_sha = req.headers["x-acs-content-sha256"].strip().lower()
    body_sha = hashlib.sha256(req.body).hexdigest()
    if not hmac.compare_digest(_bytes(content_sha), body_sha.encode()):
        raise AuthError(
            "SignatureDoesNotMatch",
            f"Specified signature does not match our calculation. x-acs-content-sha256 is not the "
            f"SHA-256 of the body, server computed:{body_sha}",
        )

    canonical = acs3_canonical_request(req.method, req.path, req.query, req.headers, names, content_sha)
    string_to_sign = acs3_string_to_sign(canonical)
    expected = acs3_signature(secret, string_to_sign)
    if not hmac.compare_digest(expected.encode(), _bytes(signature.strip().lower())):
        raise AuthError("SignatureDoesNotMatch", MISMATCH_PREFIX + string_to_sign)
    return Credential(key_id, timestamp, nonce, ACS3_ALGORITHM, token)


def _verify_v1(
    req: SignedRequest,
    lookup_secret: Callable[[str], str | None],
    now: datetime,
    window: timedelta,
) -> Credential:
    params = [*req.query, *req.form]
    method = _single(params, "SignatureMethod")
    if method is None:
        raise MissingParameter("SignatureMethod")
    if method != V1_METHOD:
        raise AuthError("InvalidSignatureMethod", f"Specified signature method {method} is not supported.")
    key_id = _required(params, "AccessKeyId")
    timestamp = _check_time(_required(params, "Timestamp"), now, window)
    nonce = _check_nonce(_required(params, "SignatureNonce"))
    token = _single(params, "SecurityToken")
    # A hand-built URL may leave base64's '+' unescaped, which form decoding
    # turns into a space; base64 never contains spaces, so undo that.
    signature = (_single(params, "Signature") or "").replace(" ", "+")
    secret = _lookup(lookup_secret, key_id)

    string_to_sign = v1_string_to_sign(req.method, params)
    expected = v1_signature(secret, string_to_sign)
    if not hmac.compare_digest(expected.encode(), _bytes(signature)):
        # The legacy SDK splits this message on ':' and compares part [1]
        # with its own string-to-sign (WIRE.md §5.3). A V1 string-to-sign is
        # fully percent-encoded, so it never contains ':' itself.
        raise AuthError("SignatureDoesNotMatch", MISMATCH_PREFIX + string_to_sign)
    return Credential(key_id, timestamp, nonce, V1_METHOD, token)


def _bytes(client_value: str) -> bytes:
    # compare_digest refuses non-ASCII str; a hostile value must become a
    # mismatch, not a TypeError (a 500).
    return client_value.encode("utf-8", "surrogatepass")


def _single(params: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in params if k == name]
    if len(values) > 1:
        # Two different values of a security parameter make it unclear
        # which one was checked.
        raise InvalidParameter(name, "The parameter is given more than once.")
    return values[0] if values else None


def _required(params: list[tuple[str, str]], name: str) -> str:
    value = _single(params, name)
    if not value:
        raise MissingParameter(name)
    return value


def _check_time(value: str, now: datetime, window: timedelta) -> datetime:
    bad_format = AuthError("InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted.")
    if not _TIMESTAMP_RE.fullmatch(value):
        raise bad_format
    try:
        stamp = datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError:  # e.g. month 13: the shape matched but the date does not exist
        raise bad_format from None
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if abs(now - stamp) > window:
        raise AuthError("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")
    return stamp


def _check_nonce(nonce: str) -> str:
    if not nonce:
        raise MissingParameter("SignatureNonce")
    if len(nonce) > MAX_NONCE_LEN:
        raise InvalidParameter("SignatureNonce", f"It must be at most {MAX_NONCE_LEN} characters.")
    return nonce


def _lookup(lookup_secret: Callable[[str], str | None], key_id: str) -> str:
    secret = lookup_secret(key_id)
    if secret is None:
        raise AuthError("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
    return secret


def _incomplete(detail: str) -> AuthError:
    return AuthError("IncompleteSignature", f"The request signature does not conform to Aliyun standards. {detail}")
