"""Friendly views over the API: `opensmc jobs`, `opensmc sources`, `opensmc watch JOB`.

They call the same signed SMC actions as `opensmc call` (DescribeReplicationJobs,
DescribeSourceServers) and render tables with rich; `watch` follows one job
with a live progress bar, bytes done of total, rate and ETA (the latest
ReplicationJobRun's BytesDone, BytesTotal, BytesPerSecond, EtaSeconds) until
it stops running.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from opensmc.cli.call import invoke
from opensmc.cli.credentials import ClientCredentials, CredentialsError, load

#: statuses after which `watch` stops following a job
SETTLED = ("Finished", "InError", "Stopped", "Waiting", "Expired", "Ready")


class ViewError(Exception):
    pass


def add_arguments(sub: Any) -> None:
    for name, text in (("jobs", "list replication jobs"), ("sources", "list migration sources")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--credentials", default=None)
        p.add_argument("--endpoint", default=None)
    p = sub.add_parser("watch", help="follow a replication job with a live progress bar")
    p.add_argument("job_id")
    p.add_argument("--credentials", default=None)
    p.add_argument("--endpoint", default=None)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")


def _all(creds: ClientCredentials, action: str, wrapper: str, item: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        status, body = invoke(creds, action, {"PageNumber": str(page), "PageSize": "50"})
        if status >= 400:
            raise ViewError(f"{body.get('Code')}: {body.get('Message')} (RequestId {body.get('RequestId')})")
        items = body[wrapper][item]
        out.extend(items)
        if not items or len(out) >= int(body.get("TotalCount", 0)):
            return out
        page += 1


def _job(creds: ClientCredentials, job_id: str) -> dict[str, Any]:
    status, body = invoke(creds, "DescribeReplicationJobs", {"JobId.1": job_id})
    if status >= 400:
        raise ViewError(f"{body.get('Code')}: {body.get('Message')} (RequestId {body.get('RequestId')})")
    found = body["ReplicationJobs"]["ReplicationJob"]
    if not found:
        raise ViewError(f"no replication job {job_id}")
    return dict(found[0])


def _state(job: dict[str, Any]) -> str:
    return f"{job['Status']}/{job['BusinessStatus']}" if job.get("BusinessStatus") else str(job["Status"])


def show_jobs(creds: ClientCredentials, console: Console) -> None:
    table = Table("JobId", "Name", "SourceId", "Status", "Progress", "ImageId", "Error")
    for j in _all(creds, "DescribeReplicationJobs", "ReplicationJobs", "ReplicationJob"):
        table.add_row(
            j["JobId"], j["Name"], j["SourceId"], _state(j), f"{j['Progress']:.1f}%", j["ImageId"], j["ErrorCode"]
        )
    console.print(table)


def show_sources(creds: ClientCredentials, console: Console) -> None:
    table = Table("SourceId", "Name", "State", "Platform", "Disks", "JobId", "Error")
    for s in _all(creds, "DescribeSourceServers", "SourceServers", "SourceServer"):
        disks = s.get("Disks") or {}
        sizes = [str((disks.get("System") or {}).get("Size", "?"))]
        sizes += [str(d.get("Size", "?")) for d in ((disks.get("Data") or {}).get("Data") or [])]
        table.add_row(
            s["SourceId"], s["Name"], s["State"], s["Platform"], " + ".join(sizes) + " GiB", s["JobId"], s["ErrorCode"]
        )
    console.print(table)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_line(job: dict[str, Any]) -> str:
    """Bytes done of total, rate and ETA of the job's latest run ("" before it has bytes)."""
    runs = (job.get("ReplicationJobRuns") or {}).get("ReplicationJobRun") or []
    if not runs or not runs[-1].get("BytesTotal"):
        return ""
    run = runs[-1]
    parts = [f"{_bytes(float(run['BytesDone']))} of {_bytes(float(run['BytesTotal']))}"]
    rate = float(run.get("BytesPerSecond") or 0)
    if rate > 0:
        parts.append(f"{_bytes(rate)}/s")
    eta = float(run.get("EtaSeconds", -1))
    if eta >= 0 and not run.get("EndTime") and job.get("BusinessStatus") == "Syncing":
        parts.append(f"ETA {_duration(eta)}")
    return ", ".join(parts)


def watch(creds: ClientCredentials, job_id: str, interval: float, console: Console) -> int:
    job = _job(creds, job_id)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"{job_id} {_state(job)}", total=100, detail="")
        while True:
            bar.update(
                task,
                completed=float(job["Progress"]),
                description=f"{job_id} {_state(job)}",
                detail=run_line(job),
            )
            if job["Status"] in SETTLED and not (job["Status"] == "Ready" and job.get("ScheduledStartTime")):
                break
            time.sleep(interval)
            job = _job(creds, job_id)
    line = run_line(job)
    console.print(
        f"{job_id}: {_state(job)}"
        + (f", image {job['ImageId']}" if job["ImageId"] else "")
        + (f" ({line})" if line else "")
    )
    if job["Status"] == "InError":
        console.print(f"[red]{job['ErrorCode']}[/red]: {job['StatusInfo']}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        creds = load(args.credentials, args.endpoint)
        if args.command == "jobs":
            show_jobs(creds, console)
        elif args.command == "sources":
            show_sources(creds, console)
        else:
            return watch(creds, args.job_id, args.interval, console)
    except (CredentialsError, ViewError) as exc:
        print(f"opensmc {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CredentialsError) else 1
    except httpx.HTTPError as exc:
        print(f"opensmc {args.command}: cannot reach the server: {exc}", file=sys.stderr)
        return 2
    return 0
