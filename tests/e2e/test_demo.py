"""`opensmc demo`: a newcomer's first migration, start to finish, in well under a minute."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, clean_env

pytestmark = pytest.mark.e2e


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("sdk", [True, False], ids=["tea-sdk", "own-signer"])
def test_demo_no_keep(tmp_path: Path, sdk: bool) -> None:
    env = clean_env()
    if not sdk:  # a shadow package whose import fails, as when the SDK is not installed
        shadow = tmp_path / "shadow" / "alibabacloud_smc20190601"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [*OPENSMC, "demo", "--no-keep"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "identical to the sample disk" in out
    assert ("official Alibaba Cloud SDK" if sdk else "pip install alibabacloud-smc20190601") in out
    assert "e2fsck -fn on the exported partition: clean" in out or "e2fsck not found" in out
    pids = [int(p) for p in re.findall(r"stopped the \w+ \(PID (\d+)\)", out)]
    assert len(pids) == 2 and all(_gone(p) for p in pids)
    data = tmp_path / "opensmc-demo"
    assert (data / "admin-credentials.json").exists() and (data / "demo" / "exported-disk.raw").exists()
    assert not (data / "demo" / "demo.json").exists()


def test_demo_keeps_the_server_running(tmp_path: Path) -> None:
    data = tmp_path / "here"
    result = subprocess.run(
        [*OPENSMC, "demo", "--data-dir", str(data), "--size-mib", "64"], capture_output=True, text=True,
        timeout=120, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"kill (\d+) (\d+)", result.stdout)
    assert match, result.stdout
    pids = [int(p) for p in match.groups()]
    try:
        creds = str(data / "admin-credentials.json")
        listed = subprocess.run([*OPENSMC, "image", "list", "--credentials", creds], capture_output=True,
                                text=True, timeout=60, env=clean_env())  # fmt: skip
        assert listed.returncode == 0 and "m-" in listed.stdout, listed.stderr
        again = subprocess.run([*OPENSMC, "demo", "--data-dir", str(data)], capture_output=True, text=True,
                               timeout=60, env=clean_env())  # fmt: skip
        assert again.returncode == 2 and "still running" in again.stderr
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert all(_gone(p) for p in pids)


def test_sample_disk_without_partitioning_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opensmc.cli import demo_disk

    monkeypatch.setattr(demo_disk.shutil, "which", lambda name: None)
    disk = demo_disk.build_sample_disk(tmp_path / "d.img", 16 << 20)
    assert disk.partition is None and "random" in disk.what
    data = disk.path.read_bytes()
    assert len(data) == 16 << 20 and data.count(0) < len(data) - (3 << 20)
