"""The receiver on a real loopback socket, fed by the real agent pipeline and uploader."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from opensmc.agent.pipeline import replicate
from opensmc.agent.uploader import HttpSender, ReceiverError
from opensmc.receiver.http import make_app
from opensmc.receiver.volume import StagingVolume
from opensmc.wire.frames import decode_frame, encode_frame, encode_zero_frame

MiB = 1024 * 1024
CS = 64 * 1024
TOKEN = "job-token"


class Receiver:
    """make_app served by aiohttp on 127.0.0.1 from a thread with its own event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = make_app(self.root, lambda token, vid: token == TOKEN and vid.startswith("v"))
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.started.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "volumes")
    yield r
    r.stop()


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
    StagingVolume.create(receiver.root / "v1", size).close()
    with HttpSender(receiver.url, "v1", TOKEN) as sender:
        assert sender.info().size == size
        cs, previous = sender.fetch_hashes()
        assert (cs, previous) == (CS, {})
        first = replicate(str(src), sender, previous=previous, level=1)
        assert sender.flush() == len(first.hashes)
        assert (receiver.root / "v1" / "data.img").read_bytes() == data
        assert sender.fetch_hashes()[1] == first.hashes

        rnd = random.Random(5)
        for _ in range(20):  # twenty 4 KiB writes anywhere, data or zeros
            at = rnd.randrange(size // 4096) * 4096
            data[at : at + 4096] = rnd.randbytes(4096)
        src.write_bytes(data)
        second = replicate(str(src), sender, previous=sender.fetch_hashes()[1])
        changed = {i for i in second.hashes if first.hashes.get(i) != second.hashes[i]}
        assert second.chunks_sent == len(changed) <= 20
        sender.flush()
    assert (receiver.root / "v1" / "data.img").read_bytes() == data
    # Holes stay holes: the staging file uses about as much space as the data.
    used = (receiver.root / "v1" / "data.img").stat().st_blocks * 512
    assert used <= len(second.hashes) * CS + MiB


def test_bad_frames_write_nothing_from_the_bad_one_on(receiver: Receiver) -> None:
    StagingVolume.create(receiver.root / "v2", 4 * MiB).close()
    good0, good1 = encode_frame(0, os.urandom(CS)), encode_frame(CS, os.urandom(CS))
    after = encode_frame(3 * CS, os.urandom(CS))
    bad = bytearray(encode_frame(2 * CS, os.urandom(CS)))
    bad[-1] ^= 1
    status, body = post(receiver, "/v1/volumes/v2/frames", good0 + good1 + bytes(bad) + after)
    assert status == 400 and body["code"] == "InvalidFrame.HashMismatch" and body["accepted"] == 2
    wrong_version = bytearray(after)
    wrong_version[4] = 2
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
        assert "version 2" in body["message"] or code != "InvalidFrame.UnsupportedVersion"
    # Replays are harmless.
    for _ in range(2):
        assert post(receiver, "/v1/volumes/v2/frames", good0 + good1)[1] == {"frames": 2, "bytes": 2 * CS}
    post(receiver, "/v1/volumes/v2/flush")
    disk = (receiver.root / "v2" / "data.img").read_bytes()
    assert disk[: 2 * CS] == good0[40:] + good1[40:]
    assert disk[2 * CS :] == b"\0" * (4 * MiB - 2 * CS)
    status, body = post(receiver, "/v1/volumes/v2/hashes", headers={"Accept": "application/json"})
    assert status == 200 and sorted(body["hashes"]) == ["0", "1"]


def test_auth_protocol_and_unknown_volume(receiver: Receiver) -> None:
    StagingVolume.create(receiver.root / "v3", MiB).close()
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
    replicate(src, RateLimitedSender(s, 40), previous=prev, batch_bytes=256 * 1024, max_frame=256 * 1024)
"""


def test_resume_after_killing_the_agent(receiver: Receiver, tmp_path: Path) -> None:
    size = 24 * MiB
    src = tmp_path / "disk.img"
    data = bytearray(os.urandom(size))  # all data: the run is long enough to kill midway
    src.write_bytes(data)
    StagingVolume.create(receiver.root / "v4", size).close()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    agent = subprocess.Popen([sys.executable, "-c", AGENT, receiver.url, str(src)], env=env)
    sender = HttpSender(receiver.url, "v4", TOKEN)
    try:
        deadline = time.monotonic() + 30
        while len(sender.fetch_hashes()[1]) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        held = sender.fetch_hashes()[1]
        total = size // CS
        assert 40 <= len(held) < total
        resumed = replicate(str(src), sender, previous=held)
        # Everything the receiver held was skipped; only what had not landed was sent.
        assert resumed.chunks_sent == total - len(held)
        sender.flush()
    finally:
        agent.kill()
        sender.close()
    assert (receiver.root / "v4" / "data.img").read_bytes() == data


def test_volume_recovers_its_map_after_a_crash(tmp_path: Path) -> None:
    vol = StagingVolume.create(tmp_path / "v", 2 * MiB)
    a, b = os.urandom(CS), os.urandom(CS)
    vol.apply(decode_frame(encode_frame(0, a)))
    vol.flush()
    vol.apply(decode_frame(encode_frame(CS, b)))  # after the checkpoint: not in the on-disk map
    vol.apply(decode_frame(encode_zero_frame(0, CS)))  # punches what the checkpoint still claims
    vol.close()  # as if killed: no flush
    assert (tmp_path / "v" / "dirty").exists()
    again = StagingVolume.open(tmp_path / "v")
    assert again.recovered
    assert sorted(again.hashes()) == [1]
    assert not (tmp_path / "v" / "dirty").exists()
    again.close()
    assert StagingVolume.open(tmp_path / "v").recovered is False
