"""The agent side of the control plane: registration, agent credentials, heartbeats.

An agent registers with an activation code (CreateAccessToken) or an
AccessKey pair and its discovery report (``opensmc.agent.discovery.to_report``).
It gets back its source's ID and an agent token, ``<source_id>.<secret>``,
that it sends as ``Authorization: Bearer`` on later calls. Only a salted
hash of the secret is kept.

Identity: a source is (account, ``instance_id``), a random id the agent keeps
in its state dir, so two state dirs or two cloned machines (one
``/etc/machine-id``) are two sources; ``machine_id`` is only reported. An agent
that sends no instance id is identified as ``machine:<machine_id>``. A known
identity gets its source back only with proof:

* its saved agent token (``agent_token``), or the ``registration_secret`` it
  proposed when it registered (an agent whose answer to a registration was
  lost sends the same request again): the source is refreshed, the token
  stays valid, no code use is spent;
* or a fresh credential while the source's agent is silent: an activation
  code then spends one of its ``Count`` uses (``AccessToken.CountExceeded``
  when none is left), an AccessKey proves the account; the source gets a new
  token, and the re-registration is logged and shown in its ``StatusInfo``.

A registration without the token while the source's agent is online is a
conflict (two agents claiming one identity, e.g. a copied state dir): it is
refused with 409 ``SourceServer.IdentityConflict``, logged, and shown on the
source (``ErrorCode``/``StatusInfo``); the online agent keeps its credential,
so the two never take the source from each other in turn.

Errors are :class:`AgentApiError` (``{"code","message"}`` with a 4xx
status); the wire format is in docs/agent-api.md.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from opensmc import __version__
from opensmc.clock import iso, new_id
from opensmc.domain.enums import SourceState
from opensmc.domain.errors import SmcError
from opensmc.service import accounts, agent_tasks
from opensmc.service.context import Services
from opensmc.service.sources import Report, parse_report
from opensmc.service.tokens import Token, hash_secret, verify_secret
from opensmc.store import sources as q
from opensmc.store import tokens as token_store

log = logging.getLogger("opensmc.agents")

_MACHINE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9._\-]{16,64}$")
#: an agent's proposed credential secret: at least 32 URL-safe characters (≥ 190 bits from token_urlsafe(32))
_SECRET = re.compile(r"^[A-Za-z0-9_\-]{32,128}$")
CONFLICT = "SourceServer.IdentityConflict"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9:_\-]+")
NAME_MAX = 128


class AgentApiError(SmcError):
    """An agent API refusal: a stable ``code``, a message saying what to do, a 4xx status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code, http_status=status)


@dataclass(frozen=True)
class Registration:
    source_id: str
    agent_token: str
    account_id: str
    created: bool  #: False when the machine was registered before (same source came back)


@dataclass(frozen=True)
class AgentIdentity:
    account_id: str
    source_id: str


# -- registration ------------------------------------------------------------------------------------------


def register(svc: Services, body: Mapping[str, Any], *, plain_http_remote: bool = False) -> Registration:
    """`POST /agent/v1/register`: check the credential, then create or refresh the source.

    ``plain_http_remote``: the request came over plain HTTP from another host.
    An AccessKey is then refused (unless the server runs with ``--insecure-http``),
    so that an operator learns at once that the secret crossed the network in clear.
    """
    raw_report = body.get("report", body)
    machine_id = body.get("machine_id") or (raw_report.get("machine_id") if isinstance(raw_report, Mapping) else None)
    if not isinstance(machine_id, str) or not _MACHINE_ID.match(machine_id):
        raise AgentApiError(
            400,
            "InvalidMachineId",
            '"machine_id" must be 1 to 128 characters of letters, digits, ".", ":", "_", "-".',
        )
    report = parse_report(raw_report)
    version = _agent_version(body)
    who = _claimant(body, machine_id, report)
    token_id, token_code = body.get("token_id"), body.get("token_code")
    key_id, key_secret = body.get("access_key_id"), body.get("access_key_secret")
    if token_id or token_code:
        if not isinstance(token_id, str) or not isinstance(token_code, str) or not token_id or not token_code:
            raise AgentApiError(400, "MissingCredential", 'Give both "token_id" and "token_code".')
        return _with_retry(lambda: _register_with_token(svc, token_id, token_code, who, report, version))
    if key_id or key_secret:
        if not isinstance(key_id, str) or not isinstance(key_secret, str) or not key_id or not key_secret:
            raise AgentApiError(400, "MissingCredential", 'Give both "access_key_id" and "access_key_secret".')
        if plain_http_remote and not svc.settings.insecure_http:
            raise AgentApiError(
                403,
                "InsecureTransport",
                "An AccessKey must not be sent over plain HTTP from another host: serve the API over TLS "
                "(opensmc server --tls-cert/--tls-key) or register with an activation code; the server's "
                "--insecure-http accepts it anyway. Consider this key exposed and rotate it.",
            )
        found = accounts.lookup_secret(svc, key_id, cached=False)  # rare: always the database's word
        if found is None or not secrets.compare_digest(found.secret.encode(), key_secret.encode()):
            raise AgentApiError(403, "InvalidAccessKey", "The AccessKey ID or secret is wrong, or the key is disabled.")
        account_id = found.account_id
        if found.policy == accounts.READ_ONLY:
            raise AgentApiError(
                403,
                "Forbidden.RAM",
                f"The AccessKey {key_id} has the {accounts.READ_ONLY} policy, which cannot register sources; "
                "use a key with full access or an activation code.",
            )
        return _with_retry(lambda: _register_in_account(svc, account_id, key_id, None, who, report, version))
    raise AgentApiError(
        400,
        "MissingCredential",
        'Give an activation code ("token_id" and "token_code", from CreateAccessToken) '
        'or an AccessKey ("access_key_id" and "access_key_secret").',
    )


