"""The receiver on a real loopback socket, fed by the real agent pipeline and uploader.

What the receiver holds is read back through the chunk store: a staging
index names the blob of every chunk, and the blobs are the bytes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from opensmc.agent.owncache import Recorder
from opensmc.agent.pipeline import replicate
from opensmc.agent.uploader import HttpSender, ReceiverError
from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex
from opensmc.receiver.http import make_app
from opensmc.receiver.stats import STATS
from opensmc.wire.frames import (
    CODEC_ZLIB,
    HASH_BLAKE2B,
    HASH_XXH3,
    digest,
    encode_frame,
    encode_zero_frame,
)

MiB = 1024 * 1024
CS = 16 * 1024
TOKEN = "job-token"


class Receiver:
    """make_app served by aiohttp on 127.0.0.1 from a thread with its own event loop."""

    def __init__(self, root: Path, store: Path, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.repo = Repository(LocalBackend(store))
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = make_app(self.root, self.repo, lambda token, vid: token == TOKEN and vid.startswith("v"))
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.started.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "volumes", tmp_path / "store")
    yield r
    r.stop()


def create(r: Receiver, vid: str, size: int) -> None:
    StagingIndex.create(r.root / f"{vid}.fidx", size, CS).close()


def held(r: Receiver, vid: str) -> bytes:
    """The disk as the receiver holds it durably: its staging index file, resolved through the store."""
    disk = StagingIndex.read_disk(r.root / f"{vid}.fidx")
    out = bytearray(disk.size)
    for i in disk.nonzero():
        out[i * CS : i * CS + disk.chunk_length(int(i))] = r.repo.get(bytes(disk.digests[i]))
    return bytes(out)


def make_image(path: Path, size: int, seed: int = 1) -> bytearray:
    rnd = random.Random(seed)
    data = bytearray(b"\0" * size)
    pos = 0
    while pos < size:
        n = rnd.randrange(64 * 1024, MiB)
        if rnd.random() < 0.4:
            data[pos : pos + n] = rnd.randbytes(min(n, size - pos))
        pos += n
    path.write_bytes(data)
    return data


def post(r: Receiver, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=30)
    h = {"Authorization": f"Bearer {TOKEN}", "X-OpenSMC-Protocol": "1"}
    h.update(headers or {})
    conn.request("POST" if body or path.endswith(("frames", "flush")) else "GET", path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def test_full_and_incremental_replication(receiver: Receiver, tmp_path: Path) -> None:
    size = 32 * MiB + 4096
    src = tmp_path / "disk.img"
    data = make_image(src, size)
    create(receiver, "v1", size)
    with HttpSender(receiver.url, "v1", TOKEN) as sender:
        assert sender.info().size == size
        cs, previous = sender.fetch_hashes()
        assert (cs, previous) == (CS, {})
        first = replicate(str(src), sender, previous=previous, level=1, chunk_size=cs)
        assert sender.flush() == len(first.hashes)
        assert held(receiver, "v1") == data
        assert sender.fetch_hashes()[1] == first.hashes

        rnd = random.Random(5)
        for _ in range(20):  # twenty 4 KiB writes anywhere, data or zeros
            at = rnd.randrange(size // 4096) * 4096
            data[at : at + 4096] = rnd.randbytes(4096)
        src.write_bytes(data)
        second = replicate(str(src), sender, previous=sender.fetch_hashes()[1], chunk_size=CS)
        changed = {i for i in second.hashes if first.hashes.get(i) != second.hashes[i]}
        assert second.chunks_sent == len(changed) <= 20
        blobs = receiver.repo.blob_count()
        sender.flush()
    assert held(receiver, "v1") == data
    # Only the changed chunks became new blobs; nothing else was stored twice.
    assert receiver.repo.blob_count() <= blobs + len(changed)
    assert receiver.repo.blob_count() <= len(first.hashes) + len(changed)


def test_a_standard_library_agent_full_then_incremental(receiver: Receiver, tmp_path: Path) -> None:
    """An agent without xxhash/zstandard: blake2b-128 frames, zlib, and no dedupe against xxh3 maps."""
    size = 8 * MiB
    src = tmp_path / "disk.img"
    data = make_image(src, size, seed=3)
    data[MiB : 2 * MiB] = b"compressible text " * (MiB // 18) + b"\0" * (MiB % 18)
    src.write_bytes(data)
    create(receiver, "vb", size)
    with HttpSender(receiver.url, "vb", TOKEN) as sender:
        first = replicate(str(src), sender, chunk_size=CS, level=3, hash_id=HASH_BLAKE2B, codec=CODEC_ZLIB)
        assert first.hash_id == HASH_BLAKE2B and first.bytes_wire < first.bytes_plain  # zlib took the text
        sender.flush()
        assert held(receiver, "vb") == data
        # The receiver's map is the chunk store's xxh3-128 whatever the frames' hash was.
        _cs, previous = sender.fetch_hashes()
        assert previous.hash_id == HASH_XXH3
        assert dict(previous) == {i: digest(bytes(data[i * CS : (i + 1) * CS])) for i in first.hashes}
        data[0:CS] = bytes(CS)  # one chunk zeroed, one changed: both must reach the receiver
        data[5 * CS : 5 * CS + 10] = b"changed!!!"
        src.write_bytes(data)
        # blake2b digests cannot be compared with xxh3: every non-zero chunk goes again, never a wrong skip
        second = replicate(str(src), sender, previous=previous, chunk_size=CS, hash_id=HASH_BLAKE2B)
        assert second.chunks_sent == len(second.hashes) and second.chunks_zeroed == (0 in previous)
        # the same map with xxh3 (an accelerated agent) skips what is unchanged
        third = replicate(str(src), sender, previous=sender.fetch_hashes()[1], chunk_size=CS, hash_id=HASH_XXH3)
        assert third.chunks_sent == 0 and third.chunks_zeroed == 0
        sender.flush()
    assert held(receiver, "vb") == data


def test_a_standard_library_agent_remembers_its_hashes_for_incremental_runs(
    receiver: Receiver, tmp_path: Path
) -> None:
    """agent/owncache.py: blake2b digests paired with the receiver's xxh3 map prove chunks unchanged."""
    size = 4 * MiB
    src = tmp_path / "disk.img"
    data = make_image(src, size, seed=8)
    data[0:CS] = os.urandom(CS)
    src.write_bytes(data)
    create(receiver, "vc", size)
    cache = str(tmp_path / "hashes")

    def run(sender: HttpSender, keep: bool = True) -> Any:
        recorder = Recorder(cache, "vc", CS, HASH_BLAKE2B)
        _cs, current = sender.fetch_hashes()
        result = replicate(
            str(src), sender, previous=recorder.previous(current), chunk_size=CS, hash_id=HASH_BLAKE2B,
            on_hash=recorder.record, keep_hashes=False,
        )  # fmt: skip
        sender.flush()
        if keep:
            recorder.keep(sender.fetch_hashes()[1])
        else:
            recorder.discard()
        return result

    with HttpSender(receiver.url, "vc", TOKEN) as sender:
        first = run(sender)
        nonzero = {i for i in range(size // CS) if any(data[i * CS : (i + 1) * CS])}
        assert first.chunks_sent == len(nonzero)
        assert run(sender).chunks_sent == 0  # nothing changed: nothing sent
        data[0:CS] = bytes(CS)
        data[3 * CS : 3 * CS + 5] = b"12345"
        src.write_bytes(data)
        second = run(sender, keep=False)  # an attempt that never completes keeps the last pair
        assert (second.chunks_sent, second.chunks_zeroed) == (1, 1)
        assert run(sender).chunks_sent == 1  # chunk 3 again: the pair was not updated
        # The receiver's chunk 5 changes behind the agent's back: its digest is no longer the
        # remembered one, so the agent sends it again although the source did not change.
        sender.send_batch([encode_frame(5 * CS, os.urandom(CS))])
        sender.flush()
        third = run(sender)
        assert third.chunks_sent == 1
    assert held(receiver, "vc") == data


def test_bad_frames_write_nothing_from_the_bad_one_on(receiver: Receiver) -> None:
    create(receiver, "v2", 4 * MiB)
    _f, plain_before, _w, rejected_before = STATS.snapshot()
    good0, good1 = encode_frame(0, os.urandom(CS)), encode_frame(CS, os.urandom(CS))
    after = encode_frame(3 * CS, os.urandom(CS))
    bad = bytearray(encode_frame(2 * CS, os.urandom(CS)))
    bad[-1] ^= 1
    status, body = post(receiver, "/v1/volumes/v2/frames", good0 + good1 + bytes(bad) + after)
    assert status == 400 and body["code"] == "InvalidFrame.HashMismatch" and body["accepted"] == 2
    wrong_version = bytearray(after)
    wrong_version[4] = 3
    cases = [
        (bytes(wrong_version), "InvalidFrame.UnsupportedVersion"),
        (encode_frame(4 * MiB - CS, os.urandom(2 * CS)), "Frame.OutOfRange"),
        (encode_frame(100, os.urandom(CS)), "Frame.Misaligned"),
        (encode_zero_frame(4 * MiB, CS), "Frame.OutOfRange"),
        (after[:-100], "InvalidFrame.Truncated"),
        (b"JUNK" + after[4:], "InvalidFrame.BadMagic"),
    ]
    for frame, code in cases:
        status, body = post(receiver, "/v1/volumes/v2/frames", frame)
        assert (status, body["code"]) == (400, code), body
        assert "version 3" in body["message"] or code != "InvalidFrame.UnsupportedVersion"
    # Replays are harmless.
    for _ in range(2):
        assert post(receiver, "/v1/volumes/v2/frames", good0 + good1)[1] == {"frames": 2, "bytes": 2 * CS}
    post(receiver, "/v1/volumes/v2/flush")
    disk = held(receiver, "v2")
    assert disk[: 2 * CS] == good0[40:] + good1[40:]
    assert disk[2 * CS :] == b"\0" * (4 * MiB - 2 * CS)
    status, body = post(receiver, "/v1/volumes/v2/hashes", headers={"Accept": "application/json"})
    assert status == 200 and sorted(body["hashes"]) == ["0", "1"]
    # /metrics counts what was taken in and what was refused, by reason
    _f, plain_after, _w, rejected_after = STATS.snapshot()
    assert plain_after - plain_before == 6 * CS  # 2 good frames, then 2 replays of 2
    for _frame, code in cases:
        assert rejected_after.get(code, 0) > rejected_before.get(code, 0), code


def test_auth_protocol_and_unknown_volume(receiver: Receiver) -> None:
    create(receiver, "v3", MiB)
    assert post(receiver, "/v1/volumes/v3/flush", headers={"Authorization": ""})[0] == 401
    assert post(receiver, "/v1/volumes/v3/flush", headers={"Authorization": "Bearer nope"})[0] == 403
    status, body = post(receiver, "/v1/volumes/v3/flush", headers={"X-OpenSMC-Protocol": "2"})
    assert (status, body["code"]) == (400, "Protocol.Unsupported")
    assert post(receiver, "/v1/volumes/v404/flush")[0] == 404
    with HttpSender(receiver.url, "v3", "nope") as s, pytest.raises(ReceiverError) as e:
        s.fetch_hashes()
    assert e.value.code == "Auth.Denied"


AGENT = """
import sys
from opensmc.agent.pipeline import replicate, RateLimitedSender
from opensmc.agent.uploader import HttpSender
url, src = sys.argv[1], sys.argv[2]
with HttpSender(url, "v4", "job-token") as s:
    _, prev = s.fetch_hashes()
    replicate(
        src, RateLimitedSender(s, 40), previous=prev, batch_bytes=256 * 1024, max_frame=256 * 1024,
        chunk_size=16384,
    )
"""


def test_resume_after_killing_the_agent(receiver: Receiver, tmp_path: Path) -> None:
    size = 24 * MiB
    src = tmp_path / "disk.img"
    data = bytearray(os.urandom(size))  # all data: the run is long enough to kill midway
    src.write_bytes(data)
    create(receiver, "v4", size)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    agent = subprocess.Popen([sys.executable, "-c", AGENT, receiver.url, str(src)], env=env)
    sender = HttpSender(receiver.url, "v4", TOKEN)
    try:
        deadline = time.monotonic() + 30
        while len(sender.fetch_hashes()[1]) < 160 and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        have = sender.fetch_hashes()[1]
        total = size // CS
        assert 160 <= len(have) < total
        resumed = replicate(str(src), sender, previous=have, chunk_size=CS)
        # Everything the receiver held was skipped; only what had not landed was sent.
        assert resumed.chunks_sent == total - len(have)
        sender.flush()
    finally:
        agent.kill()
        sender.close()
    assert held(receiver, "v4") == data


def test_a_killed_receiver_leaves_only_durable_blobs_named(tmp_path: Path) -> None:
    """kill -9 of a receiver process mid-run: every chunk its staging index names is a blob that reads back."""
    store, index = tmp_path / "store", tmp_path / "v.fidx"
    size = 64 * MiB
    StagingIndex.create(index, size, CS).close()
    script = f"""
import os, sys
from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository
from opensmc.chunkstore.staging import StagingIndex
repo = Repository(LocalBackend({str(store)!r}), pack_size=1024 * 1024)
idx = StagingIndex.open({str(index)!r})
for k in range({size} // (256 * 1024)):
    idx.write(repo, k * 256 * 1024, os.urandom(256 * 1024))
    if k == 40:
        print("going", flush=True)
os.kill(os.getpid(), 9)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "going" in proc.stdout, proc.stderr
    disk = StagingIndex.read_disk(index)
    named = disk.nonzero()
    assert 0 < len(named) < size // CS  # some landed, not all (the open pack and the queue died)
    repo = Repository(LocalBackend(store))
    for i in named:
        assert len(repo.get(bytes(disk.digests[i]))) == CS  # re-hashed on read: a real, whole blob
