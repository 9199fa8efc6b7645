"""Boot tests of real images: a Debian guest migrated by a real server and agent (to a 20 GiB system disk) boots;
a disk without bootloader does not, and says so; `image serve --nbd` hands out the stored bytes read-only.

The guest (tests/guest.py) is built once with debootstrap and cached under
/var/tmp/opensmc-guest-cache; these tests are marked ``boot`` (``-m "not
boot"`` skips them) and skip when QEMU, nbdkit or debootstrap are missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, stop
from tests.e2e.flows import api, create_job, register, runs, start_migration_server, wait_status
from tests.guest import MiB, debian_guest, no_bootloader_disk, store_image

pytestmark = [pytest.mark.e2e, pytest.mark.boot]


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _image(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OPENSMC, "image", *args], capture_output=True, text=True, timeout=timeout, env=env or clean_env()
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def no_boot_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A data dir whose store holds one image: a partitioned, formatted disk with no boot code."""
    tmp = tmp_path_factory.mktemp("noboot")
    disk = no_bootloader_disk(tmp / "noboot.img")
    store_image(tmp / "data" / "store", "m-noboot", [disk], tmp)
    yield tmp / "data", disk


def test_migrated_debian_guest_passes_boot_test(tmp_path: Path) -> None:
    _need("qemu-system-x86_64", "nbdkit")
    guest = debian_guest()
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [guest.disk], tmp_path / "agent")  # the agent only reads the disk
        # A larger system disk than the source's 1 GiB: the image is 20 GiB, the source's bytes then zeros
        # (adaptation off: this guest boots on virtio as it is; tests/e2e/test_adaptation.py adapts one that does not)
        job_id = create_job(server, source_id, "boot", "--SystemDiskSize", "20",
                            "--ReplicationParameters", '{"os_adaptation": false}')  # fmt: skip
        server.call("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Finished", timeout=300)
        image_id = str(job["ImageId"])
        store = server.data_dir / "store"
        objects_before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and "lock" not in p.name)
        started = time.monotonic()
        result = _image("boot-test", image_id, "--data-dir", str(server.data_dir), "--timeout", "240")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"PASSED: {image_id} disk 0: the system reached a login prompt" in result.stdout
        log = Path(result.stdout.split("console log: ")[1].strip())
        assert log.parent == server.data_dir / "boot-tests" / image_id
        console = log.read_text(errors="replace")
        assert "SeaBIOS" in console and "GRUB" in console and "opensmc-guest login:" in console
        # kept beside the image, shown by image show, locally and over the signed HTTP route
        for where in (["--data-dir", str(server.data_dir)],
                      ["--credentials", str(server.data_dir / "admin-credentials.json")]):  # fmt: skip
            shown = _image("show", image_id, "--json", *where)
            assert shown.returncode == 0, shown.stderr
            doc = json.loads(shown.stdout)
            (test,) = doc["BootTest"]
            assert test["Disk"] == 0 and test["Verdict"] == "passed" and test["Stage"] == "login", test
            assert doc["Disks"][0]["Size"] == 20 * 1024 * MiB
        verdict = json.loads((log.parent / "latest-disk0.json").read_text())
        assert verdict["attach"] == "nbd", verdict["notes"]  # read from the chunk store, not an exported copy
        listed = _image("list", "--data-dir", str(server.data_dir))
        assert "passed" in listed.stdout
        # the image was only read: the store holds the same objects as before (no pack, index or snapshot more)
        objects_after = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and "lock" not in p.name)
        assert objects_after == objects_before
        print(f"boot test took {elapsed:.0f} s")
    finally:
        if agent is not None:
            agent.stop()
        stop(server.proc)


def test_disk_without_bootloader_fails_with_a_clear_verdict(no_boot_store: tuple[Path, Path]) -> None:
    _need("qemu-system-x86_64")
    data, _disk = no_boot_store
    result = _image("boot-test", "m-noboot", "--data-dir", str(data), "--timeout", "90")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: m-noboot disk 0: stage firmware" in result.stdout
    assert "no bootloader is installed" in result.stdout
    assert "Booting from Hard Disk" in result.stdout  # the last console lines are part of the verdict
    verdict = json.loads((data / "boot-tests" / "m-noboot" / "latest-disk0.json").read_text())
    assert verdict["passed"] is False and verdict["stage"] == "firmware"


