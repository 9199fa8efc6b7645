"""Load: many concurrent migrations of small disks through two receiver hosts, against rsync in the same run.

The installation of docs/operations.md "Several hosts", on one machine: network
namespaces on a bridge as the hosts (``tests/netns.py``), PostgreSQL of the
root namespace through a forwarder, one shared data directory (the stand-in for
the shared filesystem: staging indexes, master key, image store).

- host ``api``: ``opensmc server --roles api,orchestrator``;
- hosts ``recv1``, ``recv2``: ``opensmc server --roles receiver``;
- hosts ``src0`` … ``srcN``: the agents, ``opensmc agent run --disk`` processes,
  several per host, one small disk each (random data in the middle, zeros around).

Through the official SDK (``alibabacloud-smc20190601``) it creates one job per
source and starts them all, then waits until every one is Finished. It reports
the time from each job's StartReplicationJob to Finished (min / median / max,
from the job's event log), how the runs were placed on the two receivers, the
peak RSS (VmHWM) of each receiver and of the API process, and proves every
image byte-identical to its disk (exported from the store, SHA-256).

The peer, in the same run: the same disks copied by ``rsync --whole-file
--sparse`` from the same source hosts to an rsync daemon on each receiver host
(half each), all at once; its makespan and the ratio are printed. rsync makes
plain files and keeps no history; it is the floor of "copy these bytes there".

    python bench/bench_load.py [--migrations 200] [--hosts 10] [--size-mib 32] [--data-mib 4] [--dir /var/tmp/osmc-load]

Needs root (network namespaces), socat, rsync and PostgreSQL at
OPENSMC_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test; a
database of its own is created and dropped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import create_engine, make_url, text  # noqa: E402
from tests import netns  # noqa: E402
from tests.e2e.multihost import RECEIVER_PORT, Installation  # noqa: E402

from opensmc.images.store import ImageStore  # noqa: E402
from opensmc.store.db import normalize_url  # noqa: E402

MiB = 1 << 20
PG_URL = os.environ.get("OPENSMC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def build_disks(work: Path, n: int, size: int, data: int) -> list[Path]:
    disks = []
    for i in range(n):
        p = work / f"disk{i:03d}.img"
        if not (p.exists() and p.stat().st_size == size):
            rnd = random.Random(1000 + i)
            with p.open("wb") as f:
                f.truncate(size)
                f.seek((size - data) // 2)
                f.write(rnd.randbytes(data))
        disks.append(p)
    return disks


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spread(values: list[float]) -> str:
    return f"min {min(values):.1f} s, median {statistics.median(values):.1f} s, max {max(values):.1f} s"


class Sdk:
    def __init__(self, endpoint: str, creds: dict[str, str]) -> None:
        from alibabacloud_smc20190601 import models
        from alibabacloud_smc20190601.client import Client
        from alibabacloud_tea_openapi import models as api_models

        self.models = models
        cfg = api_models.Config(
            access_key_id=creds["access_key_id"],
            access_key_secret=creds["access_key_secret"],
            endpoint=endpoint,
            protocol="http",
            read_timeout=60_000,
            connect_timeout=10_000,
        )
        self.client = Client(cfg)

    def token(self, count: int) -> dict[str, Any]:
        body = self.client.create_access_token(self.models.CreateAccessTokenRequest(name="load", count=count)).body
        return {"AccessTokenId": body.access_token_id, "AccessTokenCode": body.access_token_code}

    def available_sources(self) -> list[str]:
        out: list[str] = []
        page = 1
        while True:
            req = self.models.DescribeSourceServersRequest(page_number=page, page_size=50)
            body = self.client.describe_source_servers(req).body
            items = body.source_servers.source_server or []
            out += [str(s.source_id) for s in items if s.state == "Available"]
            if len(items) < 50:
                return sorted(set(out))  # pages of a listing that changes meanwhile may overlap
            page += 1

    def jobs(self) -> list[Any]:
        out: list[Any] = []
        page = 1
        while True:
            req = self.models.DescribeReplicationJobsRequest(page_number=page, page_size=50)
            items = self.client.describe_replication_jobs(req).body.replication_jobs.replication_job or []
            out += items
            if len(items) < 50:
                return list({j.job_id: j for j in out}.values())
            page += 1

    def create_and_start(self, source_id: str, name: str) -> str:
        req = self.models.CreateReplicationJobRequest(region_id="local", source_id=source_id, name=name)
        job_id = str(self.client.create_replication_job(req).body.job_id)
        self.client.start_replication_job(self.models.StartReplicationJobRequest(job_id=job_id))
        return job_id


def wait(probe: Any, timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def run_opensmc(inst: Installation, args: argparse.Namespace, disks: list[Path], work: Path) -> dict[str, Any]:
    server = inst.server("api", "api,orchestrator", "--heartbeat-rate", "10", "--heartbeat-grace", "300")
    receivers = [inst.server(h, "receiver", "--log-level", "warning") for h in ("recv1", "recv2")]
    # More orchestrators, if asked, on the receiver hosts (they share the data dir and the database).
    for k in range(args.orchestrators - 1):
        inst.server(("recv1", "recv2")[k % 2], "orchestrator", "--log-level", "warning")
    sdk = Sdk(server.endpoint.removeprefix("http://"), server.credentials)
    token = sdk.token(len(disks) + 10)
    print(f"starting {len(disks)} agents on {args.hosts} hosts ...", flush=True)
    t0 = time.monotonic()
    (work / "agents").mkdir(exist_ok=True)
    # In batches: 200 Python processes starting at once on 2 cores starve the API for so long that
    # registrations time out on the agent's side (see docs/performance.md).
    for start in range(0, len(disks), args.start_batch):
        for i in range(start, min(start + args.start_batch, len(disks))):
            inst.agent(f"src{i % args.hosts}", server, token, disks[i], work / "agents" / f"a{i:03d}")
        n = min(start + args.start_batch, len(disks))
        wait(lambda n=n: len(sdk.available_sources()) >= n, 600, f"{n} agents registered", 1.0)
    sources = wait(lambda: (s := sdk.available_sources()) and len(s) == len(disks) and s, 600, "every agent", 2.0)
    print(
        f"{len(sources)} sources Available after {time.monotonic() - t0:.0f} s; starting {len(sources)} jobs",
        flush=True,
    )
    t_start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        job_ids = list(pool.map(lambda p: sdk.create_and_start(p[1], f"load-{p[0]}"), enumerate(sources)))

    def all_done() -> bool:
        jobs = sdk.jobs()
        failed = [j for j in jobs if j.status == "InError"]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) failed, e.g. {failed[0].job_id}: {failed[0].error_code}")
        return sum(j.status == "Finished" for j in jobs) == len(job_ids)

    wait(all_done, 3600, "every job Finished", 2.0)
    makespan = time.monotonic() - t_start
    rss = {
        "receivers_mib": [round(vm_hwm_mib(r.proc.pid)) for r in receivers],
        "api_mib": round(vm_hwm_mib(server.proc.pid)),
    }
    engine = create_engine(normalize_url(inst.pg_url))
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT job_id, MIN(at) FILTER (WHERE event = 'start') AS started, "
                "MIN(at) FILTER (WHERE to_business = 'Syncing') AS syncing, "
                "MIN(at) FILTER (WHERE to_business = 'Processing') AS processing, "
                "MAX(at) FILTER (WHERE to_status = 'Finished') AS finished FROM job_events GROUP BY job_id"
            )
        ).all()
        times = [(r.finished - r.started).total_seconds() for r in rows]
        phases = {
            "Preparing": [(r.syncing - r.started).total_seconds() for r in rows],
            "Syncing": [(r.processing - r.syncing).total_seconds() for r in rows],
            "Processing+Cleaning": [(r.finished - r.processing).total_seconds() for r in rows],
        }
        # The receiver each run was placed on (kept on the job after it finished).
        placed = {str(r[0]): int(r[1]) for r in conn.execute(text("SELECT receiver, count(*) FROM jobs GROUP BY 1"))}
        disk_of = {r.id: json.loads(r.disks)[0]["path"] for r in conn.execute(text("SELECT id, disks FROM sources"))}
        image_of = {r.source_id: r.image_id for r in conn.execute(text("SELECT source_id, image_id FROM jobs"))}
    engine.dispose()
    print("verifying every image against its disk ...", flush=True)
    store = ImageStore(inst.data / "store")
    out = work / "export.img"
    bad = []
    for source_id, image_id in image_of.items():
        store.export(image_id, 0, "raw", out)
        if sha(out) != sha(Path(disk_of[source_id])):
            bad.append(image_id)
    out.unlink(missing_ok=True)
    inst.stop_all()
    inst.procs.clear()
    return {
        "makespan": makespan,
        "times": times,
        "phases": phases,
        "rss": rss,
        "placed": placed,
        "bad": bad,
        "n": len(image_of),
    }


def run_rsync(inst: Installation, args: argparse.Namespace, disks: list[Path], work: Path) -> dict[str, Any]:
    daemons = []
    dests = []
    for h in ("recv1", "recv2"):
        dest = work / f"rsync-{h}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        conf = work / f"rsyncd-{h}.conf"
        module = f"[bench]\npath = {dest}\nread only = no\nuid = root\ngid = root\n"
        conf.write_text(f"use chroot = no\nmax connections = 0\n{module}")
        cmd = ["rsync", "--daemon", "--no-detach", f"--address={inst.hosts.addr(h)}", f"--port={RECEIVER_PORT}"]
        daemons.append(subprocess.Popen(inst.hosts.cmd(h, [*cmd, f"--config={conf}"])))
        dests.append((h, dest))
    time.sleep(1.0)
    try:
        t0 = time.monotonic()
        procs = []
        for i, disk in enumerate(disks):
            h, _dest = dests[i % 2]
            url = f"rsync://{inst.hosts.addr(h)}:{RECEIVER_PORT}/bench/{disk.name}"
            argv = ["rsync", "--whole-file", "--sparse", str(disk), url]
            procs.append((time.monotonic(), subprocess.Popen(inst.hosts.cmd(f"src{i % args.hosts}", argv))))
        times = []
        for started, p in procs:
            if p.wait() != 0:
                raise SystemExit(f"rsync failed: {p.args}")
            times.append(time.monotonic() - started)
        subprocess.run(["sync"], check=True)
        makespan = time.monotonic() - t0
    finally:
        for d in daemons:
            d.terminate()
            d.wait(10)
    bad = [d.name for i, d in enumerate(disks) if sha(dests[i % 2][1] / d.name) != sha(d)]
    for _h, dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
    return {"makespan": makespan, "times": times, "bad": bad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrations", type=int, default=200)
    ap.add_argument("--hosts", type=int, default=10, help="source hosts (namespaces) the agents are spread over")
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--data-mib", type=int, default=4, help="random data in each disk (the rest is zeros)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/osmc-load"))
    ap.add_argument("--orchestrators", type=int, default=1, help="orchestrator processes (the first with the API)")
    ap.add_argument("--start-batch", type=int, default=25, help="agents started at once (each batch registers first)")
    args = ap.parse_args()
    why = netns.probe()
    if why:
        raise SystemExit(f"cannot make the hosts: {why}")
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("shared", "agents"):
        shutil.rmtree(work / sub, ignore_errors=True)
    disks = build_disks(work, args.migrations, args.size_mib * MiB, args.data_mib * MiB)
    admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
    name = f"opensmc_load_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    pg_url = make_url(normalize_url(PG_URL)).set(database=name).render_as_string(hide_password=False)
    pg = make_url(pg_url)
    names = ["api", "recv1", "recv2", *(f"src{i}" for i in range(args.hosts))]
    try:
        with netns.hosts(names) as hosts:
            inst = Installation(hosts, work / "shared", pg_url, hosts.forward(pg.port or 5432, pg.host or ""))
            inst.data.mkdir()
            try:
                osmc = run_opensmc(inst, args, disks, work)
                peer = run_rsync(inst, args, disks, work)
            finally:
                inst.stop_all()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    n = args.migrations
    print()
    print(f"{n} migrations of {args.size_mib} MiB disks ({args.data_mib} MiB of data each) from {args.hosts} hosts")
    who = f"2 receivers, {args.orchestrators} orchestrator(s)"
    print(f"  opensmc, {who}: all Finished in {osmc['makespan']:.1f} s; per job {spread(osmc['times'])}")
    for phase, values in osmc["phases"].items():
        print(f"    {phase}: {spread(values)}")
    print(f"    runs per receiver: {osmc['placed']}")
    print(f"    peak RSS: receivers {osmc['rss']['receivers_mib']} MiB, API+orchestrator {osmc['rss']['api_mib']} MiB")
    print(f"    byte-identical: {osmc['n'] - len(osmc['bad'])}/{osmc['n']}")
    print(f"  rsync --whole-file --sparse, 2 daemons: {peer['makespan']:.1f} s; per copy {spread(peer['times'])}")
    print(f"    byte-identical: {n - len(peer['bad'])}/{n}")
    print(f"  ratio (opensmc / rsync, all done): {osmc['makespan'] / peer['makespan']:.2f}")
    if osmc["bad"] or peer["bad"] or osmc["n"] != n:
        raise SystemExit("some copies differ from their disks")


if __name__ == "__main__":
    main()
