"""The web console in a real browser (Debian's chromium driven by Playwright) against a real server and agent.

Signs in with the server's AccessKey pair, creates an activation code and runs the agent command it shows,
creates and starts a job from the source, watches it reach Finished, downloads the image and verifies it.
With OPENSMC_CONSOLE_SCREENSHOTS=DIR it also saves screenshots of the main pages there (docs/console/).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import OPENSMC, clean_env, stop
from tests.e2e.flows import api, start_migration_server

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("OPENSMC_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

MiB = 1 << 20


def test_console_migrates_a_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(24 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(12 * MiB))
    shots = os.environ.get("OPENSMC_CONSOLE_SCREENSHOTS")
    server = start_migration_server(tmp_path)
    agent: subprocess.Popen[str] | None = None
    creds = json.loads((server.data_dir / "admin-credentials.json").read_text())
    try:
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 900})
            page.on("dialog", lambda d: d.accept(d.default_value))
            expect = playwright_api.expect

            def shot(name: str) -> None:
                if shots:
                    Path(shots).mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)

            page.goto(f"{server.endpoint}/ui")  # redirects to /console
            expect(page.locator("#sign-in")).to_be_visible()
            shot("sign-in")
            page.fill("#key-id", creds["access_key_id"])
            page.fill("#key-secret", "wrong")
            page.click("#sign-in button")
            expect(page.locator("#bar .error")).to_contain_text("SignatureDoesNotMatch")
            page.fill("#key-id", creds["access_key_id"])
            page.fill("#key-secret", creds["access_key_secret"])
            page.click("#sign-in button")
            expect(page.locator("h2")).to_have_text("Replication jobs")

            # an activation code, and the agent command the console shows for it
            page.goto(f"{server.endpoint}/console#/sources")
            page.click("#create-token")
            command = page.locator("#agent-command").inner_text()
            found = re.search(r"--token-id (\S+) --token-code (\S+)", command)
            assert found and f"--server {server.endpoint}" in command, command
            install = page.locator("#install-command").inner_text()
            assert install == f"curl -fsSL {server.endpoint}/agent/install.sh | sudo sh -s -- {found[0]}", install
            agent = subprocess.Popen(
                [*OPENSMC, "agent", "run", "--server", server.endpoint, "--token-id", found[1],
                 "--token-code", found[2], "--disk", str(disk), "--state-dir", str(tmp_path / "agent")],
                stdout=(tmp_path / "agent.log").open("a"), stderr=subprocess.STDOUT, text=True, env=clean_env(),
            )  # fmt: skip

            # the source appears (the sources page is reloaded until it does), then a job from it
            create = page.locator("button", has_text="Create job")
            for _ in range(60):
                page.goto(f"{server.endpoint}/console#/jobs")
                page.goto(f"{server.endpoint}/console#/sources")
                page.wait_for_selector("h2:text('Sources')")
                if create.count():
                    break
                page.wait_for_timeout(500)
            expect(page.locator(".state.Available")).to_have_count(1)
            expect(page.locator(".seen")).to_contain_text("last seen")
            shot("sources")
            create.click()
            expect(page.locator("h2")).to_contain_text("Job j-")
            job_id = page.locator("h2").inner_text().split()[-1]
            # 1 Mbit/s: the 12 MiB of data take tens of seconds: time to watch it sync and lift the limit
            api(server, "ModifyReplicationJobAttribute", JobId=job_id, ReplicationParameters='{"bandwidth_limit": 1}')
            page.reload()
            page.click("[data-action=StartReplicationJob]")
            expect(page.locator("#job-status")).to_have_text("Running/Syncing", timeout=30_000)
            expect(page.locator(".rate")).to_contain_text("ETA", timeout=15_000)  # bytes move, sampled live
            shot("job-running")
            page.fill("#bandwidth", "0")
            page.wait_for_timeout(3000)  # longer than a refresh: the page must not re-render under the user's typing
            expect(page.locator("#bandwidth")).to_have_value("0")
            page.click("#apply-bandwidth")
            expect(page.locator("#bar")).to_contain_text("bandwidth limit set to 0 Mbit/s")
            params = api(server, "DescribeReplicationJobs", JobId__1=job_id)["ReplicationJobs"]["ReplicationJob"][0]
            assert json.loads(params["ReplicationParameters"]) == {"bandwidth_limit": 0}
            expect(page.locator("#job-status")).to_have_text("Finished", timeout=120_000)  # live refresh
            events = page.locator("#events tbody tr td:nth-child(2)")
            expect(events).to_contain_text(["create", "start", "prepared", "synced", "processed", "finish"])
            shot("job")
            page.goto(f"{server.endpoint}/console#/jobs")
            expect(page.locator(f"[data-job={job_id}]")).to_have_text("Finished")
            shot("jobs")

            # the image: download its disk, then verify it
            page.goto(f"{server.endpoint}/console#/images")
            image_button = page.locator("[data-download]").first
            expect(image_button).to_be_visible()
            with page.expect_download() as download:
                image_button.click()
            assert Path(download.value.path()).read_bytes() == disk.read_bytes()
            page.locator("[data-verify]").first.click()
            expect(page.locator("#bar")).to_contain_text("check out")
            expect(page.locator(".checksum").first).to_have_text("verified")
            shot("images")

            page.goto(f"{server.endpoint}/console#/jobs/{job_id}")
            page.click("[data-action=DeleteReplicationJob]")  # the confirm() dialog is accepted
            expect(page.locator("h2")).to_have_text("Replication jobs")
            browser.close()
    finally:
        if agent is not None:
            stop(agent)
        stop(server.proc)
