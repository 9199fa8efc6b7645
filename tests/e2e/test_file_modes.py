"""Issue 7 items 5 and 10: a server's data is its user's alone; plain HTTP off loopback is warned about."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.e2e.conftest import free_port, start_server, stop


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_data_dir_private_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "staging").mkdir(mode=0o777)  # as an older version (or another umask) left them
    old = os.umask(0)  # the server inherits the loosest umask there is
    try:
        srv = start_server(data, "--receiver-listen", f"0.0.0.0:{free_port()}")
    finally:
        os.umask(old)
    try:
        status = Path(f"/proc/{srv.proc.pid}/status").read_text()
        # Everything the server creates later (staging volumes, image packs, SQLite journals)
        # gets this umask: files 0600, directories 0700.
        assert "Umask:\t0077" in status
        assert _mode(data) == 0o700
        for name in ("staging", "images"):
            if (data / name).exists():
                assert _mode(data / name) == 0o700, name
        for name in ("opensmc.db", "master.key", "admin-credentials.json"):
            assert _mode(data / name) == 0o600, name
    finally:
        stop(srv.proc)
    log = srv.log.read_text()
    assert "data receiver over plain HTTP on 0.0.0.0" in log, log
    assert "API and agent API over plain HTTP" not in log  # the API listens on 127.0.0.1
