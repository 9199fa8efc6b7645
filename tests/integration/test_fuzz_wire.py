"""Fuzzing every route of both ports with malformed requests: never a 5xx, never a traceback.

Five generators, one raw HTTP/1.1 request per example over a real socket (so
that repeated headers, odd bytes and broken bodies reach the server as sent):

* the SMC endpoint ``/``: junk query and form parameters, forged, partial and
  repeated signature headers, random bodies and content types;
* the agent API ``/agent/v1/*``: random JSON (NaN, deep nesting, surrogates,
  wrong types), random bytes, junk and real bearer tokens;
* the image routes ``/opensmc/v1/images…``: junk paths and queries, fake
  signatures, and real ACS3 signatures over junk paths;
* the receiver ``/v1/volumes/…``: valid, mutated, truncated and bomb frames,
  junk protocol and auth headers, against a real staging volume.
* the console and operations routes (``/opensmc/v1/console/…``, ``/metrics``,
  ``/healthz``, ``/readyz``, ``/console…``, ``/ui``) and paths no route has:
  junk methods, paths, headers and bodies, fake and real signatures.

Every answer must be below 500 (a request the server cannot parse may get no
answer at all), and nothing may be logged with a traceback or at ERROR level.

Profiles: ``OPENSMC_FUZZ_WIRE_EXAMPLES`` examples per generator and database
(default 40, the CI profile). The large run, 5 x 20,000 = 100,000 requests::

    OPENSMC_FUZZ_WIRE_EXAMPLES=20000 .venv/bin/python -m pytest tests/integration/test_fuzz_wire.py -k sqlite -q -s

(about half an hour on a shared 2-core machine; ``-s`` shows the count of
requests sent; docs/security.md has the last result). A
large profile lifts the suite's per-test timeout, which only guards CI.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from opensmc import API_VERSION
from opensmc.api import agent_routes
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.chunkstore.staging import StagingIndex
from opensmc.images.store import repository_at
from opensmc.receiver.serve import ReceiverThread
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.agents import register_source
from opensmc.service.context import Services
from opensmc.signer import sign_acs3
from opensmc.wire import frames as f
from tests.fake_agent import agent_report
from tests.live_server import running

EXAMPLES = int(os.environ.get("OPENSMC_FUZZ_WIRE_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="OPENSMC_FUZZ_WIRE_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    # No shrinking: a raw request is already small, and shrinking one that hit a server
    # fault can take many minutes; the failing example is printed as found.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
# The CI timeout guards against a hang; a large profile legitimately runs longer.
pytestmark = pytest.mark.timeout(0 if EXAMPLES > 1000 else 300)
SENT = [0]  #: requests sent by this module, reported at its end
TOKEN = "fuzz-data-token"
VOLUME = "v-fuzz"
VOLUME_SIZE = 1 << 20


class Problems(logging.Handler):
    """Collects records that mean a server fault: a traceback, or ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock = threading.RLock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            with self.lock:
                self.records.append(record)

    def take(self) -> list[str]:
        with self.lock:
            records, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()}\n{self.format(r) if r.exc_info else ''}" for r in records]


@dataclass
class Env:
    api_port: int
    receiver_port: int
    key: KeyPair
    agent_token: str
    source_id: str
    problems: Problems


@pytest.fixture
def env(services: Services, tmp_path: Path) -> Iterator[Env]:
    key = create_account(services, "fuzz")
    report = agent_report("fuzz-1", 20, ())
    reg = register_source(services, key.account_id, report, machine_id=report["machine_id"])
    (tmp_path / "volumes").mkdir(parents=True, exist_ok=True)
    StagingIndex.create(tmp_path / "volumes" / f"{VOLUME}.fidx", VOLUME_SIZE, 16384).close()
    problems = Problems()
    root = logging.getLogger()
    root.addHandler(problems)
    old_level = root.level
    root.setLevel(logging.INFO)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        receiver_port = s.getsockname()[1]
    receiver = ReceiverThread(
        tmp_path / "volumes",
        repository_at(tmp_path / "store"),
        lambda t, v: t == TOKEN and v == VOLUME,
        "127.0.0.1",
        receiver_port,
    )
    receiver.start()
    try:
        with running(create_app(services, [*agent_routes.routes, *image_routes])) as endpoint:
            yield Env(int(endpoint.split(":")[1]), receiver_port, key, reg.agent_token, reg.source_id, problems)
    finally:
        receiver.stop()
        root.removeHandler(problems)
        root.setLevel(old_level)


@pytest.fixture(scope="module", autouse=True)
def _report_count() -> Iterator[None]:
    yield
    print(f"\nwire fuzz: {SENT[0]} requests sent")


