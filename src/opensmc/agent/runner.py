"""`opensmc agent run`: register this machine as a migration source, then heartbeat until stopped.

The loop: reuse the saved credential (agent/state.py) or register with the
activation code or AccessKey; send a heartbeat with a fresh discovery report
every ``heartbeat_rate`` seconds (the server says how often). Heartbeats are
for liveness: the work comes on the task channel, a thread that keeps a
long-poll of ``GET /agent/v1/tasks`` open (:meth:`_Runner.channel`), so a
started job begins, a stopped one stops and a bandwidth change applies within
a fraction of a second, whatever the heartbeat rate. The channel reconnects
on its own with the same backoff; while it is down (or the server has none)
the heartbeat replies' task lists start tasks instead. When the
server no longer knows the credential (401: the source was deleted, or the
machine registered again elsewhere), register again. Network failures and
5xx answers are retried with exponential backoff (1 s doubling to 60 s);
a refused registration (wrong, disabled, expired or used-up code) is fatal:
:class:`AgentError`. SIGTERM/SIGINT (or ``stop_event``) end the loop between
two calls.
"""

import logging
import os
import signal
import ssl
import threading
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence

from opensmc import __version__
from opensmc.agent import state as agent_state
from opensmc.agent.client import AgentClient, ApiRefused, ServerUnavailable
from opensmc.agent.files import FileOptions
from opensmc.agent.state import AgentState
from opensmc.agent.tasks import TaskRunner

if TYPE_CHECKING:
    from opensmc.agent.upgrade import Upgrader

log = logging.getLogger("opensmc.agent")

BACKOFF_START = 1.0
BACKOFF_MAX = 15.0  # seconds: short enough to notice a restarted server well within its grace period
#: in --once mode, give up after this many failed attempts in a row
ONCE_ATTEMPTS = 5
#: seconds a task long-poll may wait on the server before it answers with the same view
CHANNEL_WAIT = 25.0
#: seconds between attempts to open the channel on a server that has none (an older version)
NO_CHANNEL_RETRY = 60.0

ReportFn = Callable[[], Dict[str, Any]]


class AgentError(Exception):
    """The agent cannot go on (bad credential, unusable disk); the message says what to fix."""


def run_agent(
    server_url: str,
    token_id: "str | None" = None,
    token_code: "str | None" = None,
    access_key_id: "str | None" = None,
    access_key_secret: "str | None" = None,
    disks: "Sequence[str] | None" = None,
    state_dir: "Path" = Path("opensmc-agent"),
    once: bool = False,
    stop_event: "threading.Event | None" = None,
    *,
    http: Any = None,
    report_fn: "ReportFn | None" = None,
    ca_cert: "Path | None" = None,
    upgrader: "Optional[Upgrader]" = None,
    file_options: "Optional[FileOptions]" = None,
) -> "AgentState | None":
    """Run until stopped (or, with `once`, until one heartbeat got through). Returns the last state.

    `http` and `report_fn` replace the HTTP client and the discovery report (tests).
    `ca_cert` is a PEM bundle to trust for the server's and the receiver's TLS
    certificates (default: the system's trust store). `upgrader` replaces the
    agent with the server's when the server runs another version (agent/upgrade.py).
    """
    tls = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    credentials = _credentials(token_id, token_code, access_key_id, access_key_secret)
    make_report = report_fn or _discovery_report(disks, state_dir, "once" if once else "daemon")
    stop = stop_event or threading.Event()
    with _signals(stop, install=stop_event is None), AgentClient(server_url, http=http, ssl_context=tls) as client:
        runner = _Runner(client, server_url, credentials, state_dir, make_report, tls, file_options)
        runner.upgrader = upgrader
        return runner.loop(stop, once)


