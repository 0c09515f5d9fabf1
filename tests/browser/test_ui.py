"""The Airflow UI in headless Chromium: log in, fill the manual certification form (card set, batch
configs), trigger it, and watch the run succeed. Screenshots go to test-artifacts/."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(1500)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def login(page, url: str, password: str) -> None:
    page.goto(f"{url}/", wait_until="networkidle")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/auth/login" not in u, timeout=60_000)
    page.wait_for_load_state("networkidle")


def pick(page, field: str, option: str) -> None:
    """Choose ``option`` (its displayed label) in the form's select for ``field`` (no Escape: it
    would close the whole dialog)."""
    page.locator(f"#element_{field}").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill_and_trigger(page, url: str, shots: Path) -> None:
    page.goto(f"{url}/dags/manual_certify", wait_until="networkidle")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Trigger Dag - manual_certify").wait_for(timeout=30_000)
    dialog.get_by_role("button", name="Target").click()
    pick(page, "card_set", "Cards [0-3] (4 cards) on smoke-host, mi300x-01")
    dialog.get_by_role("button", name="Matrix").click()
    pick(page, "batch_configs", "1x2")
    pick(page, "process_counts", "1")
    page.screenshot(path=str(shots / "ui-02-trigger-form.png"), full_page=True)
    submit = dialog.get_by_role("button", name="Trigger").last
    assert submit.is_enabled(), "the trigger form reports an invalid field"
    submit.click()
    dialog.wait_for(state="hidden", timeout=30_000)


def latest_run(sa, dag_id: str) -> dict | None:
    status, body = sa.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after&limit=1")
    assert status == 200, body
    return body["dag_runs"][0] if body["dag_runs"] else None


def test_trigger_form_runs_the_certification(airflow_standalone):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (Debian: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    sa = airflow_standalone
    sa.unpause("recertify_smoke-host")  # manual runs execute as runs of the host's DAG
    sa.unpause("manual_certify")
    ARTIFACTS.mkdir(exist_ok=True)
    before = latest_run(sa, "manual_certify")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            login(page, sa.url, sa.password())
            page.screenshot(path=str(ARTIFACTS / "ui-01-home.png"))
            fill_and_trigger(page, sa.url, ARTIFACTS)

            deadline = time.monotonic() + 60
            run = None
            while time.monotonic() < deadline:
                run = latest_run(sa, "manual_certify")
                if run and (before is None or run["dag_run_id"] != before["dag_run_id"]):
                    break
                time.sleep(1)
            assert run and (before is None or run["dag_run_id"] != before["dag_run_id"]), "the form created no run"
            assert run["conf"]["card_set"] == "[0-3]" and run["conf"]["batch_configs"] == ["1x2"], run["conf"]
            final = sa.wait_run("manual_certify", run["dag_run_id"], timeout=1200)
            states = sa.task_states("manual_certify", run["dag_run_id"])
            host_run = latest_run(sa, "recertify_smoke-host")
            host_states = sa.task_states("recertify_smoke-host", host_run["dag_run_id"]) if host_run else {}

            from urllib.parse import quote

            page.goto(f"{sa.url}/dags/manual_certify/runs/{quote(run['dag_run_id'], safe='')}", wait_until="networkidle")
            page.get_by_text("check_conf").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ui-03-manual-run.png"), full_page=True)
            if host_run:
                page.goto(f"{sa.url}/dags/recertify_smoke-host/runs/{quote(host_run['dag_run_id'], safe='')}",
                          wait_until="networkidle")
                page.screenshot(path=str(ARTIFACTS / "ui-04-host-run.png"), full_page=True)
            assert final["state"] == "success", (states, host_states)
            assert host_run["conf"]["overrides"]["experiments"]["sd-throughput"]["batch_configs"] == ["1x2"]
            assert host_run["conf"]["overrides"]["experiments"]["sd-throughput"]["cards"] == [0, 1, 2, 3]

            page.goto(f"{sa.url}/mi300x-cert/", wait_until="networkidle")  # the console via the UI cookie
            assert "Fleet overview" in page.content()
            page.screenshot(path=str(ARTIFACTS / "ui-05-dashboard.png"), full_page=True)
        finally:
            browser.close()
