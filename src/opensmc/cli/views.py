"""Friendly views over the API: `opensmc jobs`, `opensmc sources`, `opensmc watch JOB`.

They call the same signed SMC actions as `opensmc call` (DescribeReplicationJobs,
DescribeSourceServers) and render tables with rich; `watch` follows one job
with a live progress bar, bytes done of total, rate and ETA (the latest
ReplicationJobRun's BytesDone, BytesTotal, BytesPerSecond, EtaSeconds, FilesDone/FilesTotal) until
it stops running.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from opensmc.cli.call import invoke
from opensmc.cli.credentials import ClientCredentials, load, tls_verify
from opensmc.cli.errors import CliError
from opensmc.cli.output import id_columns, plain_console

#: statuses after which `watch` stops following a job
SETTLED = ("Finished", "InError", "Stopped", "Waiting", "Expired", "Ready")


class ViewError(CliError):
    pass


def add_arguments(sub: Any) -> None:
    from opensmc.cli.main import RAW, add_client_options

    for name, text, action in (
        ("jobs", "list replication jobs", "DescribeReplicationJobs"),
        ("sources", "list migration sources", "DescribeSourceServers"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]} ({action}, every page). Full IDs when piped.",
            formatter_class=RAW,
            epilog=f"examples:\n  opensmc {name}\n  opensmc {name} --json | jq '.[].Status'",
        )
        p.add_argument("--json", action="store_true", help=f"print the {action} items as a JSON list")
        add_client_options(p)
    p = sub.add_parser(
        "watch",
        help="follow a replication job with a live progress bar",
        formatter_class=RAW,
        epilog="examples:\n  opensmc watch j-…\n  opensmc watch j-… --interval 5",
    )
    p.add_argument("job_id", help="the job to follow, j-…")
    add_client_options(p)
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


def show_jobs(creds: ClientCredentials, console: Console, as_json: bool = False) -> None:
    items = _all(creds, "DescribeReplicationJobs", "ReplicationJobs", "ReplicationJob")
    if as_json:
        print(json.dumps(items, indent=2, ensure_ascii=False))
        return
    table = Table("JobId", "Name", "SourceId", "Status", "Progress", "ImageId", "Error")
    for j in items:
        table.add_row(
            j["JobId"], j["Name"], j["SourceId"], _state(j), f"{j['Progress']:.1f}%", j["ImageId"], j["ErrorCode"]
        )
    id_columns(table, "JobId", "SourceId", "ImageId")
    console.print(table)


def show_sources(creds: ClientCredentials, console: Console, as_json: bool = False) -> None:
    items = _all(creds, "DescribeSourceServers", "SourceServers", "SourceServer")
    if as_json:
        print(json.dumps(items, indent=2, ensure_ascii=False))
        return
    server = server_version(creds)
    table = Table("SourceId", "Name", "State", "Platform", "Disks", "Agent", "JobId", "Error")
    for s in items:
        disks = s.get("Disks") or {}
        sizes = [str((disks.get("System") or {}).get("Size", "?"))]
        sizes += [str(d.get("Size", "?")) for d in ((disks.get("Data") or {}).get("Data") or [])]
        agent = str(s.get("AgentVersion") or "")
        if agent and server and _older(agent, server):
            agent += f" (older than the server's {server}: it upgrades at its next heartbeat)"
        table.add_row(
            s["SourceId"],
            s["Name"],
            s["State"],
            s["Platform"],
            " + ".join(sizes) + " GiB",
            agent,
            s["JobId"],
            s["ErrorCode"],
        )
    id_columns(table, "SourceId", "JobId")
    console.print(table)


def server_version(creds: ClientCredentials) -> str:
    """The server's version (``GET /agent/v1/info``), "" when it cannot be asked."""
    try:
        doc = httpx.get(f"{creds.endpoint.rstrip('/')}/agent/v1/info", timeout=10, verify=tls_verify()).json()
    except (httpx.HTTPError, ValueError):
        return ""
    return str(doc.get("server_version") or "") if isinstance(doc, dict) else ""


def _older(agent: str, server: str) -> bool:
    """``agent`` is an older version than ``server`` (dotted numbers; any other difference counts as older)."""

    def key(v: str) -> tuple[int, ...] | None:
        parts = v.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None

    a, s = key(agent), key(server)
    return a < s if a is not None and s is not None else agent != server


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
    if run.get("FilesTotal") is not None:
        parts.append(f"{int(run['FilesDone']):,} of {int(run['FilesTotal']):,} files")
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
    warning = _warning(job)
    if warning:
        console.print(f"[yellow]warning[/yellow] {warning}")
    return 0


def _warning(job: dict[str, Any]) -> str:
    """A finished run's warning in StatusInfo (a source written during the sync), "" when none."""
    try:
        info = json.loads(job.get("StatusInfo") or "{}")
    except ValueError:
        return ""
    if not isinstance(info, dict) or "warning_code" not in info:
        return ""
    return f"{info['warning_code']}: {info.get('warning_msg', '')}"


def run(args: argparse.Namespace) -> int:
    """Errors propagate to :func:`opensmc.cli.main.main`, which reports them in the one CLI format."""
    creds = load(args.credentials, args.endpoint)
    if args.command == "jobs":
        show_jobs(creds, plain_console(), args.json)
    elif args.command == "sources":
        show_sources(creds, plain_console(), args.json)
    else:
        return watch(creds, args.job_id, args.interval, Console())
    return 0