def test_boot_test_without_qemu_says_what_to_install(no_boot_store: tuple[Path, Path], tmp_path: Path) -> None:
    data, _disk = no_boot_store
    result = _image("boot-test", "m-noboot", "--data-dir", str(data), env=clean_env(PATH=str(tmp_path)))
    assert result.returncode == 2
    assert "install the Debian package qemu-system-x86" in result.stderr
    assert "Traceback" not in result.stderr


def test_boot_test_needs_the_store(no_boot_store: tuple[Path, Path]) -> None:
    result = _image("boot-test", "m-noboot")
    assert result.returncode == 2 and "give --data-dir" in result.stderr, result.stderr


def test_serve_nbd_hands_out_the_stored_bytes_read_only(no_boot_store: tuple[Path, Path], tmp_path: Path) -> None:
    _need("nbdkit", "qemu-img", "qemu-io")
    data, disk = no_boot_store
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [*OPENSMC, "image", "serve", "m-noboot", "--nbd", "--listen", f"unix:{sock}", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.1)
        uri = f"nbd+unix:///?socket={sock}"
        out = tmp_path / "copy.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True, timeout=120)
        assert out.stat().st_size == 64 * MiB
        assert _sha256(out) == _sha256(disk)
        write = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4096", uri], capture_output=True, text=True, timeout=60
        )
        assert "read-only" in (write.stdout + write.stderr).lower() or write.returncode != 0, write
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.stdout is not None and "read-only at nbd+unix://" in proc.stdout.read()


def test_serve_refuses_without_nbd(no_boot_store: tuple[Path, Path]) -> None:
    data, _disk = no_boot_store
    result = _image("serve", "m-noboot", "--data-dir", str(data))
    assert result.returncode == 2 and "give --nbd" in result.stderr


def test_job_with_boot_test_records_the_verdict_and_warns_the_workgroup(tmp_path: Path) -> None:
    """ReplicationParameters boot_test: Processing boots the new image; a failure is NotPassed, not InError."""
    _need("qemu-system-x86_64")
    disk = no_bootloader_disk(tmp_path / "noboot.img")
    server = start_migration_server(tmp_path)
    agent = None
    try:
        agent, source_id = register(server, [disk], tmp_path / "agent")
        job_id = create_job(server, source_id, "bt", "--ReplicationParameters",
                            '{"boot_test": true, "boot_test_timeout": 90}')  # fmt: skip
        server.call("StartReplicationJob", "--JobId", job_id)
        job = wait_status(server, job_id, "Finished", timeout=300)
        (run,) = runs(server, job_id)
        test = json.loads(run["detail"])["boot_test"]
        assert test["image_id"] == job["ImageId"] and test["verdict"] == "failed" and test["stage"] == "firmware"
        assert "no bootloader is installed" in test["reason"]
        wg = str(server.call_json("CreateWorkgroup", "--Name", "wave")["WorkgroupId"])
        server.call("AssociateSourceServers", "--WorkgroupId", wg, "--SourceId.1", source_id)
        (group,) = api(server, "DescribeWorkgroups", WorkgroupId__1=wg)["Workgroups"]["Workgroup"]
        warnings = group["Warnings"]["Warning"]
        assert {"WarningType": "NotPassed", "SourceIds": {"SourceId": [source_id]}} in warnings or any(
            w.get("WarningType") == "NotPassed" and source_id in json.dumps(w) for w in warnings
        ), warnings
        shown = _image("show", str(job["ImageId"]), "--json", "--data-dir", str(server.data_dir))
        assert json.loads(shown.stdout)["BootTest"][0]["Verdict"] == "failed"
    finally:
        if agent is not None:
            agent.stop()
        stop(server.proc)


def test_boot_test_parameter_must_be_a_boolean(server: ServerProcess) -> None:
    result = server.call("CreateReplicationJob", "--RegionId", "local", "--SourceId", "s-none", "--Name", "xy",
                         "--ReplicationParameters", '{"boot_test": "yes"}', check=False)  # fmt: skip
    assert result.returncode == 1 and "boot_test must be true or false" in result.stdout + result.stderr
