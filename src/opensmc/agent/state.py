"""The agent's state directory: which server it registered with, as which source, with which token.

``<state_dir>/agent.json`` holds the credential; ``<state_dir>/instance.json``
the agent's identity, a random instance id made once per state dir (and per
machine: a state dir copied to a machine with another machine id gets a new
one). ``<state_dir>/registration.json`` holds, while a registration is under
way, the secret the agent proposes for its credential: saved before the
request is sent and removed once the credential is saved, so that a
registration whose answer was lost (a timeout after the server had already
registered the source) can be sent again and prove itself, instead of
looking like a second agent claiming the source. The server knows a source
by (account, instance id), so two state dirs, or two clones of a machine,
are two sources; the instance id survives the credential being forgotten,
so the same agent registering again is the same source. All files are mode 0600 in a 0700 directory, replaced atomically
(write a temporary file, fsync, rename) so a crash never leaves half of one
behind.
"""

import json
import os
import secrets
from pathlib import Path
from typing import Callable, NamedTuple

STATE_FILE = "agent.json"
INSTANCE_FILE = "instance.json"
REGISTRATION_FILE = "registration.json"


class AgentState(NamedTuple):
    server_url: str
    source_id: str
    agent_token: str  #: `<source_id>.<secret>`, sent as Authorization: Bearer
    machine_id: str


def state_path(state_dir: "Path") -> "Path":
    return state_dir / STATE_FILE


def load(state_dir: "Path") -> "AgentState | None":
    """The saved state, or None when there is none or it is unreadable (then the agent registers anew)."""
    try:
        data = json.loads(state_path(state_dir).read_text(encoding="utf-8"))
        return AgentState(
            server_url=str(data["server_url"]),
            source_id=str(data["source_id"]),
            agent_token=str(data["agent_token"]),
            machine_id=str(data["machine_id"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def instance_id(state_dir: "Path", machine_id: str) -> str:
    """This state dir's instance id on this machine, made (and saved) on first use."""
    # None yet, unreadable, or made on another machine (a copied state dir or a cloned
    # disk with its own machine id): a new identity, so a new source.
    return _kept(state_dir, INSTANCE_FILE, ("machine_id", machine_id), "instance_id", lambda: secrets.token_hex(16))


def registration_secret(state_dir: "Path", instance: str) -> str:
    """The secret to propose for the credential of a registration as ``instance`` (made and saved once)."""
    return _kept(state_dir, REGISTRATION_FILE, ("instance_id", instance), "secret", lambda: secrets.token_urlsafe(32))


def _kept(state_dir: "Path", name: str, owner: "tuple[str, str]", field: str, make: "Callable[[], str]") -> str:
    """``field`` of the file ``name`` if it was saved for ``owner`` (key, value); else a new one, saved."""
    key, value = owner
    try:
        data = json.loads((state_dir / name).read_text(encoding="utf-8"))
        if data.get(key) == value and isinstance(data.get(field), str):
            return str(data[field])
    except (OSError, ValueError, AttributeError):
        pass
    new = make()
    _write_json(state_dir, name, {field: new, key: value})
    return new


def save(state_dir: "Path", state: "AgentState") -> "Path":
    """Save the credential; the registration that got it is over (its secret is the token's now)."""
    path = _write_json(state_dir, STATE_FILE, dict(state._asdict()))
    _unlink(state_dir / REGISTRATION_FILE)
    return path


def _write_json(state_dir: "Path", name: str, doc: "dict[str, str]") -> "Path":
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def clear(state_dir: "Path") -> None:
    """Forget the credential (the server no longer accepts it)."""
    _unlink(state_path(state_dir))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
