"""`opensmc agent install|uninstall` and the units in contrib/systemd/, checked by `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from opensmc.cli import errors
from opensmc.cli.main import main
from opensmc.cli.service import exec_quote

ROOT = Path(__file__).resolve().parents[2]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def verify(unit: Path) -> None:
    """`systemd-analyze verify` exits 0 even for unknown keys; any line about our unit is a failure too."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    about_us = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not about_us, result.stdout + result.stderr


def install(tmp_path: Path, *extra: str) -> int:
    return main(
        ["agent", "install", "--server", "https://smc.example:8080", "--unit-dir", str(tmp_path / "units"),
         "--env-file", str(tmp_path / "etc" / "agent.env"), "--no-start", *extra]
    )  # fmt: skip


@needs_analyze
def test_installed_agent_unit_verifies_and_keeps_secrets_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "disk with space.img"
    disk.write_bytes(b"\0" * 4096)
    assert install(tmp_path, "--token-id", "at-abc", "--token-code", "s3cr3t", "--disk", str(disk)) == 0
    unit = tmp_path / "units" / "opensmc-agent.service"
    env = tmp_path / "etc" / "agent.env"
    text = unit.read_text()
    assert "s3cr3t" not in text and "at-abc" not in text  # `systemctl cat` is world-readable
    assert f"EnvironmentFile={env}" in text
    assert f"ExecStart={sys.executable} -m opensmc.cli.main agent run --server https://smc.example:8080" in text
    assert f'--disk "{disk}"' in text
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "OPENSMC_TOKEN_ID=at-abc\n" in env.read_text() and "OPENSMC_TOKEN_CODE=s3cr3t\n" in env.read_text()
    verify(unit)
    assert "wrote" in capsys.readouterr().out


def test_the_unit_runs_what_it_says(tmp_path: Path) -> None:
    """The ExecStart= command line, run as systemd would split it, reaches our agent's own argument check."""
    assert install(tmp_path, "--token-id", "at-abc", "--token-code", "c") == 0
    line = next(x for x in (tmp_path / "units" / "opensmc-agent.service").read_text().splitlines()
                if x.startswith("ExecStart="))  # fmt: skip
    argv = line.removeprefix("ExecStart=").split()
    assert argv[0] == sys.executable
    # --help: the installed interpreter finds the agent and knows every option the unit passes
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--server", "--state-dir", "--log-format"):
        assert option in result.stdout


def test_print_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--access-key-id", "AK", "--access-key-secret", "SK", "--print") == 0
    assert "[Service]" in capsys.readouterr().out and not (tmp_path / "units").exists()


def test_install_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path) == errors.USAGE  # neither an activation code nor an AccessKey
    assert "give either --token-id" in capsys.readouterr().err
    assert install(tmp_path, "--token-id", "at-1", "--token-code", "has space") == errors.USAGE
    assert install(tmp_path, "--token-id", "at-1", "--token-code", "c", "--disk", str(tmp_path)) == errors.USAGE
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "units").exists()


def test_uninstall_removes_unit_and_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--token-id", "at-1", "--token-code", "c") == 0
    env = tmp_path / "etc" / "agent.env"
    args = ["agent", "uninstall", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env)]
    assert main([*args, "--no-stop"]) == 0
    assert not (tmp_path / "units" / "opensmc-agent.service").exists() and not (tmp_path / "etc" / "agent.env").exists()
    capsys.readouterr()
    assert main([*args, "--no-stop"]) == errors.USAGE
    assert "is not installed" in capsys.readouterr().err


def test_exec_quote() -> None:
    assert exec_quote("/usr/bin/python3") == "/usr/bin/python3"
    assert exec_quote("/srv/my disk.img") == '"/srv/my disk.img"'
    assert exec_quote("100%") == "100%%" and exec_quote("$HOME") == "$$HOME"
    assert exec_quote('a"b') == '"a\\"b"'


@needs_analyze
@pytest.mark.parametrize("name", ["opensmc-server.service", "opensmc@.service"])
def test_contrib_units_verify(tmp_path: Path, name: str) -> None:
    text = (ROOT / "contrib" / "systemd" / name).read_text()
    # The shipped path is the documented install location; point it at this checkout's opensmc to verify.
    opensmc = Path(sys.executable).parent / "opensmc"
    assert "/opt/opensmc/.venv/bin/opensmc" in text and opensmc.exists()
    unit = tmp_path / (name.replace("@", "@api") if "@" in name else name)
    unit.write_text(text.replace("/opt/opensmc/.venv/bin/opensmc", str(opensmc)))
    os.chmod(unit, 0o644)
    verify(unit)


def test_install_without_permission(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opensmc.cli import service

    def denied(*_args: object) -> None:  # what a non-root user gets for /etc (the tests run as root)
        raise PermissionError(13, "Permission denied", "/etc/opensmc")

    monkeypatch.setattr(service, "_write", denied)
    assert install(tmp_path, "--token-id", "at-1", "--token-code", "c") == errors.USAGE
    err = capsys.readouterr().err
    assert err.startswith("opensmc agent: error: /etc/opensmc: permission denied (run it as root")
    monkeypatch.undo()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    code = main(["agent", "install", "--server", "http://10.0.0.5:8080", "--token-id", "at-1", "--token-code", "c",
                 "--unit-dir", str(blocked / "units"), "--env-file", str(tmp_path / "agent.env"), "--no-start"])
    assert code == errors.FAILED and "Traceback" not in capsys.readouterr().err
