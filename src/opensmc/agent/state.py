"""The agent's state directory: which server it registered with, as which source, with which token.

One JSON file, ``<state_dir>/agent.json``, mode 0600 in a 0700 directory,
replaced atomically (write a temporary file, fsync, rename) so a crash never
leaves half a credential behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "agent.json"


@dataclass(frozen=True)
class AgentState:
    server_url: str
    source_id: str
    agent_token: str  #: `<source_id>.<secret>`, sent as Authorization: Bearer
    machine_id: str


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load(state_dir: Path) -> AgentState | None:
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


def save(state_dir: Path, state: AgentState) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_path(state_dir)
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # in case the file existed with wider permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def clear(state_dir: Path) -> None:
    """Forget the credential (the server no longer accepts it)."""
    state_path(state_dir).unlink(missing_ok=True)
