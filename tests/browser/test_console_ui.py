"""The operator's console in headless Chromium against a real ``airflow standalone``: log in → fleet
overview → a host → a GPU's trend page → the failing run's report opened from its alert (and its
Data Docs, offline) → acknowledge with a note → the alert shows as acknowledged by that user; a
viewer cannot acknowledge. Also: a manual run whose host DAG is paused fails within seconds, saying
so. The registry is filled by concluding real signed bundles published to the test S3 server.
Screenshots go to test-artifacts/console-*.png."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(1500)]


def _login(page, url: str, user: str, password: str, shot: Path | None = None) -> None:
    page.goto(f"{url}/", wait_until="networkidle")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    if shot:
        page.screenshot(path=str(shot))
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/auth/login" not in u, timeout=60_000)
    page.wait_for_load_state("networkidle")


@pytest.fixture(scope="module")
def filled(airflow_standalone, s3_server, tmp_path_factory):
    """The standalone's own registry, filled from real bundles on the session's S3 server."""
    import os

    from mi300x_cert.registry import close_all

    sa = airflow_standalone
    base = tmp_path_factory.mktemp("console-browser")
    env = {"MI300X_CERT_STATE_DIR": sa.env["MI300X_CERT_STATE_DIR"], "MI300X_CERT_HOME_DIR": str(base / "home"),
           "MI300X_CERT_S3_ENDPOINT": s3_server.endpoint, "MI300X_CERT_S3_BUCKET": "console-browser",
           "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("MI300X_CERT_REGISTRY_URL", None)
    close_all()
    from support.console_world import build_world

    try:
        outcomes = build_world(base / "runs", s3_server.store("console-browser", backoff_s=0.01))
        yield sa, outcomes
    finally:
        close_all()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_paused_host_dag_fails_the_manual_run_in_seconds(airflow_standalone):
    sa = airflow_standalone
    status, body = sa.api("PATCH", "/api/v2/dags/recertify_smoke-host", {"is_paused": True})
    assert status == 200, body
    sa.unpause("manual_certify")
    t0 = time.monotonic()
    status, run = sa.trigger("manual_certify", {"host": "smoke-host", "card_set": "[0-3]"})
    assert status in (200, 201), run
    final = sa.wait_run("manual_certify", run["dag_run_id"], timeout=180)
    elapsed = time.monotonic() - t0
    assert final["state"] == "failed", final
    status, logs = sa.api("GET", f"/api/v2/dags/manual_certify/dagRuns/{quote(run['dag_run_id'], safe='')}"
                                 "/taskInstances/check_conf/logs/1")
    assert status == 200, logs
    text = json.dumps(logs)
    assert "host DAG recertify_smoke-host is paused, so the run would never start" in text, text[-2000:]
    assert sa.task_states("manual_certify", run["dag_run_id"]).get("run_on_host") in (None, "upstream_failed", "skipped")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "console-paused-host-dag.txt").write_text(
        f"manual_certify with recertify_smoke-host paused: state {final['state']} after {elapsed:.1f} s "
        "(trigger → failed, scheduler latency included)\n")
    assert elapsed < 120, f"the manual run took {elapsed:.0f} s to fail"


def test_console_from_login_to_acknowledgement(filled):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (Debian: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from mi300x_cert.registry import open_registry
    from mi300x_cert.validation.offline import external_assets
    from support.console_world import HOT_SERIAL

    sa, outcomes = filled
    assert [o["result"] for o in outcomes] == ["CERTIFIED", "CERTIFIED", "NOT CERTIFIED", "CERTIFIED"]
    ARTIFACTS.mkdir(exist_ok=True)
    external_requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            ctx.on("request", lambda r: external_requests.append(r.url)
                   if not r.url.startswith((sa.url, "data:", "blob:", "about:")) else None)
            page = ctx.new_page()
            _login(page, sa.url, "admin", sa.password("admin"), ARTIFACTS / "console-01-login.png")

            # the nav entry Airflow shows for the plugin
            page.goto(f"{sa.url}/plugin/mi300x-cert", wait_until="networkidle")
            page.screenshot(path=str(ARTIFACTS / "console-02-airflow-nav.png"))

            page.goto(f"{sa.url}/mi300x-cert/", wait_until="networkidle")
            assert "Fleet overview" in page.content()
            page.locator('tr[data-host="gpu-node-01"]').get_by_text("NOT CERTIFIED").wait_for()
            page.screenshot(path=str(ARTIFACTS / "console-03-fleet.png"), full_page=True)
            page.select_option("#f-result", "certified")
            page.get_by_role("button", name="Apply").click()
            page.wait_for_load_state("networkidle")
            assert page.locator('tr[data-host="gpu-node-02"]').count() == 1
            assert page.locator('tr[data-host="gpu-node-01"]').count() == 0
            page.goto(f"{sa.url}/mi300x-cert/", wait_until="networkidle")

            page.locator('tr[data-host="gpu-node-01"] a', has_text="gpu-node-01").click()
            page.wait_for_load_state("networkidle")
            assert "suite <b>thermal</b>: passed → FAILED" in page.content()
            page.screenshot(path=str(ARTIFACTS / "console-04-host.png"), full_page=True)

            page.locator("table.metrics a", has_text=HOT_SERIAL).first.click()
            page.wait_for_load_state("networkidle")
            assert page.locator("svg").count() == 5 and page.locator("circle.flag").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "console-05-serial-trends.png"), full_page=True)

            page.locator("header a", has_text="Alerts").click()
            page.wait_for_load_state("networkidle")
            alert = page.locator("#open-list .alert", has_text="gpu-node-01").filter(has_text="thermal").first
            alert_id = alert.get_attribute("data-id")
            assert HOT_SERIAL in alert.inner_text()
            heading = page.locator("h1 .open-count")
            n_open = int(heading.inner_text())
            page.screenshot(path=str(ARTIFACTS / "console-06-alerts.png"), full_page=True)

            with page.expect_popup() as pop:
                alert.locator("a.ev-report").click()
            report = pop.value
            report.wait_for_load_state("networkidle")
            assert "/evidence/gpu-node-01/run-2026-11-28/artifacts/report/index.html" in report.url
            assert external_assets(report.content()) == []
            report.screenshot(path=str(ARTIFACTS / "console-07-report.png"))
            report.close()
            with page.expect_popup() as pop:
                alert.locator("a.ev-docs").click()
            docs = pop.value
            docs.wait_for_load_state("networkidle")
            assert external_assets(docs.content()) == []
            # Bootstrap loaded from the bundle: the navbar is styled (a CSS rule only bootstrap.min.css has)
            assert docs.evaluate("getComputedStyle(document.querySelector('nav.navbar') || document.body).display") != ""
            docs.screenshot(path=str(ARTIFACTS / "console-08-data-docs.png"))
            docs.close()

            page.fill(f"#note-{alert_id}", "card 13: fan replaced, rerun scheduled")
            page.locator(f'#alert-{alert_id} button.ack').click()
            acked = page.locator(f"#acked-list #alert-{alert_id}")
            acked.wait_for(timeout=15_000)
            assert "Acknowledged by admin" in acked.inner_text()
            assert "card 13: fan replaced, rerun scheduled" in acked.inner_text()
            assert int(heading.inner_text()) == n_open - 1, "the open count follows without a reload"
            assert f"({n_open - 1} open)" in page.title()
            page.screenshot(path=str(ARTIFACTS / "console-09-acknowledged.png"), full_page=True)
            page.reload(wait_until="networkidle")
            assert "Acknowledged by admin" in page.locator(f"#acked-list #alert-{alert_id}").inner_text()
            stored = open_registry().get_alert(alert_id)
            assert stored["status"] == "acknowledged" and stored["acknowledged_by"] == "admin"

            # a viewer sees the alerts but cannot acknowledge
            vctx = browser.new_context(viewport={"width": 1400, "height": 900})
            vpage = vctx.new_page()
            _login(vpage, sa.url, "viewer", sa.password("viewer"))
            vpage.goto(f"{sa.url}/mi300x-cert/alerts", wait_until="networkidle")
            other = vpage.locator("#open-list .alert").first
            other_id = other.get_attribute("data-id")
            vpage.locator(f'#alert-{other_id} button.ack').click()
            result = vpage.locator(f"#result-{other_id}")
            result.filter(has_text="Not allowed").wait_for(timeout=15_000)
            assert "edit permission on DAG" in result.inner_text()
            vpage.screenshot(path=str(ARTIFACTS / "console-10-viewer-denied.png"), full_page=True)
            assert open_registry().get_alert(other_id)["status"] == "open"
            vctx.close()
        finally:
            browser.close()
    assert external_requests == [], f"the console or its evidence asked the network for {external_requests[:5]}"
    status, body = sa.api("GET", "/api/v2/plugins")
    assert status == 200, body
    plug = next(p for p in body["plugins"] if p["name"] == "mi300x_cert")
    links = " ".join(str(x) for x in plug["global_operator_extra_links"])
    assert all(re.search(n, links) for n in ("CertificationReportLink", "DataDocsLink", "BundleLink")), plug
