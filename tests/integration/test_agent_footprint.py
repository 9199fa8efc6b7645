"""What `opensmc agent run` loads: never the server's stack (a source server pays for every MiB)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from opensmc.api.agent_dist import build_pyz

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



def test_the_zipapp_runs_with_the_standard_library_alone(tmp_path: Path) -> None:
    """The server's zipapp under this interpreter with no site packages: every module imports, --help runs.

    ``-I -S``: neither this venv's packages nor the system's are importable, so
    an import of starlette, httpx, numpy, xxhash or zstandard would fail here
    (tests/e2e/test_agent_zipapp.py does the same under a real Python 3.6).
    """
    blob = build_pyz()
    pyz = tmp_path / "opensmc-agent.pyz"
    pyz.write_bytes(blob)
    with zipfile.ZipFile(pyz) as zf:
        names = zf.namelist()
    assert names[0] == "__main__.py"
    assert all(re.fullmatch(r"opensmc/(__init__|logs|malloc|(agent|wire)/\w+)\.py", n) for n in names[1:]), names
    modules = [n[:-3].replace("/", ".").removesuffix(".__init__") for n in names[1:]]
    probe = f"import sys; sys.path.insert(0, {str(pyz)!r}); import " + ", ".join(modules)
    probe += "; from opensmc.wire import frames; print(frames.DEFAULT_HASH, frames.DEFAULT_CODEC)"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["1", "2"], out.stderr  # blake2b-128 and zlib
    out = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--io-class" in out.stdout, out.stderr
    # Reproducible: the same sources give the same bytes, hence the same published SHA-256.
    assert build_pyz() == blob