class _Runner:
    def __init__(
        self,
        client: "AgentClient",
        server_url: str,
        credentials: "dict[str, str]",
        state_dir: "Path",
        make_report: "ReportFn",
        tls: "ssl.SSLContext | None" = None,
        file_options: "Optional[FileOptions]" = None,
    ) -> None:
        self.client = client
        self.server_url = server_url.rstrip("/")
        self.credentials = credentials
        self.state_dir = state_dir
        self.make_report = make_report
        self.state = agent_state.load(state_dir)
        # where an agent without xxhash keeps its chunk hashes between runs (agent/owncache.py)
        self.tasks = TaskRunner(client, self._agent_token, tls, str(state_dir / "hashes"), file_options)
        #: the task channel answered last time: heartbeat replies' tasks are then ignored
        self.channel_ok = False
        self.upgrader: "Optional[Upgrader]" = None
        #: the server's version as its last heartbeat reply gave it
        self.server_version = ""

    def _agent_token(self) -> str:
        if self.state is None:
            raise AgentError("the agent is not registered")
        return self.state.agent_token

    def loop(self, stop: "threading.Event", once: bool) -> "AgentState | None":
        delay = BACKOFF_START
        failures = 0
        channel: "threading.Thread | None" = None
        if not once:
            # A daemon thread: it may be inside a long-poll when the agent stops, and must not hold it up.
            channel = threading.Thread(target=self.channel, args=(stop,), name="task-channel", daemon=True)
            channel.start()
        while not stop.is_set():
            try:
                rate = self.beat()
            except (OSError, HTTPException, ServerUnavailable) as exc:
                failures += 1
                if once and failures >= ONCE_ATTEMPTS:
                    raise AgentError(f"cannot reach the server at {self.server_url}: {exc}") from exc
                log.warning("server %s not reachable (%s); retrying in %.0f s", self.server_url, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            failures = 0
            delay = BACKOFF_START
            if once:
                break
            if self.upgrader is not None and self.server_version and not self.tasks.busy():
                self.upgrader.check(self.server_version)  # re-executes this process when it upgrades
            stop.wait(rate)
        if channel is not None:
            # Give an open long-poll a moment to end (it ends at once with a short CHANNEL_WAIT),
            # so that an embedding caller's HTTP client is idle when run_agent returns; a long
            # one is left to die with the process.
            channel.join(min(CHANNEL_WAIT + 1.0, 2.0))
        log.info("agent stopped")
        return self.state

    def beat(self) -> int:
        """Register if needed, send one heartbeat; the number of seconds until the next one."""
        report = self.make_report()
        st = self.state
        if st is None or st.server_url != self.server_url or st.machine_id != report.get("machine_id"):
            st = self.register(report)
        try:
            resp = self.client.heartbeat(st.agent_token, {"agent_version": __version__, "report": report})
        except ApiRefused as exc:
            if exc.status != 401:
                raise AgentError(f"heartbeat refused: {exc}") from exc
            log.warning("the server no longer accepts this agent's credential (%s); registering again", exc.code)
            agent_state.clear(self.state_dir)
            self.state = None
            st = self.register(report)
            try:
                resp = self.client.heartbeat(st.agent_token, {"agent_version": __version__, "report": report})
            except ApiRefused as again:
                raise AgentError(f"heartbeat refused right after registering: {again}") from again
        tasks = resp.get("tasks") or []
        if isinstance(tasks, list) and not self.channel_ok:
            self.tasks.handle([t for t in tasks if isinstance(t, dict)])
        log.debug("heartbeat ok: source %s is %s", st.source_id, resp.get("state", "?"))
        self.server_version = str(resp.get("server_version") or "")
        rate = resp.get("heartbeat_rate")
        return rate if isinstance(rate, int) and rate > 0 else 30

    def channel(self, stop: "threading.Event") -> None:
        """Keep the task long-poll open until `stop`; apply every task view it answers."""
        since = ""
        delay = BACKOFF_START
        while not stop.is_set():
            st = self.state
            if st is None:  # the heartbeat loop registers first
                stop.wait(0.2)
                continue
            try:
                view = self.client.tasks(st.agent_token, since, CHANNEL_WAIT)
            except Exception as exc:
                self.channel_ok = False
                self.tasks.channel_lost()
                if stop.is_set():
                    break
                since = ""  # reconnected, the first answer is the whole view at once
                if isinstance(exc, ServerUnavailable) and exc.status == 404:
                    log.warning("the server has no task channel (an older version); tasks come with heartbeats")
                    stop.wait(NO_CHANNEL_RETRY)
                    continue
                if isinstance(exc, ApiRefused) and exc.status == 401:
                    stop.wait(BACKOFF_START)  # the heartbeat loop registers again; then the new token works
                    continue
                if not isinstance(exc, (OSError, HTTPException, ServerUnavailable, ApiRefused)):
                    log.exception("task channel failed")
                log.warning("task channel to %s lost (%s); reconnecting in %.0f s", self.server_url, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_START
            if not self.channel_ok:
                log.info("task channel open")
            self.channel_ok = True
            since = str(view.get("version") or "")
            tasks = view.get("tasks")
            if isinstance(tasks, list):
                self.tasks.apply([t for t in tasks if isinstance(t, dict)])

    def register(self, report: "dict[str, Any]") -> "AgentState":
        if not self.credentials:
            raise AgentError(
                "no saved credential for this server and no activation code or AccessKey given: "
                "pass --token-id and --token-code (CreateAccessToken), "
                "or --access-key-id and --access-key-secret"
            )
        machine_id = str(report.get("machine_id", ""))
        instance = agent_state.instance_id(self.state_dir, machine_id)
        body: "dict[str, Any]" = {
            **self.credentials,
            "machine_id": machine_id,
            "instance_id": instance,
            # The credential's secret, ours: a registration sent again after a lost answer proves itself.
            "registration_secret": agent_state.registration_secret(self.state_dir, instance),
            "agent_version": __version__,
            "report": report,
        }
        if self.state is not None:
            # Proof that this agent is the source's own: the server then keeps its credential.
            body["agent_token"] = self.state.agent_token
        try:
            resp = self.client.register(body)
        except ApiRefused as exc:
            if exc.code == "SourceServer.IdentityConflict":
                # Another agent with this identity is online: retrying would only fight it.
                raise AgentError(f"registration refused: {exc.code}: {exc.message}") from exc
            if exc.status == 409:  # the source is being deleted: a passing state, try again later
                raise ServerUnavailable(str(exc)) from exc
            raise AgentError(f"registration refused: {exc.code}: {exc.message}") from exc
        st = AgentState(self.server_url, str(resp["source_id"]), str(resp["agent_token"]), machine_id)
        agent_state.save(self.state_dir, st)
        self.state = st
        log.info(
            "registered as migration source %s (%s)",
            st.source_id,
            "new source" if resp.get("created") else "this machine was known already",
        )
        return st


def _credentials(
    token_id: "str | None", token_code: "str | None", key_id: "str | None", key_secret: "str | None"
) -> "dict[str, str]":
    if token_id or token_code:
        if not (token_id and token_code):
            raise AgentError("give both --token-id and --token-code")
        return {"token_id": token_id, "token_code": token_code}
    if key_id or key_secret:
        if not (key_id and key_secret):
            raise AgentError("give both --access-key-id and --access-key-secret")
        return {"access_key_id": key_id, "access_key_secret": key_secret}
    return {}


def _discovery_report(disks: "Sequence[str] | None", state_dir: "Path", mode: str) -> "ReportFn":
    from opensmc.agent import discovery

    for path in disks or ():
        if not os.path.exists(path):
            raise AgentError(f"--disk {path}: no such file or device")
    if disks and len(disks) > 1 + discovery.MAX_DATA_DISKS:
        raise AgentError(f"at most {1 + discovery.MAX_DATA_DISKS} disks (1 system + {discovery.MAX_DATA_DISKS} data)")

    last: "dict[str, Any]" = {}

    def report() -> "dict[str, Any]":
        try:
            system = discovery.discover_system(state_dir)
            found = discovery.discover_disks(list(disks) if disks else None)
        except (OSError, ValueError) as exc:
            # A disk that vanished for a while (unplugged, an image being replaced) must
            # not kill the agent: keep heartbeating with the last good report; a task
            # that needs the disk fails on its own with a clear error.
            if not last:
                raise AgentError(f"cannot discover this machine's disks: {exc}") from exc
            log.warning("disk discovery failed (%s); reporting the last known disks", exc)
            return dict(last)
        for d in found:
            for w in d.warnings:
                log.warning("disk %s: %s", d.path, w)
        last.clear()
        last.update(discovery.to_report(system, found, agent_mode=mode))
        return dict(last)

    return report


@contextmanager
def _signals(stop: "threading.Event", *, install: bool) -> "Iterator[None]":
    """SIGTERM/SIGINT set `stop` (only when we own it and run in the main thread)."""
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
