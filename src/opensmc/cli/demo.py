"""`opensmc demo`: one complete migration on this machine, for a first look.

It builds a small sample disk (a GPT partition table and an ext4 filesystem
with a few files, or random regions when ``sfdisk``/``mkfs.ext4`` are
missing), starts ``opensmc server`` and ``opensmc agent run`` as child
processes, drives a replication job through the official Tea SDK
(``alibabacloud-smc20190601``, or our own signer when it is not installed)
with a live progress bar, exports the image and proves it byte-identical to
the sample disk (SHA-256, plus ``e2fsck -fn`` on the partition). The server
and agent keep running afterwards (their PIDs are printed) unless
``--no-keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from opensmc.cli.credentials import ClientCredentials
from opensmc.cli.demo_client import DemoError, SmcClient
from opensmc.cli.demo_disk import build_sample_disk, fsck_partition, say

MiB = 1 << 20
OPENSMC = [sys.executable, "-m", "opensmc.cli.main"]
#: checksum on: the server proves the image equal to what the agent read, chunk by chunk
REPLICATION_PARAMETERS = '{"bandwidth_limit":0,"compress_level":1,"checksum":true}'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("opensmc-demo"),
        help="the demo server's data dir (./opensmc-demo)",
    )
    p.add_argument("--size-mib", type=int, default=256, help="size of the sample disk in MiB (default 256)")
    p.add_argument("--no-keep", action="store_true", help="stop the server and the agent at the end")


def run(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    work = data_dir / "demo"
    state_file = work / "demo.json"
    running = _still_running(state_file)
    if running:
        print(
            f"opensmc demo: the demo server from an earlier run is still running ({running}). "
            f"Stop it first, or give another --data-dir.",
            file=sys.stderr,
        )
        return 2
    work.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ok = False
    try:
        ok = _demo(args, data_dir, work, procs)
    except DemoError as exc:
        print(f"\nopensmc demo: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nopensmc demo: interrupted", file=sys.stderr)
    finally:
        if not ok or args.no_keep:
            for name, proc in reversed(procs.items()):
                _stop(proc)
                say(f"stopped the {name} (PID {proc.pid})")
            state_file.unlink(missing_ok=True)
            if not ok:
                say(f"Logs: {data_dir / 'server.log'}, {data_dir / 'agent.log'}")
        else:
            state_file.write_text(json.dumps({n: p.pid for n, p in procs.items()}))
    return 0 if ok else 1


def _demo(args: argparse.Namespace, data_dir: Path, work: Path, procs: dict[str, subprocess.Popen[bytes]]) -> bool:
    say("== 1/6 A sample disk to migrate")
    disk = build_sample_disk(work / "sample-disk.img", args.size_mib * MiB)
    say(f"   {disk.path} ({args.size_mib} MiB): {disk.what}")
    say(f"   SHA-256 {disk.sha256}")

    say("== 2/6 The OpenSMC server")
    port, r_port = _free_port(), _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    procs["server"] = _spawn(
        [
            "server", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
            "--receiver-listen", f"127.0.0.1:{r_port}", "--heartbeat-rate", "1",
            "--orchestrator-interval", "0.5",
        ],
        data_dir / "server.log",
    )  # fmt: skip
    _wait_up(endpoint, procs["server"], data_dir / "server.log")
    creds_file = data_dir / "admin-credentials.json"
    creds = _credentials(creds_file, endpoint)
    say(f"   {endpoint} (PID {procs['server'].pid}), data in {data_dir}, log {data_dir / 'server.log'}")
    api = SmcClient(creds)
    say(f"   talking to it with {api.kind}")

    say("== 3/6 An agent on the 'source server' (here: the sample disk)")
    token = api.call("CreateAccessToken", {"Name": "opensmc-demo", "Count": "1"})
    state_dir = work / "agent-state"
    procs["agent"] = _spawn(
        [
            "agent", "run", "--server", endpoint, "--token-id", token["AccessTokenId"],
            "--token-code", token["AccessTokenCode"], "--disk", str(disk.path), "--state-dir", str(state_dir),
        ],
        data_dir / "agent.log",
    )  # fmt: skip
    source_id = _wait_for(lambda: _available_source(api, state_dir), 60, "the agent to register", procs["agent"])
    say(f"   activation code {token['AccessTokenId']}; the agent (PID {procs['agent'].pid}) registered "
        f"migration source {source_id}")  # fmt: skip

    say("== 4/6 A replication job: CreateReplicationJob, StartReplicationJob")
    job = api.call(
        "CreateReplicationJob",
        {
            "RegionId": "local", "SourceId": source_id, "Name": f"opensmc-demo-{int(time.time())}",
            "RunOnce": "true", "ReplicationParameters": REPLICATION_PARAMETERS,
        },
    )  # fmt: skip
    job_id = str(job["JobId"])
    api.call("StartReplicationJob", {"JobId": job_id})
    final = _follow(api, job_id)
    if final.get("Status") != "Finished":
        raise DemoError(
            f"job {job_id} ended {final.get('Status')}/{final.get('BusinessStatus')}: "
            f"{final.get('ErrorCode', '')} {final.get('StatusInfo', '')}"
        )
    image_id = str(final.get("ImageId") or "")
    say(f"   job {job_id} finished; image {image_id}")

    say("== 5/6 Export the image and compare it with the sample disk")
    from opensmc.cli.image_access import RemoteImages
    from opensmc.cli.images import export

    out = work / "exported-disk.raw"
    sha = export(RemoteImages(creds), image_id, 0, "raw", out, quiet=True)
    if sha != disk.sha256:
        raise DemoError(f"the exported disk's SHA-256 {sha} differs from the sample's {disk.sha256}")
    say(f"   {out}: SHA-256 {sha} — identical to the sample disk")
    if disk.partition:
        say(f"   {fsck_partition(out, *disk.partition)}")

    say("== 6/6 Done")
    _next_steps(endpoint, creds_file, job_id, image_id, procs, keep=not args.no_keep)
    return True


# processes ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A session of its own: a Ctrl-C in this terminal later must not stop the kept server.
        return subprocess.Popen(
            [*OPENSMC, *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _still_running(state_file: Path) -> str:
    try:
        pids = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return ""
    alive = []
    for name, pid in pids.items():
        try:
            cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"opensmc" in cmdline:
            alive.append(f"{name} PID {pid}")
    return ", ".join(alive) + (f"; stop it with: kill {' '.join(str(p) for p in pids.values())}" if alive else "")


def _wait_up(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def up() -> bool:
        try:
            return httpx.get(endpoint + "/agent/v1/info", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(up, 60, "the server to start", proc)
    except DemoError:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise DemoError(f"the server did not start; the end of {log}:\n{tail}") from None


def _wait_for(check: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise DemoError(f"gave up waiting for {what}: the process exited with status {proc.returncode}")
        time.sleep(0.2)
    raise DemoError(f"gave up waiting for {what} after {timeout:.0f} s")


def _credentials(path: Path, endpoint: str) -> ClientCredentials:
    doc = json.loads(path.read_text())
    if doc.get("endpoint") != endpoint:
        # An earlier demo ran on another port: point the file at this server.
        doc["endpoint"] = endpoint
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return ClientCredentials(doc["access_key_id"], doc["access_key_secret"], endpoint)


def _available_source(api: SmcClient, state_dir: Path) -> str | None:
    try:
        source_id = json.loads((state_dir / "agent.json").read_text())["source_id"]
    except (OSError, ValueError, KeyError):
        return None
    body = api.call("DescribeSourceServers", {"SourceId.1": source_id})
    for src in body.get("SourceServers", {}).get("SourceServer", []):
        if src.get("SourceId") == source_id and src.get("State") == "Available":
            return str(source_id)
    return None


def _follow(api: SmcClient, job_id: str) -> dict[str, Any]:
    """Poll DescribeReplicationJobs behind a progress bar until the job stops running."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("   {task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TimeElapsedColumn())  # fmt: skip
    deadline = time.monotonic() + 600
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("Ready", total=100)
        while True:
            body = api.call("DescribeReplicationJobs", {"JobId.1": job_id})
            jobs = body.get("ReplicationJobs", {}).get("ReplicationJob", [])
            if not jobs:
                raise DemoError(f"job {job_id} disappeared")
            job: dict[str, Any] = jobs[0]
            status, business = job.get("Status", ""), job.get("BusinessStatus", "")
            bar.update(task, completed=float(job.get("Progress") or 0),
                       description=f"{status}/{business}" if business else status)  # fmt: skip
            if status not in ("Ready", "Running"):
                return job
            if time.monotonic() > deadline:
                raise DemoError(f"job {job_id} still {status}/{business} after 10 minutes")
            time.sleep(0.3)


