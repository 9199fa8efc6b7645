"""A whole migration with ``opensmc server --image-store s3://…`` on a real Ceph RGW: the image is on S3 only."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from opensmc.chunkstore.location import StoreLocation
from opensmc.images.store import ImageStore
from tests.e2e.conftest import OPENSMC, clean_env
from tests.e2e.disks import MiB, build_disk, require_tools, sha256_file
from tests.e2e.flows import create_job, register, start_migration_server, stop, wait_status

pytestmark = pytest.mark.e2e


def test_migration_onto_s3_exports_byte_identical(
    tmp_path: Path, s3_server: Any, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    require_tools()
    disk = build_disk(tmp_path / "sys.img", 64 * MiB, label="gpt", parts=2, seed=11)
    url = f"s3://{s3_bucket}/opensmc/images"
    server = start_migration_server(tmp_path, "--image-store", url, "--s3-endpoint", s3_server.endpoint)
    agent = None
    try:
        agent, source_id = register(server, [disk.path], tmp_path / "agent")
        job_id = create_job(server, source_id, "to-s3")
        server.call_json("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Finished", timeout=120)
        image_id = str(job["ImageId"])

        # Nothing of the image is in the data dir: the packs and the snapshot are objects.
        assert not (server.data_dir / "store").exists()
        store = ImageStore(StoreLocation(url, s3_endpoint=s3_server.endpoint))
        assert store.list_images() == [image_id]
        assert store.backend.list("data/") and store.backend.list("snapshots/") == [f"snapshots/{image_id}"]
        assert store.check().ok

        # Exported through the server's image routes (which read S3) and straight from the bucket.
        out = tmp_path / "exported.raw"
        result = subprocess.run(
            [*OPENSMC, "image", "export", image_id, "--disk", "0", "--format", "raw", "-o", str(out),
             "--credentials", str(server.data_dir / "admin-credentials.json")],
            capture_output=True, text=True, timeout=120, env=clean_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert sha256_file(out) == disk.sha256()
        assert out.read_bytes() == disk.path.read_bytes()
        direct = tmp_path / "direct.raw"
        store.export(image_id, 0, "raw", direct)
        assert direct.read_bytes() == disk.path.read_bytes()
    finally:
        if agent:
            agent.stop()
        stop(server.proc)


def test_a_wrong_image_store_is_a_clear_error(tmp_path: Path, s3_server: Any, s3_env: dict[str, str]) -> None:
    missing = subprocess.run(
        [*OPENSMC, "server", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:1",
         "--image-store", "s3://no-such-bucket-here/x", "--s3-endpoint", s3_server.endpoint],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert missing.returncode == 2
    assert "cannot open the image store s3://no-such-bucket-here/x" in missing.stderr
    assert "NoSuchBucket" in missing.stderr
    bad = subprocess.run(
        [*OPENSMC, "server", "--data-dir", str(tmp_path / "d"), "--image-store", "gs://b/x"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert bad.returncode == 2 and "--image-store takes s3://BUCKET/PREFIX" in bad.stderr
