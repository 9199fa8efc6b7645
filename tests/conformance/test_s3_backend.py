"""The backend contract on :class:`S3Backend` against a real S3 server (Ceph RGW), and what only S3 has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from opensmc.chunkstore.backend import LockBusy, ObjectExists
from opensmc.chunkstore.s3 import MULTIPART_THRESHOLD, S3Backend, S3Options, parse_s3_url
from tests.conformance.backend_contract import BackendContract


def _backend(server: Any, bucket: str, prefix: str = "store/p1", **kw: Any) -> S3Backend:
    return S3Backend(bucket, prefix, S3Options(endpoint=server.endpoint, region="us-east-1"), **kw)


class TestS3Backend(BackendContract):
    @pytest.fixture
    def backend(self, s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> S3Backend:
        return _backend(s3_server, s3_bucket)

    def child_source(self, backend: Any) -> str:
        return (
            "from opensmc.chunkstore.s3 import S3Backend, S3Options\n"
            f"backend = S3Backend({backend.bucket!r}, {backend.prefix!r}, "
            f"S3Options(endpoint={backend.client.meta.endpoint_url!r}, region='us-east-1'))"
        )


def test_prefixes_are_separate_stores(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    a = _backend(s3_server, s3_bucket, "one")
    b = _backend(s3_server, s3_bucket, "one-more")
    a.write("x", b"a")
    b.write("x", b"b")
    assert a.list("") == ["x"] and b.list("") == ["x"]
    assert a.read("x") == b"a"
    whole = _backend(s3_server, s3_bucket, "")
    assert whole.list("") == ["one-more/x", "one/x"]


def test_multipart_write_and_ranges(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    b = _backend(s3_server, s3_bucket)
    data = os.urandom(MULTIPART_THRESHOLD * 2 + 12345)  # a pack-sized object: three parts
    b.write("data/ab/pack", memoryview(data))
    assert b.size("data/ab/pack") == len(data)
    assert b.read("data/ab/pack") == data
    m = MULTIPART_THRESHOLD
    assert b.read("data/ab/pack", m - 3, 10) == data[m - 3 : m + 7]
    assert b.read("data/ab/pack", len(data)) == b""
    with pytest.raises(ValueError):
        b.read("data/ab/pack", len(data) - 2, 10)
    # and no unfinished upload is left behind
    assert b.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_failed_multipart_leaves_nothing(
    s3_server: Any, s3_bucket: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = _backend(s3_server, s3_bucket)
    real = b.client.complete_multipart_upload

    def fail(**kw: Any) -> Any:
        raise ConnectionError("the network went away")

    monkeypatch.setattr(b.client, "complete_multipart_upload", fail)
    with pytest.raises(ConnectionError):
        b.write("data/big", b"x" * (MULTIPART_THRESHOLD + 1))
    monkeypatch.setattr(b.client, "complete_multipart_upload", real)
    assert b.list("") == []
    assert b.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_server_honours_conditional_writes(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    b = _backend(s3_server, s3_bucket)
    b.write("config", b"1", exclusive=True)
    assert b._conditional is True  # Ceph RGW refuses If-None-Match: * on an existing key
    with pytest.raises(ObjectExists):
        b.write("config", b"2", exclusive=True)


def test_exclusive_fallback_when_the_header_is_ignored(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    b = _backend(s3_server, s3_bucket)
    b._conditional = False  # as after a probe on a server that ignores the header
    b.write("snapshots/a", b"1", exclusive=True)
    with pytest.raises(ObjectExists):
        b.write("snapshots/a", b"2", exclusive=True)
    assert b.read("snapshots/a") == b"1"


def test_racing_exclusive_writers_one_wins(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    src = (
        "from opensmc.chunkstore.s3 import S3Backend, S3Options\n"
        "from opensmc.chunkstore.backend import ObjectExists\nimport sys\n"
        f"b = S3Backend({s3_bucket!r}, 'store/p1', S3Options(endpoint={s3_server.endpoint!r}))\n"
        "b._conditional = True\nsys.stdin.readline()\n"
        "try:\n    b.write('config', sys.argv[1].encode(), exclusive=True)\n    print('won')\n"
        "except ObjectExists:\n    print('lost')\n"
    )
    kids = [
        subprocess.Popen([sys.executable, "-c", src, str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    outs = [k.communicate("go\n")[0].strip() for k in kids]
    assert sorted(outs) == ["lost", "lost", "lost", "won"]
    winner = outs.index("won")
    assert _backend(s3_server, s3_bucket).read("config") == str(winner).encode()


def test_lock_objects_are_refreshed_and_go_stale(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    b = _backend(s3_server, s3_bucket, refresh_every=0.2)
    held = b.lock("gc", exclusive=True)
    keys = [o["Key"] for o in b._list_keys(b.prefix + ".locks/gc/")]
    assert len(keys) == 1 and keys[0].rsplit("/", 1)[1].startswith("ex-")
    doc = json.loads(b.client.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read())
    assert doc["pid"] == os.getpid() and doc["exclusive"] is True
    first = b.client.head_object(Bucket=s3_bucket, Key=keys[0])["LastModified"]
    for _ in range(100):  # the refresher rewrites it (LastModified has a one-second grain)
        time.sleep(0.1)
        if b.client.head_object(Bucket=s3_bucket, Key=keys[0])["LastModified"] > first:
            break
    else:
        pytest.fail("the lock object was never refreshed")
    held.release()
    assert list(b._list_keys(b.prefix + ".locks/")) == []


def test_stale_lock_of_another_host_is_ignored(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    """A lock whose holder is on another host (not checkable) blocks until it is stale."""
    b = _backend(s3_server, s3_bucket, stale_after=2.0)
    key = f"{b.prefix}.locks/gc/ex-otherhost"
    body = {"host": "elsewhere", "boot_id": "other", "pid": 1, "start": "1", "exclusive": True}
    b.client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(body).encode())
    with pytest.raises(LockBusy, match="elsewhere"):
        b.lock("gc", exclusive=False, blocking=False)
    deadline = time.monotonic() + 30
    while True:  # polls the behaviour, not the clock: it must become free once the lock is stale
        try:
            b.lock("gc", exclusive=True, blocking=False).release()
            break
        except LockBusy:
            assert time.monotonic() < deadline, "a stale lock still blocks"
            time.sleep(0.5)
    assert list(b._list_keys(key)) == []  # and the stale one was removed


def test_blocking_lock_waits_for_release(s3_server: Any, s3_bucket: str, s3_env: dict[str, str]) -> None:
    b = _backend(s3_server, s3_bucket)
    src = (
        "from opensmc.chunkstore.s3 import S3Backend, S3Options\nimport sys\n"
        f"b = S3Backend({s3_bucket!r}, 'store/p1', S3Options(endpoint={s3_server.endpoint!r}))\n"
        "l = b.lock('gc', exclusive=True)\nprint('held', flush=True)\nsys.stdin.readline()\nl.release()\n"
        "print('released', flush=True)\nsys.stdin.readline()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(LockBusy):
            b.lock("gc", exclusive=False, blocking=False)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "released\n"
        b.lock("gc", exclusive=False).release()  # blocking: got once the child let go
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stdin.close()


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("s3:///x", "http://b/x", "s3://b/../x", "s3://b/.x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