def _next_steps(
    endpoint: str,
    creds: Path,
    job_id: str,
    image_id: str,
    procs: dict[str, subprocess.Popen[bytes]],
    keep: bool,
) -> None:
    beside = Path(sys.executable).parent / "opensmc"  # the virtualenv's script, when not on PATH
    cli = (
        "opensmc"
        if shutil.which("opensmc")
        else str(beside)
        if beside.exists()
        else f"{sys.executable} -m opensmc.cli.main"
    )
    c = f"--credentials {creds}"
    if not keep:
        say("The migration worked. (--no-keep: the server and agent are stopped now.)")
        return
    pids = " ".join(str(p.pid) for p in procs.values())
    say(f"""
The server keeps running, so you can go on:

  endpoint     {endpoint}
  credentials  {creds}  (AccessKey pair, mode 0600)
  processes    server PID {procs["server"].pid}, agent PID {procs["agent"].pid}

  {cli} call DescribeSourceServers {c}
  {cli} call DescribeReplicationJobs --JobId.1 {job_id} {c}
  {cli} image list {c}
  {cli} image export {image_id} --disk 0 --format qcow2 -o disk.qcow2 {c}

The official SDKs work too: endpoint "{endpoint.split("://", 1)[1]}", protocol "http"
(see docs/operations.md).
Stop it with:  kill {pids}""")
