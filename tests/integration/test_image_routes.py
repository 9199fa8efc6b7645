"""The image routes over a real socket: signatures, account isolation, byte-exact and verified downloads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from opensmc import API_VERSION
from opensmc.agent.pipeline import replicate
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.chunkstore.snapshots import DiskIndex
from opensmc.chunkstore.staging import StagingIndex
from opensmc.images.store import ImageStore
from opensmc.service.accounts import KeyPair, create_account
from opensmc.service.context import Services
from opensmc.signer import sign_acs3
from opensmc.store import images as image_q
from tests.integration.test_images import IndexSender
from tests.live_server import running

MiB = 1 << 20
PREFIX = "/opensmc/v1/images"


def _disk(path: Path, size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(size)
    for at in range(0, size, MiB):
        if rnd.random() < 0.5:
            data[at : at + 300_000] = rnd.randbytes(300_000)
    data[-10:] = b"end-of-dsk"
    path.write_bytes(data)
    return bytes(data)


def make_image(services: Services, account_id: str, tmp: Path, image_id: str, sizes: Sequence[int]) -> list[bytes]:
    """An image with one disk per size, recorded for `account_id`; returns the disks' bytes."""
    store = ImageStore(services.settings.store_dir)
    staged: list[DiskIndex] = []
    contents: list[bytes] = []
    for i, size in enumerate(sizes):
        src = tmp / f"{image_id}-src{i}.img"
        contents.append(_disk(src, size, seed=i + 7))
        vol = StagingIndex.create(tmp / f"{image_id}-vol{i}.fidx", size, 16384)
        replicate(str(src), IndexSender(vol, store.repo), chunk_size=16384)
        vol.checkpoint(store.repo)
        d = vol.disk()
        # as a job with checksum=true records it
        staged.append(DiskIndex(d.size, d.chunk_size, d.digests, hashlib.sha256(contents[-1]).hexdigest()))
        vol.close()
    manifest = store.create_image(image_id, staged)
    doc = {
        "disks": [{"index": i, "size": d.size, "sha256": d.sha256, "chunk_size": d.chunk_size}
                  for i, d in enumerate(manifest.disks)],
        "checksum_verified": True,
    }  # fmt: skip
    with services.db.begin() as conn:
        image_q.add_image(
            conn, image_id=image_id, account_id=account_id, job_id="j-test", run_id=1, name=f"{image_id}-name",
            manifest=json.dumps(doc), now=services.clock(),
        )  # fmt: skip
    return contents


@dataclass
class Client:
    base: str
    pair: KeyPair

    def signed(
        self,
        path: str,
        params: dict[str, str] | None = None,
        *,
        sign_path: str | None = None,
        nonce: str | None = None,
    ) -> tuple[str, dict[str, str]]:
        host = urlsplit(self.base).netloc
        query, headers = sign_acs3(
            "GET", host, "DownloadImage", API_VERSION, params or {}, self.pair.access_key_id,
            self.pair.access_key_secret, nonce=nonce, path=sign_path or path,
        )  # fmt: skip
        return f"{self.base}{path}" + (f"?{query}" if query else ""), headers

    def get(self, path: str, params: dict[str, str] | None = None, **kw: str) -> httpx.Response:
        url, headers = self.signed(path, params, **kw)
        return httpx.get(url, headers=headers, timeout=30)


@pytest.fixture
def site(services: Services, tmp_path: Path) -> Iterator[tuple[Client, Client, list[bytes]]]:
    owner, other = create_account(services, "owner"), create_account(services, "other")
    disks = make_image(services, owner.account_id, tmp_path, "m-test1", [8 * MiB, 3 * MiB + 4096])
    with running(create_app(services, image_routes)) as endpoint:
        yield Client(f"http://{endpoint}", owner), Client(f"http://{endpoint}", other), disks


def _error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"Code", "Message", "RequestId"}
    assert body["Code"] == code


def test_unsigned_and_badly_signed_requests_are_refused(site: tuple[Client, Client, list[bytes]]) -> None:
    owner, _other, _disks = site
    _error(httpx.get(f"{owner.base}{PREFIX}"), 401, "MissingAuthorization")
    _error(httpx.get(f"{owner.base}{PREFIX}/m-test1/disks/0"), 401, "MissingAuthorization")
    # a signature for one path does not open another
    _error(owner.get(f"{PREFIX}/m-test1/disks/0", sign_path=f"{PREFIX}/m-test1"), 400, "SignatureDoesNotMatch")
    # a tampered query is caught
    url, headers = owner.signed(f"{PREFIX}/m-test1/disks/0", {"format": "raw"})
    _error(httpx.get(url.replace("raw", "qcow2"), headers=headers), 400, "SignatureDoesNotMatch")
    # a replayed request is caught by its nonce
    url, headers = owner.signed(f"{PREFIX}/m-test1")
    assert httpx.get(url, headers=headers).status_code == 200
    _error(httpx.get(url, headers=headers), 400, "SignatureNonceUsed")
    # unknown key
    stranger = Client(owner.base, KeyPair("acc-x", "LTAIunknown", "secret"))
    _error(stranger.get(PREFIX), 404, "InvalidAccessKeyId.NotFound")


