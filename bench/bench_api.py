"""Control-plane benchmark: signed SMC API requests per second, against a bare Starlette endpoint.

Starts real processes on loopback and measures, in the same run:

- **bare**: a Starlette app with one route that answers a fixed JSON body, on
  uvicorn with the same settings as ``opensmc server`` (the ceiling of this
  stack on this machine);
- **signed DescribeSourceServers**: ``opensmc server`` (API role only, so no
  orchestrator pass competes), every request V1-signed (HMAC-SHA1) with a
  fresh ``SignatureNonce``, so every one is verified, its nonce recorded in
  the database, and the sources listed; on SQLite and on PostgreSQL;
- **DescribeReplicationJobs p50/p99** with 100, 1,000 and 10,000 jobs in the
  account (rows inserted straight into the database: the API limits an
  account to 1,000 jobs), one client, PageSize 50, unfiltered and filtered by
  Status; on PostgreSQL also after ``VACUUM ANALYZE jobs`` (what autovacuum
  does within a minute of the insert: until then the count's index-only scan
  reads every new row's heap page).

- with ``--processes N`` (N > 1), the same signed load on PostgreSQL spread
  over N ``opensmc server --roles api`` processes sharing one database (one
  ``wrk`` per process, the connections split between them), summed.
- with ``--cpu-share S`` too, how the rate grows with the number of
  processes when each has the same CPU: 1, 2, ... N processes, each in a
  cgroup of its own capped at S of one CPU (cgroup v2 ``cpu.max`` or v1
  ``cpu.cfs_quota_us``; needs root), and each rate against one process's.
  Unconfined, N processes cannot show N times one on a machine with fewer
  than N + 1 cores (one process already fills a core, PostgreSQL and wrk
  share the rest); capped, what they show is whether anything they share
  (the database, the nonce table) holds them back. Choose S so that N of
  them, PostgreSQL and wrk fit the machine: about 1.7 S of CPU each.

The load generator is ``wrk`` (Debian package ``wrk``): the signed requests
are made beforehand (one per nonce, never reused) and a Lua script hands each
out once; a run that got any non-2xx answer (a replay would) is reported as
failed. Each rate comes with the CPU time the server process(es) spent per
request (user + system, from ``/proc``) and the load average: on a shared
machine the rate depends on what else runs, the CPU per request much less.
Every figure is printed; nothing here is a test threshold.

    python bench/bench_api.py [--seconds 10] [--connections 32] [--processes 2] [--cpu-share 0.3]
                              [--pg postgresql://postgres@127.0.0.1:5432/test] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, make_url, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from opensmc import API_VERSION  # noqa: E402
from opensmc.signer import sign_v1  # noqa: E402
from opensmc.store.tables import jobs  # noqa: E402

OPENSMC = [sys.executable, "-m", "opensmc.cli.main"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

BARE_APP = textwrap.dedent(
    """
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    BODY = {"RequestId": "0", "TotalCount": 0, "PageNumber": 1, "PageSize": 10, "SourceServers": {"SourceServer": []}}

    async def ok(request):
        return JSONResponse(BODY)

    app = Starlette(routes=[Route("/", ok, methods=["GET", "POST"])])
    # The settings opensmc server gives uvicorn (cli/server.py).
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                loop="auto", http="auto")
    """
)

LUA = textwrap.dedent(
    """
    -- Each thread takes every Nth line of the file of pre-signed paths: no path is sent twice.
    local threads = {}
    local counter = 0
    function setup(thread)
      thread:set("tid", counter)
      counter = counter + 1
      table.insert(threads, thread)
    end
    function init(args)
      local nthreads = tonumber(args[2])
      paths = {}
      local i = 0
      for line in io.lines(args[1]) do
        if i % nthreads == tid then table.insert(paths, line) end
        i = i + 1
      end
      idx = 0
    end
    function request()
      idx = idx + 1
      if idx > #paths then idx = 1 end  -- out of fresh nonces: replays, counted as non-2xx
      return wrk.format("GET", paths[idx])
    end
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {url}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wrk_args(url: str, paths: Path | None, seconds: int, connections: int, threads: int) -> list[str]:
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    if paths is not None:
        script = paths.with_suffix(".lua")
        script.write_text(LUA)
        args += ["-s", str(script), url, "--", str(paths), str(threads)]
    else:
        args.append(url)
    return args


