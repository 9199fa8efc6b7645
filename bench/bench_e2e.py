"""End-to-end migration benchmark: what a user waits for, against rsync and cp in the same run.

Drives the product through its front door: ``opensmc server`` and
``opensmc agent run --disk`` as processes, the official Alibaba Cloud SDK
(``alibabacloud-smc20190601``) as the client. On the PERF_FLOORS test image
(2 GiB by default: 40 % random data in scattered 1 MiB regions, the rest
zeros), with the page cache dropped before every timed run:

- **full**: an incremental job (RunOnce=false) is started; the time runs from
  the ``StartReplicationJob`` call until ``DescribeReplicationJobs`` shows the
  run's image made (the job back in Waiting with an ImageId);
- **incremental**: 1 % of the image's 4 KiB blocks are overwritten at random,
  then ``CutOverReplicationJob SyncData=true``; the time runs until the job is
  Finished;
- the peers, on the same image: ``rsync --whole-file --sparse`` through an
  rsync daemon on loopback + ``sync``, ``cp --sparse=always`` + ``sync``, and
  after the same change ``rsync --inplace --no-whole-file -I -B 4096`` + ``sync``
  (the best rsync for this change pattern).

It also reports the CPU seconds the server and the agent used in each run
(comparable across runs on a busy machine, unlike seconds), how long each
run spent in Processing (from the job's event log), the peak memory (VmHWM)
of the server and the agent, and the space the image store takes. Every
result is verified: the exported image (and every peer's copy) must hash
equal to the source.

    python bench/bench_e2e.py [--dir /var/tmp/osmc-e2e] [--size-mib 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replication import (  # the shared image builder and peers
    MiB,
    RsyncDaemon,
    build_image,
    dirty_one_percent,
    drop_caches,
    file_hash,
    free_port,
    timed,
    vm_hwm_mib,
)

ROOT = Path(__file__).resolve().parents[1]
OPENSMC = [sys.executable, "-m", "opensmc.cli.main"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class Product:
    """A real server and agent, driven with the official SDK."""

    def __init__(self, work: Path, disk: Path, agent_args: list[str] | None = None) -> None:
        from alibabacloud_smc20190601 import models
        from alibabacloud_smc20190601.client import Client
        from alibabacloud_tea_openapi import models as api_models

        self.models = models
        self.data = work / "data"
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(work / "agent-state", ignore_errors=True)
        port = free_port()
        self.endpoint = f"127.0.0.1:{port}"
        self.server_log = (work / "server.log").open("w")
        self.server = subprocess.Popen(
            [*OPENSMC, "server", "--data-dir", str(self.data), "--listen", self.endpoint],
            env=ENV,
            stdout=self.server_log,
            stderr=subprocess.STDOUT,
        )
        creds_file = self.data / "admin-credentials.json"
        deadline = time.monotonic() + 60
        while not creds_file.exists():
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise SystemExit(f"the server did not start; see {work / 'server.log'}")
            time.sleep(0.1)
        time.sleep(0.5)
        creds = json.loads(creds_file.read_text())
        config = api_models.Config(
            access_key_id=creds["access_key_id"],
            access_key_secret=creds["access_key_secret"],
            endpoint=self.endpoint,
            protocol="http",
        )
        self.sdk = Client(config)
        token = self.sdk.create_access_token(models.CreateAccessTokenRequest(name="bench", count=1)).body
        self.agent_log = (work / "agent.log").open("w")
        self.agent = subprocess.Popen(
            [*OPENSMC, "agent", "run", "--server", f"http://{self.endpoint}", "--token-id", token.access_token_id,
             "--token-code", token.access_token_code, "--disk", str(disk), "--state-dir", str(work / "agent-state"),
             *(agent_args or [])],
            env=ENV,
            stdout=self.agent_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.source_id = self._wait(self._available_source, 60, "the agent to register")

    def _available_source(self) -> str | None:
        body = self.sdk.describe_source_servers(self.models.DescribeSourceServersRequest()).body
        for s in body.source_servers.source_server or []:
            if s.state == "Available":
                return str(s.source_id)
        return None

    @staticmethod
    def _wait(probe: Any, timeout: float, what: str, every: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = probe()
            if got:
                return got
            time.sleep(every)
        raise SystemExit(f"timed out waiting for {what}")

    def job(self, job_id: str) -> Any:
        req = self.models.DescribeReplicationJobsRequest(job_id=[job_id])
        return self.sdk.describe_replication_jobs(req).body.replication_jobs.replication_job[0]

    def create_job(self) -> str:
        req = self.models.CreateReplicationJobRequest(
            region_id="local", source_id=self.source_id, name="bench", run_once=False, frequency=1,
            max_number_of_image_to_keep=2,
        )  # fmt: skip
        return str(self.sdk.create_replication_job(req).body.job_id)

    def full_run(self, job_id: str) -> tuple[float, str]:
        t0 = time.monotonic()
        self.sdk.start_replication_job(self.models.StartReplicationJobRequest(job_id=job_id))

        def done() -> str | None:
            j = self.job(job_id)
            if j.status == "InError":
                raise SystemExit(f"job failed: {j.error_code} {j.status_info}")
            return str(j.image_id) if j.status == "Waiting" and j.image_id else None

        image = self._wait(done, 600, "the full run")
        return time.monotonic() - t0, image

    def incremental_run(self, job_id: str, previous_image: str) -> tuple[float, str]:
        t0 = time.monotonic()
        self.sdk.cut_over_replication_job(self.models.CutOverReplicationJobRequest(job_id=job_id, sync_data=True))

        def done() -> str | None:
            j = self.job(job_id)
            if j.status == "InError":
                raise SystemExit(f"job failed: {j.error_code} {j.status_info}")
            return str(j.image_id) if j.status == "Finished" and j.image_id != previous_image else None

        image = self._wait(done, 600, "the incremental run")
        return time.monotonic() - t0, image

    def processing_seconds(self, job_id: str) -> list[float]:
        """Seconds each run's Processing took to seal its image, from the server's log line.

        (The job's event log keeps whole seconds, as SMC's timestamps do.)
        """
        self.server_log.flush()
        text = (self.data.parent / "server.log").read_text()
        return [float(m) for m in re.findall(rf"job {job_id}: image m-\S+ sealed in ([0-9.]+) s", text)]

    def export(self, image_id: str, out: Path) -> None:
        subprocess.run(
            [*OPENSMC, "image", "export", image_id, "--disk", "0", "-o", str(out), "--data-dir", str(self.data)],
            env=ENV,
            check=True,
            capture_output=True,
        )

    def store_bytes(self) -> int:
        return sum(p.stat().st_blocks * 512 for p in (self.data / "store" / "data").rglob("*") if p.is_file())

    def cpu(self) -> tuple[float, float, float, float]:
        """CPU seconds the server and the agent have used so far: (server user, server system,
        agent user, agent system). User time is the Python side, system time the kernel's copies."""
        return (*cpu_seconds(self.server.pid), *cpu_seconds(self.agent.pid))

    def peaks(self) -> tuple[float, float]:
        return vm_hwm_mib(self.server.pid), vm_hwm_mib(self.agent.pid)

    def stop(self) -> None:
        for proc in (self.agent, self.server):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def add_agent_arg(ap: argparse.ArgumentParser) -> None:
    """``--agent-arg``: extra ``opensmc agent run`` arguments (e.g. another ``--io-class``), as ``args.agent_arg``."""
    ap.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        help="an extra `opensmc agent run` argument, repeatable: --agent-arg=--nice --agent-arg=0",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-e2e"))
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--skip-peers", action="store_true", help="only the product (for the memory/Processing runs)")
    add_agent_arg(ap)
    args = ap.parse_args()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source.img"
    print(f"building the {args.size_mib} MiB test image in {work} ...", flush=True)
    build_image(src, args.size_mib)
    source_hash = file_hash(src)
    cold = drop_caches()
    rows: list[tuple[str, str, float, bool]] = []

    product = Product(work, src, args.agent_arg)
    try:
        job_id = product.create_job()
        drop_caches()
        cpu0 = product.cpu()
        full, image1 = product.full_run(job_id)
        cpu_full = [b - a for a, b in zip(cpu0, product.cpu(), strict=True)]
        out = work / "exported.img"
        product.export(image1, out)
        rows.append(("full", "opensmc: StartReplicationJob → image made", full, file_hash(out) == source_hash))
        space_one = product.store_bytes()

        dirty_one_percent(src)
        changed_hash = file_hash(src)
        drop_caches()
        cpu0 = product.cpu()
        inc, image2 = product.incremental_run(job_id, image1)
        cpu_inc = [b - a for a, b in zip(cpu0, product.cpu(), strict=True)]
        product.export(image2, out)
        rows.append(("1% changed", "opensmc: CutOver SyncData=true → Finished", inc, file_hash(out) == changed_hash))
        space_two = product.store_bytes()
        out.unlink()
        processing = product.processing_seconds(job_id)
        server_peak, agent_peak = product.peaks()
    finally:
        product.stop()

    if not args.skip_peers:
        # The peers start again from the original image, then see the same change.
        build_image(src, args.size_mib)
        rsyncd = RsyncDaemon(work)
        try:
            drop_caches()
            t = timed(["rsync", "--whole-file", "--sparse", str(src), rsyncd.url("full.img")])
            rows.append(("full", "rsync --whole-file --sparse (daemon) + sync", t,
                         file_hash(rsyncd.dest / "full.img") == source_hash))  # fmt: skip
            drop_caches()
            t = timed(["cp", "--sparse=always", str(src), str(work / "cp.img")])
            rows.append(("full", "cp --sparse=always + sync", t, file_hash(work / "cp.img") == source_hash))
            dirty_one_percent(src)
            drop_caches()
            t = timed(["rsync", "--inplace", "--no-whole-file", "-I", "-B", "4096", str(src), rsyncd.url("full.img")])
            rows.append(("1% changed", "rsync --inplace --no-whole-file -I -B 4096 + sync", t,
                         file_hash(rsyncd.dest / "full.img") == changed_hash))  # fmt: skip
        finally:
            rsyncd.stop()
            (work / "cp.img").unlink(missing_ok=True)
            shutil.rmtree(rsyncd.dest, ignore_errors=True)

    print(
        f"\n{args.size_mib} MiB image, page cache " + ("dropped before each run" if cold else "NOT dropped (no root)")
    )
    print(f"{'work':<11} {'tool':<50} {'seconds':>8} {'peer / opensmc':>15}  ok")
    for kind, tool, secs, ok in rows:
        ref = next(s for k, t, s, _ in rows if k == kind and t.startswith("opensmc"))
        print(f"{kind:<11} {tool:<50} {secs:8.2f} {secs / ref:14.2f}x  {'✓' if ok else '✗'}")

    # CPU time, unlike seconds, hardly moves with what else the machine runs: compare it across runs.
    def cpu_text(c: list[float]) -> str:
        return f"{c[0] + c[1]:.2f} ({c[0]:.2f} user) + {c[2] + c[3]:.2f} ({c[2]:.2f} user)"

    print(f"CPU seconds, server + agent: full {cpu_text(cpu_full)}, "
          f"incremental {cpu_text(cpu_inc)}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"Processing per run: {', '.join(f'{p:.3f} s' for p in processing)}")
    print(f"peak memory: server {server_peak:.0f} MiB, agent {agent_peak:.0f} MiB")
    print(f"image store: {space_one / MiB:.0f} MiB after one image, {space_two / MiB:.0f} MiB after two "
          f"({space_two / max(space_one, 1):.2f}x)")  # fmt: skip
    if not all(r[3] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
