"""Steps shared by the migration end-to-end tests: agents, jobs, waiting, reading results.

Jobs are created and started with ``opensmc call`` (the CLI a user runs);
polling goes through the same signed request in-process (``opensmc.cli.call.invoke``)
because a process per poll would cost more than the waits themselves. Run
details that the API does not expose (job_runs.detail, checksum_verified,
jobs.next_run_at, the test-time hook for incremental runs) are read from or
written to the server's SQLite database, ``<data-dir>/opensmc.db``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from opensmc.chunkstore.staging import StagingError, StagingIndex
from opensmc.cli.call import invoke
from opensmc.cli.credentials import ClientCredentials
from opensmc.images.store import ImageStore
from tests.e2e.conftest import OPENSMC, ServerProcess, clean_env, start_server, stop

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 60.0, what: str = "condition", every: float = 0.2
) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


def api(server: ServerProcess, action: str, **params: Any) -> dict[str, Any]:
    """One signed API call in-process; raises on an error answer."""
    creds = ClientCredentials(**server.credentials)
    status, body = invoke(creds, action, {k.replace("__", "."): str(v) for k, v in params.items()})
    if status >= 400:
        raise AssertionError(f"{action} failed: HTTP {status} {body}")
    return dict(body)


def start_migration_server(
    tmp_path: Path, *extra: str, port: int | None = None, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    # Heartbeats every second so tasks reach the agent fast; a grace long enough that a
    # server restart in the middle of a test does not count as the agent going silent.
    return start_server(
        tmp_path / "data", "--heartbeat-grace", "30", "--heartbeat-rate", "1", *extra, port=port, extra_env=extra_env
    )


class Agent:
    """An ``opensmc agent run`` process with explicit ``--disk`` files and a state dir."""

    def __init__(
        self,
        server: ServerProcess,
        token: dict[str, Any],
        disks: Sequence[Path],
        state: Path,
        extra: Sequence[str] = (),
    ) -> None:
        self.server = server
        self.token = token
        self.disks = list(disks)
        self.extra = list(extra)
        self.state = state
        self.log = state.parent / f"{state.name}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, server: ServerProcess | None = None) -> Agent:
        self.server = server or self.server
        args = [
            *OPENSMC,
            "agent",
            "run",
            "--server",
            self.server.endpoint,
            "--token-id",
            str(self.token["AccessTokenId"]),
            "--token-code",
            str(self.token["AccessTokenCode"]),
            "--state-dir",
            str(self.state),
        ]
        for d in self.disks:
            args += ["--disk", str(d)]
        args += self.extra
        self.proc = subprocess.Popen(
            args, stdout=self.log.open("a"), stderr=subprocess.STDOUT, text=True, env=clean_env()
        )
        return self

    def stop(self, sig_kill: bool = False) -> None:
        if self.proc is not None:
            stop(self.proc, sig_kill=sig_kill)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def register(server: ServerProcess, disks: Sequence[Path], state: Path, extra: Sequence[str] = ()) -> tuple[Agent, str]:
    """Start an agent for ``disks`` (``extra``: more agent options); returns it and its SourceId once Available."""
    token = server.call_json("CreateAccessToken", "--Name", f"e2e-{state.name}", "--Count", "2")
    agent = Agent(server, token, disks, state, extra).start()

    def available() -> str | None:
        found = api(server, "DescribeSourceServers")["SourceServers"]["SourceServer"]
        ok = [s for s in found if s["State"] == "Available"]
        return str(ok[0]["SourceId"]) if ok else None

    try:
        return agent, wait_for(available, 30, "source Available")
    except AssertionError:
        agent.stop()
        raise AssertionError(agent.log_text()) from None


def create_job(server: ServerProcess, source_id: str, name: str, *params: str) -> str:
    body = server.call_json(
        "CreateReplicationJob", "--RegionId", "local", "--SourceId", source_id, "--Name", name, *params
    )
    return str(body["JobId"])


def describe(server: ServerProcess, job_id: str) -> dict[str, Any]:
    body = api(server, "DescribeReplicationJobs", JobId__1=job_id)
    jobs = body["ReplicationJobs"]["ReplicationJob"]
    assert len(jobs) == 1, body
    return dict(jobs[0])


def wait_status(
    server: ServerProcess, job_id: str, status: str, business: str | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    seen: list[str] = []

    def check() -> dict[str, Any] | None:
        job = describe(server, job_id)
        state = f"{job['Status']}/{job['BusinessStatus']}"
        if not seen or seen[-1] != state:
            seen.append(state)
        if job["Status"] == "InError" and status != "InError":
            raise AssertionError(f"job failed: {job['ErrorCode']} {job['StatusInfo']} (states {seen})")
        if job["Status"] == status and (business is None or job["BusinessStatus"] == business):
            return job
        return None

    try:
        return wait_for(check, timeout, f"{job_id} {status}/{business}", every=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; states seen {seen}") from None


# the server's database and data dir ---------------------------------------------------------


def db(server: ServerProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(server.data_dir / "opensmc.db", timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def runs(server: ServerProcess, job_id: str) -> list[sqlite3.Row]:
    with db(server) as conn:
        return list(conn.execute("SELECT * FROM job_runs WHERE job_id=? ORDER BY id", (job_id,)))


def agent_stats(run: sqlite3.Row) -> dict[str, Any]:
    return dict(json.loads(run["detail"] or "{}").get("agent") or {})


def images_of(server: ServerProcess, job_id: str) -> list[sqlite3.Row]:
    with db(server) as conn:
        return list(conn.execute("SELECT * FROM images WHERE job_id=? ORDER BY created_at, id", (job_id,)))


def make_due(server: ServerProcess, job_id: str) -> None:
    """The test-time hook: the next incremental run is due now, not in Frequency hours."""
    with db(server) as conn:
        conn.execute("UPDATE jobs SET next_run_at='2000-01-01 00:00:00' WHERE id=?", (job_id,))


def store(server: ServerProcess) -> ImageStore:
    return ImageStore(server.data_dir / "store")


def disk_shas(server: ServerProcess, image_id: str) -> list[str]:
    """Each disk's SHA-256, computed from the image's blobs (every one re-hashed on the way)."""
    report = store(server).verify(image_id)
    assert report.ok, report
    return report.sha256


def export(server: ServerProcess, image_id: str, disk_index: int, out: Path) -> Path:
    store(server).export(image_id, disk_index, "raw", out)
    return out


def staging_dirs(server: ServerProcess, transition_instance_id: str) -> list[Path]:
    """The job's staging index files (one per disk)."""
    root = server.data_dir / "staging"
    return sorted(root.glob(f"{transition_instance_id}-d*.fidx")) if root.exists() else []


def staging_bytes(server: ServerProcess, transition_instance_id: str) -> int:
    """Bytes of data the receiver holds durably for the job (chunks its staging indexes name)."""
    total = 0
    for path in staging_dirs(server, transition_instance_id):
        try:
            disk = StagingIndex.read_disk(path)
        except (FileNotFoundError, StagingError):  # released or being replaced
            continue
        total += int(disk.nonzero().size) * disk.chunk_size
    return total


__all__ = [
    "Agent",
    "agent_stats",
    "api",
    "create_job",
    "db",
    "describe",
    "disk_shas",
    "export",
    "images_of",
    "make_due",
    "register",
    "runs",
    "staging_bytes",
    "staging_dirs",
    "start_migration_server",
    "start_server",
    "stop",
    "store",
    "wait_for",
    "wait_status",
]