def register_source(
    svc: Services,
    account_id: str,
    report: Mapping[str, Any],
    *,
    machine_id: str,
    registered_with: str = "admin",
    agent_version: str = "",
) -> Registration:
    """Add (or refresh) a source without an agent call: for tests and admin tooling."""
    parsed = parse_report(report)
    who = Claimant(machine_id, f"machine:{machine_id}", None, parsed.hostname)
    return _with_retry(lambda: _register_in_account(svc, account_id, registered_with, None, who, parsed, agent_version))


@dataclass(frozen=True)
class Claimant:
    """Who asks to register: the identity it claims and the proof it holds, if any."""

    machine_id: str
    instance_id: str
    agent_token: str | None  #: the saved credential of the claimed source, if the agent has one
    hostname: str
    #: the secret the agent proposes for its credential (kept in its state dir before it asks)
    proposed_secret: str | None = None


def _claimant(body: Mapping[str, Any], machine_id: str, report: Report) -> Claimant:
    instance_id = body.get("instance_id")
    if instance_id is None:
        instance_id = f"machine:{machine_id}"  # an agent from before instance ids
    elif not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
        raise AgentApiError(
            400, "InvalidInstanceId", '"instance_id" must be 16 to 64 characters of letters, digits, ".", "_", "-".'
        )
    proof = body.get("agent_token")
    if proof is not None and (not isinstance(proof, str) or len(proof) > 256):
        raise AgentApiError(400, "InvalidAgentToken", '"agent_token" must be the token this agent saved (a string).')
    proposed = body.get("registration_secret")
    if proposed is not None and (not isinstance(proposed, str) or not _SECRET.match(proposed)):
        raise AgentApiError(
            400,
            "InvalidRegistrationSecret",
            '"registration_secret" must be 32 to 128 characters of letters, digits, "_" and "-" '
            "(random, made once and kept by the agent).",
        )
    return Claimant(machine_id, instance_id, proof or None, report.hostname, proposed)


def _with_retry(attempt: Callable[[], Registration]) -> Registration:
    # Two registrations of one identity at once: the loser hits the (account, instance)
    # unique key; on the second try it finds the winner's source.
    try:
        try:
            return attempt()
        except IntegrityError:
            return attempt()
    except IdentityConflict as conflict:
        conflict.record()
        raise


def _register_with_token(
    svc: Services, token_id: str, code: str, who: Claimant, report: Report, version: str
) -> Registration:
    now = svc.clock()
    with svc.db.begin() as conn:
        row = token_store.get_token(conn, token_id)
        if row is None or not verify_secret(code, row.code_hash):
            raise AgentApiError(403, "InvalidAccessToken", "The activation code ID or code is wrong.")
        token = Token.from_row(row)
        if token.disabled:
            raise AgentApiError(
                403, "AccessToken.Disabled", f"The activation code {token_id} is disabled; create a new one."
            )
        if token.is_expired(now):
            raise AgentApiError(
                403,
                "AccessToken.Expired",
                f"The activation code {token_id} expired at {iso(token.expires_at)}; create a new one.",
            )
        return _register(conn, svc, token.account_id, token_id, token, who, report, version, now)


def _register_in_account(
    svc: Services,
    account_id: str,
    registered_with: str,
    token: Token | None,
    who: Claimant,
    report: Report,
    version: str,
) -> Registration:
    now = svc.clock()
    with svc.db.begin() as conn:
        return _register(conn, svc, account_id, registered_with, token, who, report, version, now)