def wrk(url: str, paths: Path | None, seconds: int, connections: int, threads: int) -> dict[str, float]:
    args = wrk_args(url, paths, seconds, connections, threads)
    return parse_wrk(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def parse_wrk(out: str) -> dict[str, float]:
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "rate": rate,
        "non2xx": float(bad.group(1)) if bad else 0.0,
        "p99_ms": float(p99.group(1)) * unit[p99.group(2)] if p99 else float("nan"),
    }


class CpuCap:
    """A cpu cgroup capped at ``share`` of one CPU, for one server process (removed by :meth:`remove`).

    Measured on cgroup v1 machines only; the v2 branch (``cpu.max``) follows the kernel's documentation."""

    PERIOD_US = 100_000

    def __init__(self, name: str, share: float) -> None:
        v2 = Path("/sys/fs/cgroup")
        if "cpu" in _read(v2 / "cgroup.controllers").split():
            if "cpu" not in _read(v2 / "cgroup.subtree_control").split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(share * self.PERIOD_US)} {self.PERIOD_US}")
        else:
            self.path = Path("/sys/fs/cgroup/cpu") / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(share * self.PERIOD_US)))

    def enter(self) -> None:
        """Move the calling process here (a ``preexec_fn``: the server and its threads start inside)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def periods(self) -> tuple[int, int]:
        """(periods so far, periods in which the group used up its share and waited): cpu.stat."""
        stat = dict(line.split() for line in _read(self.path / "cpu.stat").splitlines() if line.strip())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def remove(self) -> None:
        for _ in range(50):  # the group's last process may still be exiting
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu_cap_problem() -> str | None:
    """Why a process cannot be capped here (None when it can)."""
    probe = f"opensmc-bench-probe-{os.getpid()}"
    try:
        CpuCap(probe, 0.5).remove()
    except OSError as exc:
        return f"no cpu cgroup can be made here ({exc}); --cpu-share needs root and a cpu controller"
    return None


class Server:
    def __init__(self, work: Path, database: str | None, data: Path | None = None, cap: CpuCap | None = None) -> None:
        # Processes that share a database share a data dir too (its master key opens the AccessKeys).
        self.data = data or work / f"data-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        db_args = ["--database", database] if database else []
        self.log = (work / f"server-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [*OPENSMC, "server", "--data-dir", str(self.data), "--listen", f"127.0.0.1:{self.port}",
             "--roles", "api", "--log-level", "warning", *db_args],
            env=ENV, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=cap.enter if cap else None,
        )  # fmt: skip
        try:
            wait_http(self.endpoint + "/healthz")
            creds = json.loads((self.data / "admin-credentials.json").read_text())
        except BaseException:  # no process of ours outlives the benchmark
            self.stop()
            raise
        self.key_id, self.secret = creds["access_key_id"], creds["access_key_secret"]
        self.db_url = database or f"sqlite:///{self.data / 'opensmc.db'}"

    def signed_path(self, action: str, params: dict[str, str]) -> str:
        return "/?" + sign_v1("GET", action, API_VERSION, params, self.key_id, self.secret)

    def account_id(self) -> str:
        engine = create_engine(_sa_url(self.db_url))
        with engine.connect() as conn:
            account = conn.execute(
                text("SELECT account_id FROM access_keys WHERE id = :k"), {"k": self.key_id}
            ).scalar_one()
        engine.dispose()
        return str(account)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def _sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def add_jobs(server: Server, account: str, start: int, stop: int) -> None:
    """Insert jobs start..stop-1 (a mix of statuses) straight into the database."""
    engine = create_engine(_sa_url(server.db_url))
    now = datetime.now(UTC)
    statuses = ["Ready", "Waiting", "Finished", "Stopped", "InError"]
    rows = [
        {
            "id": f"j-bench{i:010d}",
            "account_id": account,
            "source_id": f"s-bench{i % 50:05d}",
            "name": f"job-{i}",
            "region_id": "local",
            "status": statuses[i % len(statuses)],
            "created_at": now - timedelta(seconds=i),
            "valid_time": now + timedelta(days=30),
        }
        for i in range(start, stop)
    ]
    with engine.begin() as conn:
        for k in range(0, len(rows), 1000):
            conn.execute(insert(jobs), rows[k : k + 1000])
    engine.dispose()


def vacuum_jobs(server: Server) -> None:
    """``VACUUM ANALYZE jobs`` on PostgreSQL (outside a transaction, as VACUUM must be)."""
    engine = create_engine(_sa_url(server.db_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
    engine.dispose()


def latency(server: Server, params: dict[str, str], n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of n sequential signed requests on one keep-alive connection."""
    times: list[float] = []
    with httpx.Client(base_url=server.endpoint) as client:
        for i in range(n + 20):
            path = server.signed_path("DescribeReplicationJobs", params)
            t0 = time.perf_counter()
            r = client.get(path)
            dt = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"DescribeReplicationJobs: {r.status_code} {r.text[:300]}")
            if i >= 20:  # the first ones warm the caches and the pool
                times.append(dt)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def write_paths(server: Server, paths: Path, count: int) -> None:
    with paths.open("w") as f:
        for _ in range(count):
            f.write(server.signed_path("DescribeSourceServers", {"RegionId": "local"}) + "\n")


