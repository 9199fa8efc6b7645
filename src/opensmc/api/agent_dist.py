"""The agent as the server hands it out: one zipapp, its SHA-256 and the install script (docs/agent.md).

``GET /agent/opensmc-agent.pyz`` is a zipapp built from this very installation's
agent modules (:data:`ZIPAPP_MODULES`, which run on Python 3.6+ with the
standard library only) and a ``__main__`` calling ``opensmc.agent.main``, so
the agent is always the server's version. It is built once per process, with
fixed timestamps and order, so the same sources give the same bytes and the
same ``GET /agent/opensmc-agent.pyz.sha256``. ``GET /agent/install.sh`` is
the POSIX shell installer with this server's URL written in (from the
request's own scheme and ``Host``, which must look like a host name).
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import zipfile
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import opensmc
from opensmc import __version__

PYZ = "/agent/opensmc-agent.pyz"
SHA256 = PYZ + ".sha256"
INSTALL = "/agent/install.sh"

#: What the zipapp holds, relative to the ``opensmc`` package: the agent needs nothing else.
ZIPAPP_MODULES = ("__init__.py", "logs.py", "malloc.py", "agent/*.py", "wire/*.py")
MAIN = b"""\"\"\"OpenSMC agent zipapp: python3 opensmc-agent.pyz --help\"\"\"
import sys

from opensmc.agent.main import main

sys.exit(main())
"""
SHEBANG = b"#!/usr/bin/env python3\n"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def zipapp_files(package_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(name in the archive, file) of every module the zipapp holds, in archive order."""
    base = package_dir or Path(opensmc.__file__).parent
    found: list[tuple[str, Path]] = []
    for pattern in ZIPAPP_MODULES:
        for path in sorted(base.glob(pattern)):
            found.append((f"opensmc/{path.relative_to(base).as_posix()}", path))
    return found


def build_pyz(version: str | None = None) -> bytes:
    """The zipapp's bytes; ``version`` replaces ``__version__`` in it (tests of the self-upgrade)."""
    out = io.BytesIO()
    out.write(SHEBANG)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path in [("__main__.py", None), *zipapp_files()]:
            data = MAIN if path is None else path.read_bytes()
            if version is not None and name == "opensmc/__init__.py":
                data = re.sub(rb'__version__ = "[^"]*"', f'__version__ = "{version}"'.encode(), data)
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return out.getvalue()


@functools.cache
def pyz() -> tuple[bytes, str]:
    """This server's zipapp and its SHA-256 (hex), built on first use."""
    blob = build_pyz()
    return blob, hashlib.sha256(blob).hexdigest()


def install_script(server_url: str) -> str:
    text = resources.files("opensmc.api").joinpath("agent_install.sh").read_text(encoding="utf-8")
    return text.replace("@SERVER@", server_url).replace("@VERSION@", __version__)


def install_command(server_url: str, token_id: str, token_code: str, *, wget: bool = False) -> str:
    """The one line to run on a source server (shown next to a new activation code)."""
    get = "wget -qO-" if wget else "curl -fsSL"
    return f"{get} {server_url.rstrip('/')}{INSTALL} | sudo sh -s -- --token-id {token_id} --token-code {token_code}"


def _server_url(request: Request) -> str | None:
    host = request.headers.get("host", "")
    if not _HOST.match(host):
        return None
    return f"{request.url.scheme}://{host}"


async def get_pyz(request: Request) -> Response:
    blob, digest = pyz()
    return Response(
        blob,
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="opensmc-agent.pyz"', "X-Checksum-Sha256": digest},
    )


async def get_sha256(request: Request) -> Response:
    _blob, digest = pyz()
    return PlainTextResponse(f"{digest}  opensmc-agent.pyz\n")


async def get_install(request: Request) -> Response:
    url = _server_url(request)
    if url is None:
        return JSONResponse(
            {"code": "InvalidHost", "message": "The request's Host header is not a host name or address."}, 400
        )
    return PlainTextResponse(install_script(url), media_type="text/x-shellscript")


routes = [
    Route(PYZ, get_pyz, methods=["GET"]),
    Route(SHA256, get_sha256, methods=["GET"]),
    Route(INSTALL, get_install, methods=["GET"]),
]
