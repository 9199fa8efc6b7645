"""The `opensmc` client commands against a real server on a socket: one error format, documented
exit codes, no traceback for any user error seen in issue 10, JSON output and whole IDs when piped."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensmc.api.agent_routes import routes as agent_routes
from opensmc.api.app import create_app
from opensmc.api.image_routes import routes as image_routes
from opensmc.cli import errors
from opensmc.cli.main import main
from opensmc.service.accounts import create_account
from opensmc.service.context import Caller, Services, Settings
from opensmc.store.db import Database, sqlite_url
from opensmc.store.secretbox import SecretBox
from tests.conftest import SECRET_KEY
from tests.integration.jobs_support import add_source
from tests.live_server import running


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials anywhere but where a test puts them."""
    for name in list(os.environ):
        if name.startswith(("ALIBABA_CLOUD_", "OPENSMC_")) or name in ("XDG_CONFIG_HOME", "COLUMNS"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def server(tmp_path: Path, sqlite_template: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    """A live API; the environment holds its AccessKey and endpoint."""
    shutil.copy(sqlite_template, tmp_path / "opensmc.db")
    settings = Settings(data_dir=tmp_path / "data", public_endpoint="http://127.0.0.1:0")
    settings.data_dir.mkdir()
    svc = Services(db=Database(sqlite_url(tmp_path / "opensmc.db")), settings=settings, secrets=SecretBox(SECRET_KEY))
    pair = create_account(svc, "cli")
    svc.caller = Caller(pair.account_id, pair.access_key_id)  # type: ignore[attr-defined]
    with running(create_app(svc, [*agent_routes, *image_routes])) as host:
        monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", pair.access_key_id)
        monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", pair.access_key_secret)
        monkeypatch.setenv("OPENSMC_ENDPOINT", f"http://{host}")
        yield svc
    svc.db.dispose()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# usage errors: exit 2, one line, a suggestion -----------------------------------------------------


def test_misspelt_parameter_is_refused_with_a_suggestion(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "call", "StartReplicationJob", "--JobID", "j-1")
    assert code == errors.USAGE
    assert err == "opensmc call: error: StartReplicationJob has no parameter --JobID; did you mean --JobId?\n"
    code, _out, err = run(capsys, "call", "DescribeReplicationJobs", "--JobID", "j-1")
    assert code == errors.USAGE and "did you mean --JobId.1?" in err
    code, _out, err = run(capsys, "call", "CreateReplicationJob", "--DataDisk.2.Sise", "40")
    assert code == errors.USAGE and "did you mean --DataDisk.1.Size?" in err
    code, _out, err = run(capsys, "call", "StartReplicationJob", "--Zzz", "1")
    assert code == errors.USAGE and "`opensmc call StartReplicationJob --help` lists them" in err


def test_repeat_list_parameters_are_known(server: Services, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "call", "DescribeReplicationJobs", "--JobId.1", "j-nope", "--PageSize=5")
    assert code == 0, err
    assert json.loads(out)["TotalCount"] == 0


def test_misspelt_action_gets_a_suggestion(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "call", "DescribeReplicationJob")
    assert code == errors.USAGE
    assert "unknown action 'DescribeReplicationJob'; did you mean DescribeReplicationJobs?" in err
    assert err.startswith("opensmc call: error: ")


def test_call_help_lists_actions_and_an_actions_parameters(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["call", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "CutOverReplicationJob" in out and "examples:" in out and "exit codes:" in out
    assert "--credentials FILE" in out and "--endpoint URL" in out
    code, out, _err = run(capsys, "call", "CutOverReplicationJob", "--help")
    assert code == 0 and "--JobId" in out and "--SyncData" in out


def test_no_credentials(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["call", "DescribeSourceServers"], ["jobs"], ["sources"], ["image", "list"]):
        code, _out, err = run(capsys, *argv)
        assert code == errors.USAGE, argv
        assert err.startswith(f"opensmc {argv[0]}: error: no AccessKey"), err


def test_unreachable_server(home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "b")
    monkeypatch.setenv("OPENSMC_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for argv in (["call", "DescribeSourceServers"], ["jobs"], ["image", "list"]):
        code, _out, err = run(capsys, *argv)
        assert code == errors.UNREACHABLE, (argv, err)
        assert err.startswith(f"opensmc {argv[0]}: error: ") and "127.0.0.1:9" in err


def test_export_into_a_missing_directory(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "image", "export", "m-1", "-o", "missing-dir/x.raw")
    assert code == errors.USAGE
    assert err == "opensmc image: error: -o missing-dir/x.raw: directory missing-dir does not exist\n"
    code, _out, err = run(capsys, "image", "export", "m-1", "-o", str(home))
    assert code == errors.USAGE and "is a directory" in err


def test_agent_disk_must_be_a_file_or_block_device(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["agent", "run", "--server", "http://127.0.0.1:9", "--token-id", "at-1", "--token-code", "c"]
    code, _out, err = run(capsys, *args, "--disk", str(home))
    assert code == errors.USAGE and "is a directory" in err
    code, _out, err = run(capsys, *args, "--disk", str(home / "nope.img"))
    assert code == errors.USAGE and "no such file or device" in err


def test_agent_without_a_subcommand(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "agent")
    assert code == errors.USAGE and err.startswith("opensmc agent: error: give a subcommand")


# the server says no: exit 1, same format ----------------------------------------------------------


def test_api_errors_share_one_format(server: Services, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "call", "StartReplicationJob", "--JobId", "j-nope")
    assert code == errors.FAILED
    assert err.startswith("opensmc call: error: InvalidJobId.NotFound: ") and "RequestId " in err
    code, _out, err = run(capsys, "image", "show", "m-nope")
    assert code == errors.FAILED
    assert err.startswith("opensmc image: error: InvalidImageId.NotFound: ") and "RequestId " in err
    code, _out, err = run(capsys, "watch", "j-nope")
    assert code == errors.FAILED and err.startswith("opensmc watch: error: ")


# output ---------------------------------------------------------------------------------------------


def test_jobs_and_sources_json_and_whole_ids_when_piped(
    server: Services, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source_id = add_source(server, server.caller)  # type: ignore[attr-defined]
    name = "a-rather-long-job-name-" * 3
    code, out, err = run(
        capsys, "call", "CreateReplicationJob", "--RegionId", "local", "--SourceId", source_id, "--Name", name
    )
    assert code == 0, err
    job_id = json.loads(out)["JobId"]

    code, out, _err = run(capsys, "jobs", "--json")
    assert code == 0
    (job,) = json.loads(out)
    assert job["JobId"] == job_id and job["SourceId"] == source_id
    code, out, _err = run(capsys, "sources", "--json")
    assert code == 0 and [s["SourceId"] for s in json.loads(out)] == [source_id]

    monkeypatch.setenv("COLUMNS", "60")  # rich would lay the table out for this width
    for view, ids in (("jobs", (job_id, source_id)), ("sources", (source_id, job_id))):
        code, out, _err = run(capsys, view)
        assert code == 0
        row = next(line for line in out.splitlines() if ids[0] in line)
        assert all(i in row for i in ids), out


def test_image_list_into_a_closed_pipe(server: Services, capsys: pytest.CaptureFixture[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    pipe = os.fdopen(write_end, "w")
    saved = sys.stdout
    sys.stdout = pipe
    try:
        code = main(["image", "list", "--json"])
    finally:
        sys.stdout = saved
        try:
            pipe.close()
        except BrokenPipeError:
            pass
    assert code == errors.BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_image_show_json_and_text(server: Services, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "image", "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _err = run(capsys, "image", "list")
    assert code == 0 and "No images yet" in out


# credentials ----------------------------------------------------------------------------------------


def test_credentials_from_the_user_config(
    server: Services, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = os.environ["ALIBABA_CLOUD_ACCESS_KEY_ID"]
    secret = os.environ["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
    endpoint = os.environ["OPENSMC_ENDPOINT"]
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OPENSMC_ENDPOINT"):
        monkeypatch.delenv(name)
    config = home / ".config" / "opensmc" / "credentials.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"access_key_id": key_id, "access_key_secret": secret, "endpoint": endpoint}))
    code, out, err = run(capsys, "call", "DescribeSourceServers")
    assert code == 0, err
    assert json.loads(out)["TotalCount"] == 0


def test_credentials_from_the_aliyun_cli(
    server: Services, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = os.environ.pop("ALIBABA_CLOUD_ACCESS_KEY_ID")
    secret = os.environ.pop("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    aliyun = home / ".aliyun" / "config.json"
    aliyun.parent.mkdir()
    profiles = [
        {"name": "default", "mode": "AK", "access_key_id": "wrong", "access_key_secret": "wrong"},
        {"name": "smc", "mode": "AK", "access_key_id": key_id, "access_key_secret": secret, "region_id": "local"},
    ]
    aliyun.write_text(json.dumps({"current": "smc", "profiles": profiles, "meta_path": ""}))
    code, out, err = run(capsys, "call", "DescribeSourceServers")
    assert code == 0, err
    assert json.loads(out)["TotalCount"] == 0
    # A profile that is not an AccessKey pair is not used
    profiles[1]["mode"] = "StsToken"
    aliyun.write_text(json.dumps({"current": "smc", "profiles": profiles}))
    code, _out, err = run(capsys, "call", "DescribeSourceServers")
    assert code == errors.USAGE and "no AccessKey" in err and str(aliyun) in err


# logs -------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_agent_logs_json_lines(
    server: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    code, out, err = run(capsys, "call", "CreateAccessToken", "--Name", "logged-agent")
    assert code == 0, err
    token = json.loads(out)
    endpoint = os.environ["OPENSMC_ENDPOINT"].rstrip("/")
    install = f"curl -fsSL {endpoint}/agent/install.sh | sudo sh -s -- --token-id {token['AccessTokenId']} "
    assert f"{install}--token-code {token['AccessTokenCode']}" in err  # on stderr: stdout stays the JSON
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(4 << 20)
    code, _out, err = run(
        capsys, "agent", "run", "--server", os.environ["OPENSMC_ENDPOINT"], "--token-id", token["AccessTokenId"],
        "--token-code", token["AccessTokenCode"], "--disk", str(disk), "--state-dir", str(tmp_path / "state"),
        "--once", "--log-format", "json", "--log-level", "info",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(doc) for doc in lines)
    assert any(d["logger"] == "opensmc.agent" and "registered as migration source" in d["message"] for d in lines)
    code, _out, err = run(
        capsys, "agent", "run", "--server", os.environ["OPENSMC_ENDPOINT"], "--state-dir", str(tmp_path / "state"),
        "--disk", str(disk), "--once", "--log-level", "warning",
    )  # fmt: skip
    assert code == 0 and "registered" not in err  # info lines are below --log-level warning


def test_db_upgrade_failure_hides_the_password(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, "db", "upgrade", "--database", "postgresql://smc:hunter2@127.0.0.1:9/smc")
    assert code == errors.FAILED and err.startswith("opensmc db: error: cannot upgrade postgresql")
    assert "hunter2" not in err and "***" in err
