"""Running the data plane's tasks on the agent.

The server hands a task to the agent in its heartbeat reply (see
docs/agent-api.md): a job run, the receiver to send to, a credential
scoped to that run, and the disks with the staging volume each goes to.
:class:`TaskRunner` runs each task once, on a thread of its own, while the
heartbeat loop goes on: for every disk it asks the receiver which chunks it
already holds, sends only the chunks that differ (the pipeline in
``agent/pipeline.py``), and makes them durable; then it reports the result.

About once a second it reports progress; the reply says whether to go on
(a StopReplicationJob makes it stop within a second or so) and the current
``bandwidth_limit``, which is applied at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opensmc.agent.client import AgentClient
from opensmc.agent.pipeline import Progress, RateLimitedSender, Sender, replicate
from opensmc.agent.uploader import HttpSender, ReceiverError
from opensmc.wire.frames import zstd_level

log = logging.getLogger("opensmc.agent.tasks")

PROGRESS_EVERY = 1.0  # seconds between progress reports


class TaskStopped(Exception):
    """The server said the job is no longer syncing (stopped, failed, deleted)."""


class _StoppableSender:
    """Refuses further batches once the task is told to stop, which unwinds the pipeline."""

    def __init__(self, inner: Sender, stopped: threading.Event) -> None:
        self.inner = inner
        self.stopped = stopped

    def send_batch(self, frames: Sequence[bytes]) -> None:
        if self.stopped.is_set():
            raise TaskStopped("the server asked this task to stop")
        self.inner.send_batch(frames)


class TaskRunner:
    """Starts each task once and keeps track of the ones running."""

    def __init__(self, client: AgentClient, token: Callable[[], str]) -> None:
        self.client = client
        self.token = token
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def handle(self, tasks: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            for tid in [t for t, th in self._running.items() if not th.is_alive()]:
                del self._running[tid]
            for task in tasks:
                tid = str(task.get("task_id", ""))
                if not tid or tid in self._running:
                    continue
                thread = threading.Thread(target=self._run, args=(task,), name=f"task-{tid}", daemon=True)
                self._running[tid] = thread
                thread.start()

    def busy(self) -> bool:
        with self._lock:
            return any(th.is_alive() for th in self._running.values())

    def join(self, timeout: float | None = None) -> None:
        with self._lock:
            threads = list(self._running.values())
        for th in threads:
            th.join(timeout)

    def _run(self, task: dict[str, Any]) -> None:
        job_id, run_id = task["job_id"], task["run_id"]
        log.info("task %s: sending %d disk(s) of job %s", task["task_id"], len(task["disks"]), job_id)
        try:
            stats = run_task(task, self._reporter(task))
        except TaskStopped:
            log.info("task %s: stopped by the server", task["task_id"])
            return
        except Exception as exc:
            code, message = _describe(exc)
            log.error("task %s failed: %s: %s", task["task_id"], code, message)
            self._post_result(
                {"job_id": job_id, "run_id": run_id, "ok": False, "error_code": code, "message": message}
            )
            return
        log.info(
            "task %s: done, %d of %d bytes sent in %.1f s",
            task["task_id"],
            stats["bytes_plain"],
            stats["bytes_total"],
            stats["seconds"],
        )
        self._post_result(
            {
                "job_id": job_id,
                "run_id": run_id,
                "ok": True,
                "bytes_total": stats["bytes_total"],
                "stats": stats,
            }
        )

    def _reporter(self, task: dict[str, Any]) -> Callable[[int, int], tuple[bool, float]]:
        def report(done: int, total: int) -> tuple[bool, float]:
            reply = self.client.task_progress(
                self.token(),
                {
                    "job_id": task["job_id"],
                    "run_id": task["run_id"],
                    "bytes_done": done,
                    "bytes_total": total,
                },
            )
            return bool(reply.get("continue", False)), float(reply.get("bandwidth_limit") or 0)

        return report

    def _post_result(self, body: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                self.client.task_result(self.token(), body)
                return
            except Exception as exc:  # the server may be restarting: try a few times
                log.warning("cannot report the task result (%s); retrying", exc)
                time.sleep(min(2**attempt, 10))
        log.error("gave up reporting the result of job %s run %s", body["job_id"], body["run_id"])


def run_task(task: dict[str, Any], report: Callable[[int, int], tuple[bool, float]]) -> dict[str, Any]:
    """Send every disk of a task; returns totals. Raises TaskStopped when told to stop."""
    params = task.get("replication_parameters") or {}
    level = zstd_level(int(params.get("compress_level") or 0))
    disks = task["disks"]
    total = sum(int(d["size_bytes"]) for d in disks)
    stopped = threading.Event()
    state = {"base": 0, "last": 0.0, "limit": float(params.get("bandwidth_limit") or 0)}
    limiter: RateLimitedSender | None = None
    totals: dict[str, Any] = {
        "bytes_total": total,
        "bytes_plain": 0,
        "bytes_wire": 0,
        "chunks_sent": 0,
        "chunks_zeroed": 0,
    }
    started = time.monotonic()

    def tell(done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - state["last"] < PROGRESS_EVERY:
            return
        state["last"] = now
        go_on, limit = report(done, total)
        if not go_on:
            stopped.set()
        if limiter is not None and limit != limiter.limit:
            limiter.set_limit(limit)

    def on_progress(p: Progress) -> None:
        tell(int(state["base"]) + p.scanned)

    tell(0, force=True)
    if stopped.is_set():
        raise TaskStopped("the server asked this task to stop")
    for disk in disks:
        with HttpSender(task["receiver"], disk["volume_id"], task["token"]) as http:
            chunk_size, previous = http.fetch_hashes()
            limiter = RateLimitedSender(http, float(state["limit"]))
            result = replicate(
                disk["path"],
                _StoppableSender(limiter, stopped),
                length=int(disk["size_bytes"]),
                previous=previous,
                chunk_size=chunk_size,
                level=level,
                progress=on_progress,
            )
            http.flush()
        state["base"] = int(state["base"]) + int(disk["size_bytes"])
        totals["bytes_plain"] += result.bytes_plain
        totals["bytes_wire"] += result.bytes_wire
        totals["chunks_sent"] += result.chunks_sent
        totals["chunks_zeroed"] += result.chunks_zeroed
    tell(total, force=True)
    if stopped.is_set():
        raise TaskStopped("the server asked this task to stop")
    totals["seconds"] = round(time.monotonic() - started, 3)
    return totals


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ReceiverError):
        return "Receiver.Refused", str(exc)
    if isinstance(exc, FileNotFoundError):
        return "Agent.DiskNotFound", f"The source disk cannot be found: {exc}"
    if isinstance(exc, PermissionError):
        return "Agent.DiskNotReadable", f"The agent may not read the source disk: {exc}"
    if isinstance(exc, OSError):
        return "Agent.IOError", f"Reading the disk or sending its data failed: {exc}"
    return "Agent.SyncFailed", f"{type(exc).__name__}: {exc}"