def raw_request(port: int, method: str, target: str, headers: list[tuple[str, bytes]], body: bytes) -> int | None:
    """Send one request as given; the answer's status, or None when the server closed without one."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode("latin-1")
    for name, value in headers:
        head += name.encode("latin-1") + b": " + value + b"\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    SENT[0] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early (e.g. a body cap); the answer, if any, is still readable
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def check(env: Env, status: int | None, what: Any) -> None:
    assert status is None or status < 500, (status, what)
    faults = env.problems.take()
    assert not faults, (what, faults)


# -- shared strategies ------------------------------------------------------------------------------------

SAFE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
HEADER_VALUE = st.one_of(
    SAFE_TEXT.map(lambda s: s.encode("latin-1")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [
            b"ACS3-HMAC-SHA256 Credential=LTAIfake,SignedHeaders=host;x-acs-action,Signature=00",
            b"ACS3-HMAC-SHA256 Credential=,SignedHeaders=,Signature=",
            b"ACS3-HMAC-SHA256 Credential=a,Credential=b",
            b"ACS3-HMAC-SHA1 x",
            b"Bearer ",
            b"Bearer s-x.y",
            b"Bearer " + b"a" * 9000,
            b"application/x-www-form-urlencoded",
            b"application/json",
            b"2019-06-01",
            b"2026-12-01T00:00:00Z",
            b"DeleteReplicationJob",
            b"1",
            b"2",
            b"",
        ]
    ),
)
HEADER_NAME = st.one_of(
    st.sampled_from(
        [
            "authorization",
            "x-acs-action",
            "x-acs-version",
            "x-acs-date",
            "x-acs-signature-nonce",
            "x-acs-content-sha256",
            "x-acs-security-token",
            "content-type",
            "X-OpenSMC-Protocol",
            "accept",
            "x-forwarded-proto",
        ]
    ),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z"),
).filter(lambda n: n.lower() not in ("content-length", "transfer-encoding", "host", "connection", "expect"))
HEADERS = st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=8)

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=30)
)
JSON = st.recursive(
    JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12
)
JUNK_BODIES = st.sampled_from(
    [
        b"[" * 2000 + b"]" * 2000,
        b'{"a":' * 500 + b"1" + b"}" * 500,
        b'{"machine_id": "m", "x": NaN}',
        b'{"x": "\\ud800"}',
        b'{"x": 1e999}',
        b"\xff\xfe\x00",
        b'{"report": {"disks": [{"index": 0, "size_bytes": -1, "parts": [{"size_bytes": 1e400}]}]}}',
        b"Action=DeleteAccessToken&Version=2019-06-01",
        b"",
    ]
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


BODIES = st.one_of(st.binary(max_size=600), JSON.map(_json_bytes), JUNK_BODIES)


# -- the SMC endpoint ----------------------------------------------------------------------------------------

PARAM_KEYS = st.sampled_from(
    "Action Version Signature SignatureMethod SignatureNonce SignatureVersion AccessKeyId Timestamp Format "
    "SecurityToken JobId SourceId Name Tag.1.Key ReplicationParameters".split()
) | st.text(max_size=12)
PARAM_VALUES = st.sampled_from(
    [
        *"DescribeSourceServers DeleteReplicationJob 2019-06-01 HMAC-SHA1 HMAC-SHA256 XML JSON".split(),
        *["2026-12-01T00:00:00Z", "1", "", "x" * 300, '{"bandwidth_limit": NaN}'],
    ]
) | st.text(max_size=40)
PARAMS = st.lists(st.tuples(PARAM_KEYS, PARAM_VALUES), max_size=10)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    query=PARAMS,
    form=PARAMS,
    headers=HEADERS,
    body=st.one_of(BODIES, st.none()),
)
def test_rpc_endpoint(
    env: Env, method: str, query: list[tuple[str, str]], form: list[tuple[str, str]], headers: Any, body: Any
) -> None:
    target = "/?" + urlencode(query, quote_via=quote, encoding="utf-8", errors="surrogatepass")
    if body is None:  # a form body
        body = urlencode(form, quote_via=quote, encoding="utf-8", errors="surrogatepass").encode()
        headers = [*headers, ("content-type", b"application/x-www-form-urlencoded")]
    check(env, raw_request(env.api_port, method, target, headers, body), (method, target, headers, body[:200]))


# -- the agent API ------------------------------------------------------------------------------------------


@st.composite
def agent_bodies(draw: st.DrawFn) -> bytes:
    shape = draw(st.integers(0, 2))
    if shape == 0:
        return draw(BODIES)
    # Plausible shapes with junk inside: registration and task calls.
    report = agent_report("fz", 20, ())
    doc: dict[str, Any] = {"machine_id": draw(st.text(max_size=20) | st.just("m-fuzz")), "report": report}
    for key in draw(st.lists(st.sampled_from(["token_id", "token_code", "access_key_id", "access_key_secret",
                                              "instance_id", "agent_token", "agent_version", "job_id", "run_id",
                                              "disks", "bytes_sent", "error", "ok"]), max_size=5)):  # fmt: skip
        doc[key] = draw(JSON)
    if draw(st.booleans()):
        target = draw(st.sampled_from(["hostname", "disks", "system_info", "kernel_level", "architecture"]))
        report[target] = draw(JSON)
    return _json_bytes(doc)


@FUZZ
@given(
    path=st.sampled_from(["register", "heartbeat", "tasks/progress", "tasks/result", "info", "nope"]),
    method=st.sampled_from(["POST", "POST", "GET"]),
    auth=st.sampled_from(["none", "real", "junk"]),
    headers=HEADERS,
    body=agent_bodies(),
)
def test_agent_api(env: Env, path: str, method: str, auth: str, headers: Any, body: bytes) -> None:
    if auth == "real":
        headers = [("authorization", f"Bearer {env.agent_token}".encode()),
                   *[h for h in headers if h[0].lower() != "authorization"]]  # fmt: skip
    elif auth == "junk":
        headers = [("authorization", f"Bearer {env.source_id}.junk".encode()), *headers]
    headers = [*headers, ("content-type", b"application/json")]
    status = raw_request(env.api_port, method, f"/agent/v1/{path}", headers, body)
    check(env, status, (path, headers, body[:300]))


# -- the image routes ---------------------------------------------------------------------------------------

SEGMENT = st.one_of(
    st.sampled_from(["m-x", "m-" + "a" * 300, "..", "%2e%2e", "%00", "disks", "0", "-1", "99999999999999999999"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E).filter(lambda c: c not in "?#/%"), max_size=20),
)


@FUZZ
@given(
    parts=st.lists(SEGMENT, max_size=4),
    query=PARAMS,
    signed=st.booleans(),
    headers=HEADERS,
    body=st.one_of(st.just(b""), BODIES),
)
def test_image_routes(env: Env, parts: list[str], query: Any, signed: bool, headers: Any, body: bytes) -> None:
    path = "/opensmc/v1/images" + "".join("/" + quote(p, safe="") for p in parts if p)
    pairs = [(k, v) for k, v in query if k and "\x00" not in k]
    if signed:
        # A real signature over a junk path: the handler behind the check sees the junk.
        params = {k: v for k, v in pairs}
        qs, signed_headers = sign_acs3("GET", f"127.0.0.1:{env.api_port}", "DownloadImage", API_VERSION, params,
                                       env.key.access_key_id, env.key.access_key_secret, path=path)  # fmt: skip
        target = f"{path}?{qs}"
        names = {n for n in signed_headers} | {"host"}
        headers = [(n, v.encode()) for n, v in signed_headers.items() if n != "host"] + [
            h for h in headers if h[0].lower() not in names
        ]
        body = b""  # the signature covers an empty body
    else:
        target = path + ("?" + urlencode(pairs, quote_via=quote, errors="surrogatepass") if pairs else "")
    status = raw_request(env.api_port, "GET", target, headers, body)
    check(env, status, (target, headers, body[:200]))


# -- the receiver -------------------------------------------------------------------------------------------


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    offset = draw(st.sampled_from([0, 65536, VOLUME_SIZE - 65536, VOLUME_SIZE, 1, 2**63 - 1]))
    if kind == 0:  # a valid frame (maybe out of the volume's range)
        data = draw(st.binary(min_size=1, max_size=2048)) * draw(st.sampled_from([1, 32]))
        hash_id = draw(st.sampled_from([f.HASH_XXH3, f.HASH_BLAKE2B]))  # version 1 or 2 frames
        codec = draw(st.sampled_from([f.CODEC_ZSTD, f.CODEC_ZLIB]))
        return f.encode_frame(offset, data, draw(st.sampled_from([0, 1, 3])), hash_id=hash_id, codec=codec)
    if kind == 1:
        return f.encode_zero_frame(offset, draw(st.sampled_from([1, 65536, 2**32 - 1])))
    if kind == 2:  # a valid frame with bytes overwritten
        raw = bytearray(f.encode_frame(offset, bytes(65536), 1))
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == 3:  # a truncated frame
        raw = f.encode_frame(offset, os.urandom(256), 0)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == 4:  # zstd whose declared size disagrees with the header (a small bomb)
        declared = draw(st.sampled_from([1, 65535, 65537, 1 << 24]))
        payload = zstandard.ZstdCompressor(level=1).compress(bytes(declared)) if declared < (1 << 20) else (
            zstandard.ZstdCompressor(level=1).compress(bytes(1 << 20))
        )  # fmt: skip
        header = struct.pack(f._HEADER_V1.format, f.MAGIC, 1, f.CODEC_ZSTD, 0, offset & (2**63 - 1),
                             65536, len(payload), f.digest(bytes(65536)))  # fmt: skip
        return header + payload
    # a random header
    fields = draw(st.tuples(st.sampled_from([f.MAGIC, b"OSMX"]), st.integers(0, 3), st.integers(0, 3),
                            st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                            st.integers(0, 4096), st.binary(min_size=16, max_size=16)))  # fmt: skip
    payload_len = fields[6]
    return struct.pack(f._HEADER_V1.format, *fields) + os.urandom(min(payload_len, draw(st.integers(0, 4096))))


@FUZZ
@given(
    vid=st.sampled_from([VOLUME, VOLUME, "v-none", "..", "a" * 200, "%00", "v/x"]),
    route=st.sampled_from(["frames", "frames", "frames", "flush", "hashes", ""]),
    method=st.sampled_from(["POST", "POST", "GET", "PUT"]),
    protocol=st.sampled_from([b"1", b"1", b"2", None]),
    auth=st.sampled_from([b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode(), b"Bearer x", b"Basic y", None]),
    frames=st.lists(frame_bytes(), max_size=4),
    headers=HEADERS,
)
def test_receiver(
    env: Env, vid: str, route: str, method: str, protocol: Any, auth: Any, frames: list[bytes], headers: Any
) -> None:
    target = f"/v1/volumes/{quote(vid, safe='/')}" + (f"/{route}" if route else "")
    sent = [h for h in headers if h[0].lower() not in ("authorization", "x-opensmc-protocol")]
    if protocol is not None:
        sent.append(("X-OpenSMC-Protocol", protocol))
    if auth is not None:
        sent.append(("Authorization", auth))
    status = raw_request(env.receiver_port, method, target, sent, b"".join(frames))
    check(env, status, (target, sent, [fr[:48] for fr in frames]))


# -- the console and operations routes, and paths no route has ---------------------------------------------

CONSOLE = {
    "/opensmc/v1/console/progress": "DescribeJobProgress",
    "/opensmc/v1/console/heartbeats": "DescribeSourceHeartbeats",
    "/opensmc/v1/console/jobs/": "DescribeJobHistory",
}
OPS_PATHS = st.sampled_from(
    [
        "/metrics", "/healthz", "/readyz", "/console", "/console/", "/console/index.html", "/console/app.js",
        "/console/..%2f..%2fetc%2fpasswd", "/console/%00", "/ui", "/opensmc/v1", "/opensmc/v1/console",
        "/opensmc/v1/console/progress", "/opensmc/v1/console/heartbeats", "/opensmc/v1/console/jobs/",
        "/agent", "/agent/v1", "/v1/volumes/x", "//", "/%ff", "/" + "a" * 3000,
    ]
)  # fmt: skip


@FUZZ
@given(
    path=OPS_PATHS,
    suffix=st.one_of(st.just(""), SEGMENT.map(lambda p: quote(p, safe=""))),
    method=st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    query=PARAMS,
    signed=st.booleans(),
    headers=HEADERS,
    body=st.one_of(st.just(b""), BODIES),
)
def test_console_and_ops_routes(
    env: Env, path: str, suffix: str, method: str, query: Any, signed: bool, headers: Any, body: bytes
) -> None:
    path = path + suffix if path.endswith("/") else path
    pairs = [(k, v) for k, v in query if k and "\x00" not in k]
    action = next((a for prefix, a in CONSOLE.items() if path.startswith(prefix)), "")
    if signed and action:
        params = {k: v for k, v in pairs}
        qs, signed_headers = sign_acs3("GET", f"127.0.0.1:{env.api_port}", action, API_VERSION, params,
                                       env.key.access_key_id, env.key.access_key_secret, path=path)  # fmt: skip
        target = f"{path}?{qs}"
        names = {n for n in signed_headers} | {"host"}
        headers = [(n, v.encode()) for n, v in signed_headers.items() if n != "host"] + [
            h for h in headers if h[0].lower() not in names
        ]
        method, body = "GET", b""
    else:
        target = path + ("?" + urlencode(pairs, quote_via=quote, errors="surrogatepass") if pairs else "")
    status = raw_request(env.api_port, method, target, headers, body)
    check(env, status, (method, target, headers, body[:200]))
