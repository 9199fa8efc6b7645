"""Operating the API: the access log, ``/metrics``, ``/healthz`` and ``/readyz``.

- Every SMC API call (``/``) is logged once, when its answer is sent, with its
  RequestId, action, account, AccessKey id, HTTP status, error code and
  duration, and counted in ``opensmc_api_requests_total`` and
  ``opensmc_api_request_duration_seconds``: the RPC endpoint
  (``api/app.py``) hands what it noted to :meth:`ApiCalls.record`, so the
  wire code stays free of logging and metrics. Other routes are logged by the
  :class:`AccessLog` middleware.
- ``/metrics`` is Prometheus' text format (prometheus_client): the counters
  above, plus gauges read from the database at scrape time (jobs by status,
  agents by state and heartbeat age, per-job bytes) and from the data
  directory (image store size, free space). Counts and IDs only: no names,
  no account IDs, no keys.
- ``/healthz`` answers 200 while the process serves; ``/readyz`` answers 200
  only when the database answers, the data directory is writable and its
  filesystem has more free space than :func:`min_free_bytes`.
- ``/console`` serves the web console's static files (``api/console/``); the
  console itself signs SMC API calls in the browser like any SDK.

None of these routes is signed: a load balancer or Prometheus has no AccessKey,
and the console's files hold no data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opensmc.api.actions import ACTIONS
from opensmc.clock import as_utc
from opensmc.images.store import repository_at
from opensmc.receiver.stats import STATS
from opensmc.service.context import Services
from opensmc.store.tables import job_runs, jobs, sources

log = logging.getLogger("opensmc.api.access")

#: free space below which /readyz fails, unless OPENSMC_READY_MIN_FREE_MIB says otherwise
DEFAULT_MIN_FREE = 1 << 30
#: seconds between two walks of the image store for its size (a walk touches every file)
STORE_SIZE_TTL = 60.0


def min_free_bytes() -> int:
    value = os.environ.get("OPENSMC_READY_MIN_FREE_MIB")
    return int(value) << 20 if value and value.isdigit() else DEFAULT_MIN_FREE


# the access log and the request metrics -------------------------------------------------------------


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "opensmc_api_requests",
            "SMC API calls answered, by action and error code (OK for success)",
            ["action", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "opensmc_api_request_duration_seconds",
            "Time to answer an SMC API call, by action",
            ["action"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )


#: request paths logged at INFO besides the SMC API: image downloads and the console's data (who read what);
#: the agent API (a heartbeat every few seconds per agent), health checks, scrapes and static files at DEBUG
LOGGED_PREFIXES = ("/opensmc/",)


class ApiCalls:
    """The access log line and the metrics of each SMC API call."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics
        # prometheus_client's labels() hashes and validates its arguments under a lock at each call;
        # the children are looked up here instead (the label sets are few: actions x error codes).
        self._counts: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}

    def record(self, action: str, caller: Any, code: str, status: int, request_id: str, seconds: float) -> None:
        # An unknown action is one label, not one per typo: labels must stay a small, fixed set.
        label = action if action in ACTIONS else "unknown"
        count = self._counts.get((label, code))
        if count is None:
            count = self._counts[(label, code)] = self.metrics.requests.labels(label, code or "OK")
        count.inc()
        latency = self._latencies.get(label)
        if latency is None:
            latency = self._latencies[label] = self.metrics.latency.labels(label)
        latency.observe(seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": request_id,
            "action": action,
            "account_id": getattr(caller, "account_id", ""),
            "access_key_id": getattr(caller, "access_key_id", ""),
            "http_status": status,
            "error_code": code,
            "duration_ms": round(seconds * 1000, 1),
        }
        log.info(
            "api %s status=%d code=%s account=%s key=%s RequestId=%s %.1f ms",
            action or "-", status, code or "-", fields["account_id"] or "-", fields["access_key_id"] or "-",
            fields["request_id"] or "-", fields["duration_ms"],
            extra={"fields": fields},
        )  # fmt: skip


#: methods on ``/`` whose calls the RPC endpoint logs itself (``api/app.py``); others are logged here
RPC_SELF_LOGGED = frozenset({"GET", "POST", "HEAD"})