def test_list_and_show(site: tuple[Client, Client, list[bytes]]) -> None:
    owner, _other, disks = site
    listed = owner.get(PREFIX).json()
    assert listed["TotalCount"] == 1
    (item,) = listed["Images"]["Image"]
    assert item["ImageId"] == "m-test1" and item["JobId"] == "j-test" and item["ChecksumVerified"] is True
    assert [d["Size"] for d in item["Disks"]] == [len(d) for d in disks]
    assert "Chunks" not in item["Disks"][0]

    shown = owner.get(f"{PREFIX}/m-test1").json()
    for i, disk in enumerate(shown["Disks"]):
        assert disk["Index"] == i
        assert disk["Sha256"] == hashlib.sha256(disks[i]).hexdigest()
        assert disk["ChunkSize"] == 16384
        assert len(disk["Chunks"]) == disk["ChunkCount"] == -(-len(disks[i]) // 16384)
        assert None in disk["Chunks"]  # zero chunks are holes
    assert shown["CreationTime"].endswith("Z") and shown["RunId"] == 1
    assert "Chunks" not in owner.get(f"{PREFIX}/m-test1", {"chunks": "false"}).json()["Disks"][0]


def test_another_account_sees_nothing(site: tuple[Client, Client, list[bytes]]) -> None:
    _owner, other, _disks = site
    assert other.get(PREFIX).json()["Images"]["Image"] == []
    _error(other.get(f"{PREFIX}/m-test1"), 404, "InvalidImageId.NotFound")
    _error(other.get(f"{PREFIX}/m-test1/disks/0"), 404, "InvalidImageId.NotFound")
    _error(other.get(f"{PREFIX}/m-nothing"), 404, "InvalidImageId.NotFound")


def test_raw_download_is_byte_identical(site: tuple[Client, Client, list[bytes]]) -> None:
    owner, _other, disks = site
    for i, data in enumerate(disks):
        response = owner.get(f"{PREFIX}/m-test1/disks/{i}", {"format": "raw"})
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(data)
        assert response.content == data
    _error(owner.get(f"{PREFIX}/m-test1/disks/2"), 404, "InvalidDiskIndex.NotFound")
    _error(owner.get(f"{PREFIX}/m-test1/disks/0", {"format": "vmdk"}), 400, "InvalidParameter")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_qcow2_download_converts_back(
    site: tuple[Client, Client, list[bytes]], services: Services, tmp_path: Path
) -> None:
    owner, _other, disks = site
    response = owner.get(f"{PREFIX}/m-test1/disks/1", {"format": "qcow2"})
    assert response.status_code == 200
    qcow = tmp_path / "d.qcow2"
    qcow.write_bytes(response.content)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(tmp_path / "d.raw")],
                   check=True)  # fmt: skip
    assert (tmp_path / "d.raw").read_bytes() == disks[1]
    assert list((services.settings.data_dir / "tmp").glob("*")) == []  # the temp file is gone


def test_tampered_chunk_aborts_the_download(
    site: tuple[Client, Client, list[bytes]], services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    owner, _other, disks = site
    store = ImageStore(services.settings.store_dir)
    manifest = store.get("m-test1")
    others = set(manifest.disks[1].chunk_hexes())
    last = [h for h in manifest.disks[0].chunk_hexes() if h is not None and h not in others][-1]
    where = store.repo.locate(bytes.fromhex(last))
    pack = services.settings.store_dir / "data" / where.pack[:2] / where.pack
    os.chmod(pack, 0o600)
    data = bytearray(pack.read_bytes())
    data[where.entry.offset + where.entry.stored_length // 2] ^= 0xFF  # inside that blob's bytes
    pack.write_bytes(bytes(data))

    url, headers = owner.signed(f"{PREFIX}/m-test1/disks/0")
    got = bytearray()
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200  # the status was sent before the bad chunk was read
        for block in response.iter_bytes():
            got += block
    assert len(got) < len(disks[0])
    assert any("download aborted" in r.getMessage() for r in caplog.records)

    # qcow2 is made before the first byte, so the client gets a proper error
    _error(owner.get(f"{PREFIX}/m-test1/disks/0", {"format": "qcow2"}), 409, "Image.Corrupt")
    # the other disk does not use that chunk and still downloads
    assert owner.get(f"{PREFIX}/m-test1/disks/1").content == disks[1]
