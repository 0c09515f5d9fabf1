"""A real ``airflow standalone``: JWT login, unpause + trigger over REST, forms refused naming the field,
the dashboard plugin enforces auth."""

from __future__ import annotations

import urllib.request

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

SMOKE = "recertify_smoke-host"


def test_rest_login_and_dags_parsed(airflow_standalone):
    sa = airflow_standalone
    status, body = sa.api("GET", "/api/v2/dags", token=None)
    assert status == 401
    status, body = sa.api("GET", "/api/v2/dags?limit=100")
    assert status == 200, body
    ids = {d["dag_id"] for d in body["dags"]}
    assert {SMOKE, "manual_certify", "manual_sd_throughput", "manual_bare_metal"} <= ids
    status, body = sa.api("GET", "/api/v2/importErrors")
    assert status == 200 and body["total_entries"] == 0, body
    status, body = sa.api("GET", "/api/v2/pools/gpu-smoke-host")
    assert status == 200 and body["slots"] == 16, body


def test_plugin_checks_the_token(airflow_standalone):
    sa = airflow_standalone
    status, _ = sa.api("GET", "/mi300x-cert/", token=None)
    assert status == 401
    status, _ = sa.api("GET", "/mi300x-cert/api/alerts", token="not-a-jwt")
    assert status == 401
    status, body = sa.api("GET", "/mi300x-cert/api/outcomes")
    assert status == 200 and isinstance(body, list)
    req = urllib.request.Request(f"{sa.url}/mi300x-cert/", headers={"Authorization": f"Bearer {sa.token()}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert b"Fleet overview" in r.read()
    status, body = sa.api("GET", "/api/v2/plugins")
    assert status == 200 and any(p["name"] == "mi300x_cert" for p in body["plugins"]), body


def test_bad_conf_is_refused_naming_the_field(airflow_standalone):
    sa = airflow_standalone
    status, body = sa.trigger("manual_certify", {"card_set": "[99]"})
    assert status == 400, body
    assert "card_set" in str(body)
    status, body = sa.trigger("manual_sd_throughput", {"batch_configs": ["8by64"]})
    assert status == 400 and "batch_configs" in str(body), body
    status, body = sa.trigger(SMOKE, {"experiments": ["no-such-experiment"]})
    assert status == 400 and "experiments" in str(body), body


def test_trigger_smoke_dag_over_rest(airflow_standalone):
    sa = airflow_standalone
    sa.unpause(SMOKE)
    # a short run: bare-metal + a two-case SD matrix (mapped, pooled); whisper/resnet50 are covered by the e2e test
    conf = {"experiments": ["bare-metal", "sd-throughput"],
            "overrides": {"experiments": {"sd-throughput": {"batch_configs": ["1x2"], "process_counts": [1, 2]}}}}
    status, run = sa.trigger(SMOKE, conf)
    assert status == 200, run
    final = sa.wait_run(SMOKE, run["dag_run_id"], timeout=1200)
    states = sa.task_states(SMOKE, run["dag_run_id"])
    _extra_links_lead_to_the_report(sa, run)  # whatever the outcome: a NOT CERTIFIED run has evidence too
    assert final["state"] == "success", (states, sa.log_tail())
    assert states["register"] == "success" and states["publish"] == "success"
    assert states["run_sd_case[0]"] == "success" and states["run_sd_case[1]"] == "success", states
    assert states["validation.validate_whisper"] == "skipped", states
    status, outcomes = sa.api("GET", "/mi300x-cert/api/outcomes")
    from mi300x_cert.airflow_dags import _safe

    mine = [o for o in outcomes if o["run_id"] == _safe(run["dag_run_id"])]
    assert mine and mine[0]["certified"] is True and mine[0]["bundle_uri"].startswith("s3://"), outcomes


def _extra_links_lead_to_the_report(sa, run) -> None:
    """The console's extra links on the run's tasks, and where they lead (the report, checked against
    the registry)."""
    from urllib.parse import quote

    status, links = sa.api("GET", f"/api/v2/dags/{SMOKE}/dagRuns/{quote(run['dag_run_id'], safe='')}"
                                  "/taskInstances/register/links")
    assert status == 200, links
    report_link = links["extra_links"]["Certification report"]
    assert report_link and report_link.endswith("/report") and "/mi300x-cert/go/" in report_link, links
    assert links["extra_links"]["Data Docs"] and links["extra_links"]["Signed bundle"], links
    req = urllib.request.Request(f"{sa.url}{report_link}", headers={"Authorization": f"Bearer {sa.token()}"})
    with urllib.request.urlopen(req, timeout=60) as r:  # follows the redirect to the evidence
        page = r.read().decode()
        assert r.status == 200 and "/artifacts/report/index.html" in r.url, r.url
    assert "Certification report" in page
    status, links = sa.api("GET", f"/api/v2/dags/{SMOKE}/dagRuns/{quote(run['dag_run_id'], safe='')}"
                                  "/taskInstances/preflight/links")
    assert status == 200 and not links["extra_links"].get("Certification report"), links