class AccessLog:
    """ASGI middleware: logs the requests of routes other than the SMC API's.

    SMC API calls (``/``) reach the RPC endpoint, which records each one with
    :meth:`ApiCalls.record`, mostly without passing through this middleware.
    """

    def __init__(self, app: ASGIApp, calls: ApiCalls) -> None:
        self.app = app
        self.calls = calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("path") == "/" and scope.get("method") in RPC_SELF_LOGGED):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "request_id": ""}

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-acs-request-id":
                        answer["request_id"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            seconds = time.perf_counter() - started
            if scope.get("path") == "/":
                self.calls.record("", None, "", int(answer["status"]), answer["request_id"], seconds)
            else:
                self._other(scope, answer, seconds)

    def _other(self, scope: Scope, answer: dict[str, Any], seconds: float) -> None:
        path = str(scope.get("path", ""))
        level = logging.INFO if path.startswith(LOGGED_PREFIXES) else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        caller = (scope.get("state") or {}).get("caller")
        fields = {
            "method": scope.get("method", ""),
            "path": path,
            "request_id": answer["request_id"],
            "account_id": getattr(caller, "account_id", ""),
            "access_key_id": getattr(caller, "access_key_id", ""),
            "http_status": int(answer["status"]),
            "duration_ms": round(seconds * 1000, 1),
        }
        log.log(
            level, "http %s %s status=%d account=%s RequestId=%s %.1f ms",
            fields["method"], path, fields["http_status"], fields["account_id"] or "-",
            fields["request_id"] or "-", fields["duration_ms"],
            extra={"fields": fields},
        )  # fmt: skip


# gauges read at scrape time ---------------------------------------------------------------------------


class StateCollector(Collector):
    """Jobs, agents and storage as they are now, read from the database and the data dir per scrape."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._store_size: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        yield from self._jobs()
        yield from self._agents()
        yield from self._storage()
        yield from self._receiver()

    def _receiver(self) -> Iterator[Metric]:
        frames, plain, wire, rejected = STATS.snapshot()
        got = CounterMetricFamily(
            "opensmc_receiver_bytes", "Bytes the receiver of this process took in", labels=["kind"]
        )
        got.add_metric(["plain"], plain)
        got.add_metric(["wire"], wire)
        accepted = CounterMetricFamily("opensmc_receiver_frames", "Frames the receiver verified and stored")
        accepted.add_metric([], frames)
        refused = CounterMetricFamily(
            "opensmc_receiver_frames_rejected", "Frames the receiver refused, by reason", labels=["reason"]
        )
        for code, n in sorted(rejected.items()):
            refused.add_metric([code], n)
        yield from (got, accepted, refused)

    def _jobs(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "opensmc_jobs", "Replication jobs by Status and BusinessStatus", labels=["status", "business_status"]
        )
        done = GaugeMetricFamily(
            "opensmc_job_bytes_done",
            "Bytes of the running run of a job processed so far (rate() of it is the job's rate)",
            labels=["job_id"],
        )
        total = GaugeMetricFamily(
            "opensmc_job_bytes_total", "Bytes the running run of a job has to process", labels=["job_id"]
        )
        progress = GaugeMetricFamily("opensmc_job_progress_ratio", "Progress of a running job, 0-1", labels=["job_id"])
        with self.services.db.connect() as conn:
            for status, business, count in conn.execute(
                select(jobs.c.status, jobs.c.business_status, func.count()).group_by(
                    jobs.c.status, jobs.c.business_status
                )
            ):
                by_status.add_metric([status, business], count)
            running = conn.execute(
                select(jobs.c.id, jobs.c.progress, job_runs.c.bytes_done, job_runs.c.bytes_total)
                .join(job_runs, job_runs.c.job_id == jobs.c.id)
                .where(jobs.c.status == "Running", job_runs.c.end_time.is_(None))
            )
            for job_id, pct, bytes_done, bytes_total in running:
                progress.add_metric([job_id], float(pct or 0) / 100)
                done.add_metric([job_id], float(bytes_done or 0))
                total.add_metric([job_id], float(bytes_total or 0))
        yield from (by_status, progress, done, total)

    def _agents(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("opensmc_agents", "Migration sources (agents) by State", labels=["state"])
        age = GaugeMetricFamily(
            "opensmc_agent_heartbeat_age_seconds",
            "Seconds since a source's agent last heartbeated",
            labels=["source_id"],
        )
        now = self.services.clock()
        with self.services.db.connect() as conn:
            for state, count in conn.execute(select(sources.c.state, func.count()).group_by(sources.c.state)):
                by_state.add_metric([state], count)
            for source_id, seen in conn.execute(
                select(sources.c.id, sources.c.last_heartbeat_at).where(sources.c.last_heartbeat_at.is_not(None))
            ):
                last = as_utc(seen)
                if last is not None:
                    age.add_metric([source_id], max(0.0, (now - last).total_seconds()))
        yield from (by_state, age)

    def _storage(self) -> Iterator[Metric]:
        data_dir = self.services.settings.data_dir
        free = GaugeMetricFamily("opensmc_data_dir_free_bytes", "Free space on the data directory's filesystem")
        st = os.statvfs(data_dir)
        free.add_metric([], st.f_bavail * st.f_frsize)
        size = GaugeMetricFamily(
            "opensmc_image_store_bytes",
            f"Bytes on disk under the image store, or in its objects on S3 (re-measured every {STORE_SIZE_TTL:g} s)",
        )
        size.add_metric([], self._image_store_bytes())
        yield from (free, size)

    def _image_store_bytes(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._store_size is None or now - self._store_size[0] > STORE_SIZE_TTL:
                settings = self.services.settings
                if settings.image_location.is_s3:  # what the objects hold, from a listing (1 request per 1000)
                    from opensmc.chunkstore.s3 import S3Backend  # boto3 only when the store is on S3

                    backend = repository_at(settings.image_location).backend
                    measured = backend.stored_bytes() if isinstance(backend, S3Backend) else 0
                else:
                    measured = _disk_usage(settings.store_dir)
                self._store_size = (now, measured)
            return self._store_size[1]


def _disk_usage(root: Path) -> int:
    """Allocated bytes under ``root`` (sparse files count what they hold, like du)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue  # removed while we walked (a sweep, an expired job)
    return total


# health -------------------------------------------------------------------------------------------


def readiness(services: Services) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        with services.db.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready; its text says why
        checks["database"] = f"unreachable: {type(exc).__name__}"
    data_dir = services.settings.data_dir
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".readyz-"):
            pass
        checks["data_dir"] = "ok"
    except OSError as exc:
        checks["data_dir"] = f"not writable: {exc.strerror}"
    try:
        st = os.statvfs(data_dir)
        free = st.f_bavail * st.f_frsize
        need = min_free_bytes()
        checks["free_space"] = "ok" if free >= need else f"{free >> 20} MiB free, below {need >> 20} MiB"
    except OSError as exc:
        checks["free_space"] = f"unknown: {exc.strerror}"
    return all(v == "ok" for v in checks.values()), checks


