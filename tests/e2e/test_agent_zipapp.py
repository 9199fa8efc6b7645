"""The agent as old servers run it: the server's zipapp on Python 3.6 (and 3.9), standard library only.

- The zipapp downloaded from a real ``opensmc server`` runs under a real Python
  3.6 with no site packages at all (``-I -S``: no xxhash, zstandard, numpy,
  httpx), registers, migrates a disk image file, and the export is
  byte-identical; then it replaces itself when the server's version differs.
- ``GET /agent/install.sh`` run in a Debian bullseye root (``tests/bullseye.py``,
  through ``chroot`` with ``/proc`` mounted inside) installs, starts, upgrades
  in place and uninstalls the agent, which migrates a disk on the way. Marked
  ``chroot`` (root, debootstrap, a cached root; ``-m 'not chroot'`` skips it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from opensmc import __version__
from opensmc.api.agent_dist import build_pyz
from tests.e2e.conftest import ServerProcess, clean_env, stop
from tests.e2e.disks import MiB, sha256_file
from tests.e2e.flows import api, create_job, export, start_migration_server, wait_for, wait_status

pytestmark = pytest.mark.e2e

#: where pyenv keeps the interpreters CI has; OPENSMC_TEST_PYTHON36 names another
PY36 = os.environ.get("OPENSMC_TEST_PYTHON36", "/root/.pyenv/versions/3.6.15/bin/python3.6")


def _python36() -> str:
    if not (Path(PY36).exists() or shutil.which(PY36)):
        pytest.skip(f"no Python 3.6 at {PY36} (set OPENSMC_TEST_PYTHON36)")
    return PY36


def make_disk(path: Path, size: int, seed: int) -> str:
    """A raw disk image with random, compressible and zero regions; returns its SHA-256."""
    rnd = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(64 * 1024, 2 * MiB), size - pos)
        kind = rnd.random()
        if kind < 0.4:
            data[pos : pos + n] = rnd.randbytes(n)
        elif kind < 0.6:
            data[pos : pos + n] = (b"log line %d of an old server\n" % pos * (n // 20 + 1))[:n]
        pos += n
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sources(server: ServerProcess) -> list[dict[str, Any]]:
    return list(api(server, "DescribeSourceServers")["SourceServers"]["SourceServer"])


def migrate_and_check(server: ServerProcess, source_id: str, sha: str, out: Path, *params: str) -> dict[str, Any]:
    job_id = create_job(server, source_id, f"zipapp-{uuid.uuid4().hex[:6]}", *params)
    server.call_json("StartReplicationJob", "--JobId", job_id)
    job = wait_status(server, job_id, "Finished", timeout=120)
    export(server, job["ImageId"], 0, out)
    assert sha256_file(out) == sha
    return job


def test_the_zipapp_on_python_36_migrates_a_disk_and_upgrades_itself(tmp_path: Path) -> None:
    py36 = _python36()
    disk = tmp_path / "disk.img"
    sha = make_disk(disk, 48 * MiB, seed=12)
    server = start_migration_server(tmp_path)
    agent: subprocess.Popen[str] | None = None
    log = tmp_path / "agent.log"
    try:
        blob = httpx.get(f"{server.endpoint}/agent/opensmc-agent.pyz", timeout=30).content
        published = httpx.get(f"{server.endpoint}/agent/opensmc-agent.pyz.sha256", timeout=30).text.split()[0]
        assert hashlib.sha256(blob).hexdigest() == published
        # An older build of the agent, as a source server would have from before the server's upgrade.
        pyz = tmp_path / "opt" / "opensmc-agent.pyz"
        pyz.parent.mkdir()
        pyz.write_bytes(build_pyz(version="0.0.1"))
        token = server.call_json("CreateAccessToken", "--Name", "py36", "--Count", "1")
        cmd = [py36, "-I", "-S", str(pyz), "--server", server.endpoint, "--state-dir", str(tmp_path / "state")]
        cmd += ["--token-id", str(token["AccessTokenId"]), "--token-code", str(token["AccessTokenCode"])]
        cmd += ["--disk", str(disk), "--log-level", "debug"]
        agent = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, text=True, env=clean_env())

        def upgraded() -> dict[str, Any] | None:
            assert agent is not None and agent.poll() is None, log.read_text()
            found = [s for s in sources(server) if s["State"] == "Available"]
            return found[0] if found and found[0]["AgentVersion"] == __version__ else None

        source = wait_for(upgraded, 60, "the agent upgraded to the server's version")
        assert pyz.read_bytes() == blob  # replaced by the server's very file, checksum checked
        text = log.read_text()
        assert "on Python 3.6." in text and "upgrading" in text and "agent upgraded" in text, text
        assert "nice" in text and "I/O class best-effort 7" in text, text
        job = migrate_and_check(
            server,
            str(source["SourceId"]),
            sha,
            tmp_path / "out.img",
            "--ReplicationParameters",
            '{"compress_level": 3}',
        )
        assert job["Progress"] == 100
        assert agent.poll() is None and "Traceback" not in log.read_text(), log.read_text()
    finally:
        if agent is not None:
            stop(agent)
        stop(server.proc)


# -- the install script in a Debian bullseye root ---------------------------------------------------------


@contextmanager
def chroot_with_proc(rootfs: Path) -> Iterator[Path]:
    """``rootfs`` with /proc mounted, held against other test processes using the same cached root."""
    with (rootfs.parent / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = rootfs / "proc"
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        try:
            yield rootfs
        finally:
            subprocess.run(["chroot", str(rootfs), "sh", "-c", "kill $(cat /opt/opensmc-agent/agent.pid) 2>/dev/null"])
            shutil.rmtree(rootfs / "opt/opensmc-agent", ignore_errors=True)
            subprocess.run(["umount", "-l", str(proc)], check=False)


def agent_alive(pid: str) -> bool:
    try:
        return b"opensmc-agent" in Path(f"/proc/{pid}/cmdline").read_bytes()  # a zombie's is empty
    except OSError:
        return False


def in_chroot(rootfs: Path, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"}
    return subprocess.run(
        ["chroot", str(rootfs), "sh", "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )


_STUB = '#!/bin/sh\necho "$*" >> /var/tmp/systemctl.calls\n'


def clear_stand_in(rootfs: Path) -> None:
    """Remove what :func:`fake_systemd` puts in the (cached, shared) root: a killed run leaves it there."""
    stub = rootfs / "usr/bin/systemctl"
    if stub.exists() and stub.read_text() == _STUB:
        stub.unlink()
    (rootfs / "var/tmp/systemctl.calls").unlink(missing_ok=True)
    shutil.rmtree(rootfs / "run/systemd", ignore_errors=True)
    (rootfs / "etc/systemd/system/opensmc-agent.service").unlink(missing_ok=True)


@contextmanager
def fake_systemd(rootfs: Path) -> Iterator[Callable[[], list[str]]]:
    """A chroot that looks as if systemd ran: /run/systemd/system and a systemctl that logs its calls."""
    clear_stand_in(rootfs)
    stub = rootfs / "usr/bin/systemctl"  # on the chroot's PATH; minbase has no systemd
    assert not stub.exists(), f"{stub} exists: this root has systemd; the stand-in would hide it"
    log = rootfs / "var/tmp/systemctl.calls"
    marker = rootfs / "run/systemd/system"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    marker.mkdir(parents=True, exist_ok=True)
    try:
        yield lambda: log.read_text().splitlines() if log.exists() else []
    finally:
        clear_stand_in(rootfs)


@pytest.mark.chroot
def test_install_script_on_debian_bullseye(tmp_path: Path) -> None:
    from tests.bullseye import bullseye_root

    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    rootfs = bullseye_root()
    clear_stand_in(rootfs)  # the first install below must find no systemd
    work = Path("/var/tmp") / f"opensmc-test-{uuid.uuid4().hex[:8]}"  # inside the root: what the agent sees
    server = start_migration_server(tmp_path)
    try:
        with chroot_with_proc(rootfs):
            (rootfs / work.relative_to("/")).mkdir(parents=True)
            sha = make_disk(rootfs / work.relative_to("/") / "disk.img", 40 * MiB, seed=9)
            token = server.call_json("CreateAccessToken", "--Name", "bullseye", "--Count", "1")
            line = (
                f"curl -fsSL {server.endpoint}/agent/install.sh | sh -s -- --token-id {token['AccessTokenId']} "
                f"--token-code {token['AccessTokenCode']} --disk {work}/disk.img"
            )
            result = in_chroot(rootfs, line)
            agent_log = rootfs / "opt/opensmc-agent/agent.log"
            assert result.returncode == 0, result.stdout + result.stderr
            assert "log: /opt/opensmc-agent/agent.log" in result.stdout, result.stdout
            assert "no systemd here" in result.stdout

            def available() -> dict[str, Any] | None:
                found = [s for s in sources(server) if s["State"] == "Available"]
                return found[0] if found else None

            try:
                source = wait_for(available, 60, "the bullseye agent registered")
            except AssertionError:
                raise AssertionError(agent_log.read_text() if agent_log.exists() else "no agent log") from None
            assert source["AgentVersion"] == __version__
            assert "on Python 3.9." in agent_log.read_text()
            migrate_and_check(server, str(source["SourceId"]), sha, tmp_path / "out.img")

            # Again, with wget this time (and no curl: the script must fetch with wget too):
            # an upgrade in place that keeps the registration.
            old_pid = (rootfs / "opt/opensmc-agent/agent.pid").read_text().strip()
            curl = rootfs / "usr/bin/curl"
            curl.rename(curl.with_name("curl.hidden"))
            try:
                again = in_chroot(rootfs, f"wget -qO- {server.endpoint}/agent/install.sh | sh -s --")
            finally:
                curl.with_name("curl.hidden").rename(curl)
            assert again.returncode == 0, again.stdout + again.stderr
            new_pid = (rootfs / "opt/opensmc-agent/agent.pid").read_text().strip()
            assert new_pid != old_pid and not agent_alive(old_pid)
            def restarted() -> bool | None:
                return agent_log.read_text().count("task channel open") == 2 or None

            wait_for(restarted, 30, "the restarted agent's task channel")
            text = agent_log.read_text()
            assert text.count("on Python 3.9.") == 2 and text.count("registered as") == 1, text  # kept its identity
            assert [s["SourceId"] for s in sources(server)] == [source["SourceId"]]

            # A wrong checksum installs nothing.
            bad = in_chroot(
                rootfs,
                f"curl -fsSL {server.endpoint}/agent/install.sh"
                " | sed 's#/agent/opensmc-agent.pyz.sha256#/agent/v1/info#' | sh -s --",
            )
            assert bad.returncode != 0 and "SHA-256" in bad.stderr, bad.stdout + bad.stderr

            # Where systemd runs (a stand-in systemctl here: a chroot has no systemd), the agent
            # becomes a unit that systemd checks as valid, and the background agent is stopped.
            with fake_systemd(rootfs) as calls:
                unit = in_chroot(rootfs, f"curl -fsSL {server.endpoint}/agent/install.sh | sh -s --")
                assert unit.returncode == 0, unit.stdout + unit.stderr
                assert "started as opensmc-agent.service" in unit.stdout, unit.stdout
                assert not agent_alive(new_pid)
                unit_file = rootfs / "etc/systemd/system/opensmc-agent.service"
                assert "ExecStart=/opt/opensmc-agent/run.sh" in unit_file.read_text()
                assert [c for c in calls() if c in ("daemon-reload", "enable opensmc-agent.service",
                                                     "restart opensmc-agent.service")] == [
                    "daemon-reload", "enable opensmc-agent.service", "restart opensmc-agent.service"]  # fmt: skip
                if shutil.which("systemd-analyze"):
                    # Checked by the host's systemd, with ExecStart pointing into the root (the chroot
                    # has no systemd of its own to check against).
                    host_unit = tmp_path / "opensmc-agent.service"
                    text = unit_file.read_text().replace("/opt/opensmc-agent/", f"{rootfs}/opt/opensmc-agent/")
                    host_unit.write_text(text)
                    verify = ["systemd-analyze", "verify", str(host_unit)]
                    check = subprocess.run(verify, capture_output=True, text=True)
                    assert check.returncode == 0, check.stdout + check.stderr
                # --uninstall removes the unit too.
                gone = in_chroot(rootfs, f"curl -fsSL {server.endpoint}/agent/install.sh | sh -s -- --uninstall")
                assert gone.returncode == 0, gone.stdout + gone.stderr
                assert not unit_file.exists() and "disable opensmc-agent.service" in calls()
            assert not (rootfs / "opt/opensmc-agent").exists()

            shutil.rmtree(rootfs / work.relative_to("/"), ignore_errors=True)
    finally:
        shutil.rmtree(rootfs / work.relative_to("/"), ignore_errors=True)
        stop(server.proc)
