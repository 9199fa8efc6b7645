"""`image list` shows an image verified once every disk was read back whole (issue 10: Checksum `-` after verify)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from opensmc.api.app import create_app
from opensmc.api.image_routes import PREFIX
from opensmc.api.image_routes import routes as image_routes
from opensmc.cli.image_access import LocalImages
from opensmc.service.accounts import create_account
from opensmc.service.context import Services
from opensmc.store import images as image_q
from opensmc.store.tables import images
from tests.integration.test_image_routes import Client, make_image
from tests.live_server import running

MiB = 1 << 20


def _unchecked(services: Services, image_id: str) -> None:
    """As if the run had not used the `checksum` replication parameter."""
    with services.db.begin() as conn:
        doc = json.loads(conn.execute(select(images.c.manifest).where(images.c.id == image_id)).scalar_one())
        doc.pop("checksum_verified")
        image_q.set_image(conn, image_id, manifest=json.dumps(doc))


def test_whole_downloads_of_every_disk_mark_the_image_verified(services: Services, tmp_path: Path) -> None:
    owner = create_account(services, "owner")
    disks = make_image(services, owner.account_id, tmp_path, "m-proof", [2 * MiB, MiB])
    _unchecked(services, "m-proof")
    with running(create_app(services, image_routes)) as endpoint:
        client = Client(f"http://{endpoint}", owner)

        def state() -> object:
            (item,) = client.get(PREFIX).json()["Images"]["Image"]
            return item["ChecksumVerified"]

        assert state() is None
        # a download broken off early proves nothing
        url, headers = client.signed(f"{PREFIX}/m-proof/disks/0", {"format": "raw"})
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            next(response.iter_bytes(65536))
        assert state() is None
        first = client.get(f"{PREFIX}/m-proof/disks/0", {"format": "raw"})
        assert first.content == disks[0]
        assert state() is None  # disk 1 not yet read
        second = client.get(f"{PREFIX}/m-proof/disks/1", {"format": "raw"})
        assert second.content == disks[1]
        assert state() is True
        shown = client.get(f"{PREFIX}/m-proof").json()
        assert shown["ChecksumVerified"] is True and shown["VerifiedTime"]


def test_local_verify_records_the_proof(services: Services, tmp_path: Path) -> None:
    """`opensmc image verify --data-dir DIR` on the server machine writes the proof into DIR/opensmc.db."""
    if not services.db.is_sqlite:
        pytest.skip("--data-dir reads the SQLite database in the data dir")
    owner = create_account(services, "owner")
    make_image(services, owner.account_id, tmp_path, "m-local", [MiB])
    _unchecked(services, "m-local")
    (services.settings.data_dir / "opensmc.db").symlink_to(tmp_path / "opensmc.db")
    local = LocalImages(services.settings.data_dir)
    assert local.show("m-local")["ChecksumVerified"] is None
    assert local.verify("m-local") == []
    assert local.show("m-local")["ChecksumVerified"] is True