async def healthz(_request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    ready, checks = await run_in_threadpool(readiness, request.app.state.services)
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# the console ----------------------------------------------------------------------------------------

CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "acs3.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: the console runs only its own files and talks only to this origin; blob: for downloads
CONSOLE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


async def console_file(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    if name not in CONSOLE_FILES:  # a fixed list: no path ever reaches the filesystem from the URL
        return PlainTextResponse("not found\n", status_code=404)
    body = (CONSOLE_DIR / name).read_bytes()
    return Response(body, media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS)


async def to_console(_request: Request) -> Response:
    return RedirectResponse("/console", status_code=308)


def install(app: Starlette, services: Services) -> ApiCalls:
    """Add the ops routes and the access log to the API app (one registry per app: tests stay independent).

    Returns the recorder of SMC API calls, for the RPC endpoint.
    """
    registry = CollectorRegistry()
    calls = ApiCalls(ApiMetrics(registry))
    registry.register(StateCollector(services))
    app.state.metrics_registry = registry
    from opensmc.api import console_routes

    app.router.routes.extend(
        [
            *console_routes.routes,
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/console", console_file, methods=["GET", "HEAD"]),
            Route("/console/{name}", console_file, methods=["GET", "HEAD"]),
            Route("/ui", to_console, methods=["GET"]),
        ]
    )
    app.add_middleware(AccessLog, calls=calls)
    return calls