def signed_rate(
    servers: list[Server], work: Path, args: argparse.Namespace, at_start: Callable[[], object] = lambda: None
) -> dict[str, float]:
    """Signed requests/s over all ``servers`` (one wrk each, connections split), and server CPU per request.

    ``at_start`` is called right before the timed load starts (after the warm-up)."""
    # Enough fresh nonces for 4x the target rate for the whole run: never a replay.
    count = max(20_000, 8_000 * args.seconds) // len(servers)
    conns = max(2, args.connections // len(servers))
    files = [work / f"paths-{s.port}.txt" for s in servers]
    for server, paths in zip(servers, files, strict=True):
        write_paths(server, paths, count)
    for server, paths in zip(servers, files, strict=True):  # warm-up (its nonces are used up)
        wrk(server.endpoint, paths, 2, conns, args.threads)
    for server, paths in zip(servers, files, strict=True):
        write_paths(server, paths, count)
    at_start()
    cpu0 = [cpu_seconds(s.proc.pid) for s in servers]
    runs = [
        subprocess.Popen(wrk_args(s.endpoint, p, args.seconds, conns, args.threads), stdout=subprocess.PIPE, text=True)
        for s, p in zip(servers, files, strict=True)
    ]
    results = [parse_wrk(r.communicate()[0]) for r in runs]
    cpu = sum(cpu_seconds(s.proc.pid) for s in servers) - sum(cpu0)
    rate = sum(r["rate"] for r in results)
    return {
        "rate": rate,
        "non2xx": sum(r["non2xx"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "cpu_ms": cpu / max(1.0, rate * args.seconds) * 1000,
    }


def rate_text(r: dict[str, float], note: str) -> str:
    """One signed-rate line after its label: rate, p99, CPU per request, ``note`` and the load."""
    flag = "" if r["non2xx"] == 0 else f"  FAILED: {int(r['non2xx'])} non-2xx answers"
    return (
        f"{r['rate']:8.0f} req/s  p99 {r['p99_ms']:.1f} ms  server CPU {r['cpu_ms']:.3f} ms/request  "
        f"({note}; load {load_average()}){flag}"
    )


def report(kind: str, r: dict[str, float], bare: float) -> None:
    note = f"bare/signed = {bare / r['rate']:.1f}x"
    print(f"{kind:10s} signed DescribeSourceServers: {rate_text(r, note)}", flush=True)


def run_processes(database: str, work: Path, args: argparse.Namespace, bare: float) -> None:
    """The signed rate with ``args.processes`` API processes on one PostgreSQL database."""
    first = Server(work, database)
    servers = [first, *(Server(work, database, first.data) for _ in range(args.processes - 1))]
    try:
        report(f"PG x{args.processes}", signed_rate(servers, work, args), bare)
        once = first.signed_path("DescribeSourceServers", {"RegionId": "local"})
        answers = [httpx.get(s.endpoint + once) for s in servers]
        refused = all(a.status_code == 400 and "SignatureNonceUsed" in a.text for a in answers[1:])
        print(
            f"PG x{args.processes} one request sent to every process: first {answers[0].status_code}, "
            f"{'every other refused (SignatureNonceUsed)' if refused else 'REPLAY ACCEPTED'}",
            flush=True,
        )
    finally:
        for s in servers:
            s.stop()


def _mark_periods(caps: list[CpuCap], into: list[tuple[int, int]]) -> None:
    into.extend(c.periods() for c in caps)


def run_capped(database: str, work: Path, args: argparse.Namespace) -> None:
    """The signed rate of 1, 2, ... ``args.processes`` API processes on one database, each capped alike."""
    one = 0.0
    data: Path | None = None  # the first server's, kept for every later one (its key opens the AccessKeys)
    for n in range(1, args.processes + 1):
        caps = [CpuCap(f"opensmc-bench-{os.getpid()}-{n}-{i}", args.cpu_share) for i in range(n)]
        servers: list[Server] = []
        try:
            for cap in caps:
                servers.append(Server(work, database, data, cap))
                data = servers[0].data
            before: list[tuple[int, int]] = []
            r = signed_rate(servers, work, args, functools.partial(_mark_periods, caps, before))
            after = [c.periods() for c in caps]
            periods = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
            capped = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / max(1, periods)
            one = one or r["rate"]
            note = f"{r['rate'] / one:.2f}x one capped process; share used up in {capped:.0%} of the periods"
            print(f"PG x{n} capped at {args.cpu_share:g} CPU each: {rate_text(r, note)}", flush=True)
        finally:
            for s in servers:
                s.stop()
            for cap in caps:
                cap.remove()


def run_db(kind: str, database: str | None, work: Path, args: argparse.Namespace, bare: float) -> None:
    server = Server(work, database)
    try:
        report(kind, signed_rate([server], work, args), bare)
        account = server.account_id()
        have = 0
        for target in (100, 1_000, 10_000):
            add_jobs(server, account, have, target)
            have = target
            for when in ("", " vacuumed") if database else ("",):
                if when:
                    # What autovacuum does within a minute of a bulk insert: until then PostgreSQL's
                    # index-only count visits every new row's heap page (10,000 jobs: 4.6 against 1.0 ms).
                    vacuum_jobs(server)
                p50, p99 = latency(server, {"RegionId": "local", "PageSize": "50"}, args.samples)
                f50, f99 = latency(server, {"RegionId": "local", "PageSize": "50", "Status": "Finished"}, args.samples)
                print(
                    f"{kind:10s} DescribeReplicationJobs at {target:6d} jobs{when}: p50 {p50:5.1f} ms  "
                    f"p99 {p99:5.1f} ms; Status=Finished p50 {f50:5.1f} ms  p99 {f99:5.1f} ms",
                    flush=True,
                )
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=300, help="requests per DescribeReplicationJobs latency figure")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL server to create a scratch database on ('skip' for SQLite only)")  # fmt: skip
    ap.add_argument("--processes", type=int, default=1, help="also measure this many API processes on PostgreSQL")
    ap.add_argument("--cpu-share", type=float, default=None,
                    help="also measure 1..N API processes on PostgreSQL, each held to this share of a CPU")  # fmt: skip
    ap.add_argument("--dir", type=Path, default=None, help="where the data dirs go (default: a temporary directory)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench_api: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.cpu_share is not None:
        problem = cpu_cap_problem()
        if problem:
            print(f"bench_api: {problem}", file=sys.stderr)
            return 2
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="osmc-api-bench-", dir=args.dir))
    port = free_port()
    bare_proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)], env=ENV)
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        wrk(f"http://127.0.0.1:{port}/", None, 2, args.connections, args.threads)
        bare = wrk(f"http://127.0.0.1:{port}/", None, args.seconds, args.connections, args.threads)
        print(
            f"bare Starlette endpoint:           {bare['rate']:8.0f} req/s  p99 {bare['p99_ms']:.1f} ms  "
            f"(load {load_average()})",
            flush=True,
        )
    finally:
        bare_proc.terminate()
        bare_proc.wait()
    run_db("SQLite", None, work, args, bare["rate"])
    if args.pg != "skip":
        admin = create_engine(_sa_url(args.pg), isolation_level="AUTOCOMMIT")
        names = [f"opensmc_bench_{os.getpid()}", f"opensmc_bench_{os.getpid()}_n", f"opensmc_bench_{os.getpid()}_c"]
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            urls = [make_url(args.pg).set(database=n).render_as_string(hide_password=False) for n in names]
            run_db("PostgreSQL", urls[0], work, args, bare["rate"])
            if args.processes > 1:
                run_processes(urls[1], work, args, bare["rate"])
            if args.cpu_share is not None:
                run_capped(urls[2], work, args)
        finally:
            with admin.connect() as conn:
                for name in names:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