class IdentityConflict(AgentApiError):
    """A registration claimed an online source's identity without its credential."""

    def __init__(self, svc: Services, source_id: str, info: str) -> None:
        super().__init__(
            409,
            CONFLICT,
            f"The source {source_id} is online with another agent that uses this agent's identity "
            "(a copied --state-dir?). Give this agent a state dir of its own; the online agent keeps the source.",
        )
        self.svc, self.source_id, self.info = svc, source_id, info

    def record(self) -> None:
        """Log the conflict and show it on the source (its own transaction: the registration's rolled back)."""
        log.warning("source %s: identity conflict: %s", self.source_id, self.info)
        with self.svc.db.begin() as conn:
            q.update_fields(conn, self.source_id, {"error_code": CONFLICT, "status_info": self.info[:1024]})


def _proves(who: Claimant, row: Any) -> str | None:
    """The source's current agent token, if the claimant proves it holds its secret (else None).

    Proof is the saved token, or the secret the agent proposed when it registered: an agent
    whose registration answer was lost has the second but not the first."""
    if who.agent_token is not None:
        source_id, _, secret = who.agent_token.partition(".")
        if source_id == row.id and secret and verify_secret(secret, row.agent_secret_hash):
            return who.agent_token
    if who.proposed_secret is not None and verify_secret(who.proposed_secret, row.agent_secret_hash):
        return f"{row.id}.{who.proposed_secret}"
    return None


def _online(svc: Services, row: Any, now: datetime) -> bool:
    """Is the source's agent heard from, within the grace period?"""
    if row.state not in (SourceState.AVAILABLE.value, SourceState.IN_USE.value) or row.last_heartbeat_at is None:
        return False
    last = row.last_heartbeat_at if row.last_heartbeat_at.tzinfo else row.last_heartbeat_at.replace(tzinfo=UTC)
    return bool(now - last < svc.settings.heartbeat_grace)


def _register(
    conn: Connection,
    svc: Services,
    account_id: str,
    registered_with: str,
    token: Token | None,
    who: Claimant,
    report: Report,
    version: str,
    now: datetime,
) -> Registration:
    existing = q.get_by_instance(conn, account_id, who.instance_id)
    if existing is not None:
        if existing.state == SourceState.DELETING.value:
            raise AgentApiError(
                409,
                "SourceServerState.Invalid",
                f"The source {existing.id} is being deleted; try again later.",
            )
        refreshed = {
            **report_columns(report),
            "machine_id": who.machine_id,
            "agent_version": version,
            "last_heartbeat_at": now,
            "heartbeat_rate": svc.settings.heartbeat_rate,
        }
        proven = _proves(who, existing)
        if proven is not None:
            # The agent's own credential: it keeps it; a conflict shown before is over.
            if existing.error_code == CONFLICT:
                refreshed.update(error_code="", status_info="")
            q.update_fields(conn, existing.id, refreshed)
            q.revive(conn, existing.id)
            return Registration(existing.id, proven, account_id, created=False)
        if _online(svc, existing, now):
            raise IdentityConflict(
                svc,
                existing.id,
                f"at {iso(now)} an agent on host {who.hostname!r} (machine {who.machine_id}) tried to register as "
                f"this source with {registered_with} but without its agent token, while this source's agent is "
                "online; it was refused (a copied --state-dir? give each agent its own).",
            )
        if token is not None and not token_store.claim_registration(conn, token.id):
            raise _count_exceeded(token)
        secret = who.proposed_secret or secrets.token_urlsafe(32)
        info = (
            f"Re-registered at {iso(now)} with {registered_with} by an agent on host {who.hostname!r} "
            f"(machine {who.machine_id}); the previous agent token no longer works."
        )
        log.warning("source %s: %s", existing.id, info)
        refreshed.update(agent_secret_hash=hash_secret(secret), registered_with=registered_with, status_info=info)
        if existing.error_code == CONFLICT:
            refreshed["error_code"] = ""
        q.update_fields(conn, existing.id, refreshed)
        q.revive(conn, existing.id)
        return Registration(existing.id, f"{existing.id}.{secret}", account_id, created=False)
    if token is not None and not token_store.claim_registration(conn, token.id):
        raise _count_exceeded(token)
    secret = who.proposed_secret or secrets.token_urlsafe(32)
    source_id = new_id("s-")
    q.insert_source(
        conn,
        {
            **report_columns(report),
            "id": source_id,
            "account_id": account_id,
            "name": unique_name(conn, account_id, report.hostname),
            "description": "",
            "state": SourceState.AVAILABLE.value,
            "error_code": "",
            "status_info": "",
            "job_id": "",
            "workgroup_id": "",
            "resource_group_id": "",
            "agent_version": version,
            "heartbeat_rate": svc.settings.heartbeat_rate,
            "replication_driver": "SMT",
            "machine_id": who.machine_id,
            "instance_id": who.instance_id,
            "agent_secret_hash": hash_secret(secret),
            "registered_with": registered_with,
            "last_heartbeat_at": now,
            "created_at": now,
        },
    )
    return Registration(source_id, f"{source_id}.{secret}", account_id, created=True)


