"""A real S3 server for tests: a one-node Ceph cluster (mon + memstore OSD) and its RADOS Gateway.

Everything lives in one temporary folder, listens on loopback ports of its
own and runs without cephx (auth ``none``: a test cluster on loopback). It
starts in about ten seconds; ``scripts/setup`` installs the Debian packages
(``ceph-mon ceph-osd radosgw``).

Run it by hand: ``python -m tests.s3server`` prints the endpoint and keys
and keeps it up until Ctrl-C.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "OPENSMCTESTKEY"
SECRET_KEY = "opensmc-test-secret"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CephS3:
    root: Path
    endpoint: str = ""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (and ``opensmc server``) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def _run(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return out.stdout.strip()

    def _daemon(self, *args: str) -> None:
        # -f: in the foreground, so the process is ours to stop and dies with a stop().
        log = open(self.root / "log" / f"{args[0]}.out", "wb")
        self.procs.append(subprocess.Popen([*args, "-f", "-c", str(self.conf)], stdout=log, stderr=log))

    def start(self, timeout: float = 120) -> None:
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = _free_port(), _free_port()
        for d in ("run", "log", "mon", "osd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon max pg per osd = 1000
osd crush chooseleaf type = 0
ms bind msgr2 = false
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
mon data = {r}/mon
osd data = {r}/osd
osd objectstore = memstore
osd class update on start = false
osd crush update on start = false
memstore device bytes = 4294967296
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {r}/rgw
"""
        )
        subprocess.run(
            ["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{mon_port}]", str(r / "monmap")],
            check=True,
            capture_output=True,
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(r / "monmap"))
        self._daemon("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid)
        self._run("ceph-osd", "--mkfs", "-i", osd_id, "--osd-uuid", osd_uuid)
        # The OSD places itself in the CRUSH map by default, with mon commands sent
        # as it starts; Pacific's OSD sometimes sends them before its MonClient has
        # the cluster's fsid, the mon refuses them ("wrong fsid") and the OSD exits
        # (one start in four here). The ceph CLI places it instead, before it starts.
        self._run("ceph", "osd", "crush", "add", f"osd.{osd_id}", "1.0", "host=opensmc-test", "root=default")
        self._daemon("ceph-osd", "-i", osd_id)
        self._daemon("radosgw", "-n", "client.rgw")
        self.endpoint = f"http://127.0.0.1:{rgw_port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                dead = [p.args[0] for p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Ceph RGW did not come up (exited: {dead or 'none'}; logs in {r / 'log'})"
                    ) from None
                time.sleep(0.3)
        self._run(
            "radosgw-admin",
            "-n",
            "client.rgw",
            "user",
            "create",
            "--uid=opensmc-test",
            "--display-name=opensmc tests",
            f"--access-key={self.access_key}",
            f"--secret={self.secret_key}",
        )

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def start(root: Path | None = None, attempts: int = 3) -> CephS3:
    """A running cluster; a failed start is tried again from scratch in a new folder, on new ports.

    Starts fail now and then on a busy machine (a port taken between choosing and
    binding it): a fresh cluster is cheap, so the fixture tries up to ``attempts``
    and then reports every failure.
    """
    base = Path(root or tempfile.mkdtemp(prefix="opensmc-ceph-"))
    errors: list[str] = []
    for attempt in range(attempts):
        server = CephS3(base / f"try{attempt}")
        try:
            server.start()
            return server
        except (RuntimeError, subprocess.SubprocessError) as exc:
            server.stop()
            errors.append(f"attempt {attempt + 1}: {exc}")
    raise RuntimeError("Ceph did not start: " + "; ".join(errors))


if __name__ == "__main__":
    s = start()
    print(s.endpoint, s.access_key, s.secret_key, s.root, flush=True)
    try:
        signal.pause()
    finally:
        s.stop()
