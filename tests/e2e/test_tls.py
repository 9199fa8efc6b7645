"""TLS on every listener: the API, the agent API and the receiver, with a self-signed CA."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from opensmc.images.store import ImageStore
from tests.e2e.conftest import OPENSMC, clean_env, free_port, stop

pytestmark = pytest.mark.e2e


def make_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opensmc test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def call(creds: Path, ca: Path | None, action: str, *params: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(**({"OPENSMC_CA_CERT": str(ca)} if ca else {}))
    return subprocess.run(
        [*OPENSMC, "call", action, *params, "--credentials", str(creds)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def call_json(creds: Path, ca: Path, action: str, *params: str) -> dict[str, Any]:
    result = call(creds, ca, action, *params)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_migration_over_tls(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(cafile=str(cert))
    port, rport = free_port(), free_port()
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [
            *OPENSMC,
            "server",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
            "--receiver-listen",
            f"127.0.0.1:{rport}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--heartbeat-rate",
            "1",
            "--orchestrator-interval",
            "0.5",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        endpoint = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint + "/agent/v1/info", verify=ctx, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        creds = data / "admin-credentials.json"
        assert json.loads(creds.read_text())["endpoint"] == endpoint
        # Without trusting the CA, the client refuses the certificate.
        refused = call(creds, None, "ListAccessTokens")
        assert refused.returncode == 3 and "cannot reach" in refused.stderr  # exit 3: server unreachable
        token = call_json(creds, cert, "CreateAccessToken", "--Name", "tls")

        disk = tmp_path / "disk.img"
        with disk.open("wb") as f:
            f.truncate(16 << 20)
            f.seek(3 << 20)
            f.write(os.urandom(2 << 20))
        agent = subprocess.Popen(
            [
                *OPENSMC,
                "agent",
                "run",
                "--server",
                endpoint,
                "--token-id",
                token["AccessTokenId"],
                "--token-code",
                token["AccessTokenCode"],
                "--disk",
                str(disk),
                "--state-dir",
                str(tmp_path / "agent"),
                "--ca-cert",
                str(cert),
            ],
            stdout=(tmp_path / "agent.log").open("w"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        deadline = time.monotonic() + 30
        while True:
            found = call_json(creds, cert, "DescribeSourceServers")["SourceServers"]["SourceServer"]
            if found and found[0]["State"] == "Available":
                break
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.3)
        job = call_json(creds, cert, "CreateReplicationJob", "--RegionId", "local", "--SourceId", found[0]["SourceId"])[
            "JobId"
        ]
        call_json(creds, cert, "StartReplicationJob", "--JobId", job)
        deadline = time.monotonic() + 60
        while True:
            j = call_json(creds, cert, "DescribeReplicationJobs", "--JobId.1", job)["ReplicationJobs"][
                "ReplicationJob"
            ][0]
            if j["Status"] == "Finished":
                break
            assert j["Status"] == "Running" and time.monotonic() < deadline, (j, (tmp_path / "agent.log").read_text())
            time.sleep(0.3)
        out = tmp_path / "out.img"
        ImageStore(data / "store").export(j["ImageId"], 0, "raw", out)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(disk.read_bytes()).digest()
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        stop(server)  # type: ignore[arg-type]
