"""What `opensmc agent run` loads: never the server's stack (a source server pays for every MiB)."""

from __future__ import annotations

import subprocess
import sys

SERVER_ONLY = (
    "sqlalchemy", "starlette", "uvicorn", "aiohttp", "cryptography", "psycopg", "alembic", "prometheus_client",
)  # fmt: skip

PROBE = f"""
import sys
from opensmc.cli.main import build_parser
build_parser("agent")
import opensmc.cli.agent, opensmc.agent.runner, opensmc.agent.tasks, opensmc.agent.discovery
print(",".join(m for m in {SERVER_ONLY!r} if m in sys.modules))
"""


def test_the_agent_imports_no_server_module() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"the agent imports {out.stdout.strip()}"