def _count_exceeded(token: Token) -> AgentApiError:
    return AgentApiError(
        403,
        "AccessToken.CountExceeded",
        f"The activation code {token.id} has already registered its {token.count} source(s); "
        "create a new code or delete unused sources' code.",
    )


def report_columns(report: Report) -> dict[str, Any]:
    return {
        "platform": report.platform,
        "architecture": report.architecture,
        "kernel_level": report.kernel_level,
        "system_info": report.system_info,
        "system_disk_size": report.system_disk_size,
        "disks": report.disks_json(),
    }


def unique_name(conn: Connection, account_id: str, hostname: str) -> str:
    """The hostname made a valid source name (§0 name rules), with `-N` appended if taken."""
    base = _NAME_CHARS.sub("-", hostname).strip("-")
    if not base or not base[0].isalpha():
        base = f"host-{base}" if base else "source"
    base = base[: NAME_MAX - 6]
    if len(base) < 2:
        base = f"{base}-source"
    taken = q.names_like(conn, account_id, base)
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def _agent_version(body: Mapping[str, Any]) -> str:
    version = body.get("agent_version", "")
    if not isinstance(version, str) or len(version) > 32:
        raise AgentApiError(400, "InvalidAgentVersion", '"agent_version" must be a string of at most 32 characters.')
    return version


# -- authenticated calls -----------------------------------------------------------------------------------


def authenticate(svc: Services, authorization: str | None) -> AgentIdentity:
    """The source an `Authorization: Bearer <source_id>.<secret>` header speaks for; 401 otherwise."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AgentApiError(401, "MissingAgentToken", "Send the agent token as Authorization: Bearer <token>.")
    source_id, _, secret = authorization[7:].strip().partition(".")
    with svc.db.connect() as conn:
        row = q.get_any(conn, source_id) if source_id and secret else None
    if row is None or not verify_secret(secret, row.agent_secret_hash):
        raise AgentApiError(
            401,
            "InvalidAgentToken",
            "The agent token is unknown or was replaced (the source was deleted or registered again); "
            "register again with an activation code.",
        )
    return AgentIdentity(row.account_id, row.id)


def heartbeat(svc: Services, authorization: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /agent/v1/heartbeat`: the agent is alive; refresh its report; hand it its tasks."""
    who = authenticate(svc, authorization)
    raw_report = body.get("report")
    report = parse_report(raw_report) if raw_report is not None else None
    values: dict[str, Any] = {"last_heartbeat_at": svc.clock(), "heartbeat_rate": svc.settings.heartbeat_rate}
    if "agent_version" in body:
        values["agent_version"] = _agent_version(body)
    if report is not None:
        values.update(report_columns(report))
    with svc.db.begin() as conn:
        q.update_fields(conn, who.source_id, values)
        q.revive(conn, who.source_id)
        row = q.get_any(conn, who.source_id)
    state = row.state if row is not None else ""
    return {
        "source_id": who.source_id,
        "state": state,
        "heartbeat_rate": svc.settings.heartbeat_rate,
        # An agent of another version replaces itself with this server's (agent/upgrade.py).
        "server_version": __version__,
        # What the data plane wants this agent to do now (service/agent_tasks.py).
        "tasks": agent_tasks.tasks_for(svc, who.source_id),
    }


def task_progress(svc: Services, authorization: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /agent/v1/tasks/progress`: bytes moved so far; answers whether to go on."""
    who = authenticate(svc, authorization)
    return agent_tasks.progress(svc, who.source_id, dict(body))


def task_result(svc: Services, authorization: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /agent/v1/tasks/result`: a task ended, with success or an error."""
    who = authenticate(svc, authorization)
    return agent_tasks.task_result(svc, who.source_id, dict(body))


# -- the task channel (GET /agent/v1/tasks) ------------------------------------------------------------


def task_view_version(svc: Services, source_id: str) -> str:
    """The version of the source's task view: cheap, asked a few times a second by an open long-poll."""
    return agent_tasks.view_version(svc, source_id)


def task_view_versions(svc: Services, source_ids: list[str]) -> dict[str, str]:
    """:func:`task_view_version` of many sources in one read: what a process's open long-polls share."""
    return agent_tasks.view_versions(svc, source_ids)


def task_view(svc: Services, source_id: str) -> dict[str, Any]:
    """`GET /agent/v1/tasks`: the source's tasks and the version the agent sends back as `since`."""
    return agent_tasks.task_view(svc, source_id)
