"""The console plugin over a registry filled from real bundles on a real S3 endpoint: pages, evidence
checked against the registered digests, permissions for acknowledging, and no external asset on any
rendered page (console pages, report, Data Docs)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urljoin

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "mi300x_cert_plugin.py"
LONG_FLOAT = re.compile(r"\d+\.\d{5,}")


class _User:
    def __init__(self, name: str, role: str):
        self.name, self.role = name, role

    def get_name(self) -> str:
        return self.name


class _AuthManager:
    """Tokens ``op`` (may edit every DAG) and ``viewer`` (read only), like the simple auth manager's roles."""

    calls: list = []

    async def get_user_from_token(self, token: str):
        users = {"op": _User("oncall", "admin"), "viewer": _User("watcher", "viewer")}
        if token not in users:
            raise ValueError("bad token")
        return users[token]

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        self.calls.append((method, user.name, getattr(details, "id", None)))
        return user.role == "admin" or method == "GET"


OP = {"Authorization": "Bearer op"}
VIEWER = {"Authorization": "Bearer viewer"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server):
    """Registry + S3 bucket with 4 concluded certifications (one NOT CERTIFIED: card 13 hot)."""
    import uuid

    from mi300x_cert.registry import close_all

    base = tmp_path_factory.mktemp("console-world")
    store = s3_server.store(f"console-{uuid.uuid4().hex[:8]}", backoff_s=0.01, attempts=3, connect_timeout=1)
    env = {"MI300X_CERT_STATE_DIR": str(base / "state"), "MI300X_CERT_HOME_DIR": str(base / "home"),
           "MI300X_CERT_S3_ENDPOINT": store["endpoint"], "MI300X_CERT_S3_BUCKET": store["bucket"],
           "AWS_ACCESS_KEY_ID": store["access_key"], "AWS_SECRET_ACCESS_KEY": store["secret_key"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for k in ("MI300X_CERT_SIGNING_KEY", "MI300X_CERT_VERIFY_KEY", "MI300X_CERT_REGISTRY_URL"):
        os.environ.pop(k, None)
    close_all()
    from support.console_world import build_world

    outcomes = build_world(base / "runs", store)
    yield {"store": store, "outcomes": outcomes, "base": base}
    close_all()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def client(world, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(world["base"] / "state"))
    import airflow.api_fastapi.app as app_mod

    monkeypatch.setattr(app_mod, "get_auth_manager", lambda: _AuthManager())
    spec = importlib.util.spec_from_file_location("mi300x_cert_console_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    from fastapi import FastAPI

    app, root = mod.create_app(), FastAPI()
    root.mount("/mi300x-cert", app)  # where Airflow mounts it (the pages' links carry the prefix)
    root.mount("/", app)             # and short paths for the tests
    return TestClient(root)


def _external(text: str) -> list[str]:
    from mi300x_cert.validation.offline import external_assets

    return external_assets(text)


def test_world_has_one_failing_run(world):
    results = [(o["host"], o["run_id"], o["result"]) for o in world["outcomes"]]
    assert results[2] == ("gpu-node-01", "run-2026-11-28", "NOT CERTIFIED"), results
    assert all(r[2] == "CERTIFIED" for i, r in enumerate(results) if i != 2), results


def test_pages_render_from_the_registry(client):
    from support.console_world import HOT_SERIAL

    assert client.get("/").status_code == 401
    fleet = client.get("/", headers=OP)
    assert fleet.status_code == 200 and "gpu-node-01" in fleet.text and "gpu-node-02" in fleet.text
    assert "NOT CERTIFIED" in fleet.text and "Signed in as oncall" in fleet.text
    only = client.get("/?result=certified", headers=OP).text
    assert "gpu-node-02" in only and 'data-host="gpu-node-01"' not in only
    assert 'data-host="gpu-node-01"' not in client.get("/?sku=nvidia", headers=OP).text
    rows = re.findall(r'data-host="([^"]+)"', client.get("/?sort=host&order=desc", headers=OP).text)
    assert [r for r in rows if r.startswith("gpu-node")] == ["gpu-node-02", "gpu-node-01"]
    assert rows == sorted(rows, reverse=True)  # the fleet file's hosts are there too, never certified
    never = re.findall(r'data-host="([^"]+)"', client.get("/?result=never_certified", headers=OP).text)
    assert never and not any(r.startswith("gpu-node") for r in never)
    paged = client.get("/?per_page=1&page=2&sort=host", headers=OP).text
    assert re.findall(r'data-host="([^"]+)"', paged) == [sorted(rows)[1]] and f"page 2 of {len(rows)}" in paged
    by_alerts = re.findall(r'data-host="([^"]+)"', client.get("/?sort=alerts&order=desc", headers=OP).text)
    assert by_alerts[0] == "gpu-node-01"
    assert client.get("/?page=x", headers=OP).status_code == 200  # a bad page number is not an error

    host = client.get("/host/gpu-node-01", headers=OP).text
    assert host.count('class="card cert"') == 3
    assert "suite <b>thermal</b>: passed → FAILED" in host
    assert HOT_SERIAL in host and "active junction (p95)" in host       # metric change of the hot GPU
    assert "no change in suites, cards or metrics since run-2026-11-20" in host
    assert "first certification of this host" in host
    assert client.get("/host/no-such-host", headers=OP).status_code == 404

    serial = client.get(f"/serial/{HOT_SERIAL}", headers=OP).text
    assert serial.count("<svg") == 5 and 'class="flag"' in serial       # trends with a drift flag
    assert "drift flag" in serial and "run-2026-11-28" in serial
    assert client.get("/serial/NOPE", headers=OP).status_code == 404
    assert HOT_SERIAL in client.get("/serials", headers=OP).text

    run = client.get("/run/gpu-node-01/run-2026-11-28", headers=OP).text
    assert "Failed expectations" in run and f"GPU <a href=\"/mi300x-cert/serial/{HOT_SERIAL}\">{HOT_SERIAL}</a>" in run

    alerts = client.get("/alerts", headers=OP).text
    assert "<span class=\"open-count\">" in alerts and HOT_SERIAL in alerts     # GPU serial on the failure
    for text in (fleet.text, host, serial, run, alerts):
        assert not LONG_FLOAT.search(re.sub(r"<svg.*?</svg>|<script.*?</script>|<style.*?</style>", "", text, flags=re.S)), \
            LONG_FLOAT.search(text).group(0)
        assert _external(text) == []


def test_evidence_is_served_after_its_digests_check_out(client, world):
    base = "/mi300x-cert/evidence/gpu-node-01/run-2026-11-28/"
    assert client.get(base + "artifacts/report/index.html").status_code == 401
    rep = client.get(base + "artifacts/report/index.html", headers=OP)
    assert rep.status_code == 200 and rep.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in rep.headers["content-security-policy"]
    assert _external(rep.text) == []
    docs_path = "artifacts/validation/gx/uncommitted/data_docs/local_site/index.html"
    docs = client.get(base + docs_path, headers=OP)
    assert docs.status_code == 200 and _external(docs.text) == []
    # every page of the Data Docs and every asset it links resolves inside the bundle
    pages = [urljoin(base + docs_path, h) for h in re.findall(r'href="([^"#]+\.html)"', docs.text)]
    assert pages, "the Data Docs index links its validation pages"
    for url in pages[:3] + [base + docs_path]:
        r = client.get(url, headers=OP)
        assert r.status_code == 200 and _external(r.text) == [], url
        for asset in re.findall(r'<(?:link|script)[^>]+(?:href|src)="([^"]+)"', r.text):
            a = client.get(urljoin(url, asset), headers=OP)
            assert a.status_code == 200, (url, asset, a.text[:200])
    listing = client.get(base, headers=OP)
    assert listing.status_code == 200 and "manifest.json" in listing.text and "statement.json" in listing.text
    for top in ("manifest.json", "statement.json", "SHA256SUMS", "key-info.json", "signer.pub.pem", "envelope.dsse.json"):
        assert client.get(base + top, headers=OP).status_code == 200, top
    assert client.get(base + "artifacts/not-there.txt", headers=OP).status_code == 404
    assert client.get(base + "../../etc/passwd", headers=OP).status_code in (404, 400)
    # extra links' target: the Airflow run resolves to the registered run
    r = client.get("/mi300x-cert/go/recertify_gpu-node-01/run-2026-11-28/report", headers=OP, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/run-2026-11-28/artifacts/report/index.html")
    assert client.get("/mi300x-cert/go/recertify_gpu-node-01/never/report", headers=OP).status_code == 404

    # an object changed in S3 after registration is never served
    from mi300x_cert.evidence import Evidence
    from mi300x_cert.storage import load_store_config, make_client

    Evidence._cache.clear()
    store = world["store"]
    s3 = make_client(load_store_config(store))
    uri = next(o["bundle_uri"] for o in world["outcomes"] if o["run_id"] == "run-2026-11-24")
    key = uri.split("/", 3)[3] + "/artifacts/report/index.html"
    s3.put_object(Bucket=store["bucket"], Key=key, Body=b"<html>forged</html>")
    bad = client.get("/mi300x-cert/evidence/gpu-node-01/run-2026-11-24/artifacts/report/index.html", headers=OP)
    assert bad.status_code == 409 and "does not match its signed digest" in bad.json()["detail"]


def test_acknowledge_needs_edit_permission_and_a_well_formed_body(client):
    from mi300x_cert.registry import open_registry

    reg = open_registry()
    alert = next(a for a in reg.list_alerts() if a["suite"] == "thermal")
    url = f"/api/alerts/{alert['id']}/ack"
    _AuthManager.calls.clear()
    r = client.post(url, json={"note": "looking"}, headers=VIEWER)
    assert r.status_code == 403 and "edit permission on DAG recertify_gpu-node-01" in r.json()["detail"]
    assert _AuthManager.calls[-1] == ("PUT", "watcher", "recertify_gpu-node-01")
    assert reg.get_alert(alert["id"])["status"] == "open"
    for body in (["a list"], "text", {"note": 5}, {"note": "x", "by": "mallory"}, {"note": "y" * 5000}):
        r = client.post(url, json=body, headers=OP)
        assert r.status_code == 400, (body, r.status_code, r.text)
    r = client.post(url, content=b"{not json", headers={**OP, "Content-Type": "application/json"})
    assert r.status_code == 400
    client.cookies.set("_token", "op")
    assert client.post(url, json={"note": "x"}).status_code == 403  # cookie without X-Requested-With
    r = client.post(url, json={"note": "fan swapped on card 13"}, headers={"X-Requested-With": "fetch"})
    client.cookies.clear()
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["acknowledged_by"] == "oncall" and out["status"] == "acknowledged" and "ack-by" in out["html"]
    assert out["open_alerts"] == len(reg.list_alerts())
    page = client.get("/alerts", headers=OP).text
    acked = page.split('id="acked-list"', 1)[1]
    assert alert["id"] in acked and "fan swapped on card 13" in acked and "oncall" in acked
    r = client.post(f"/api/alerts/{alert['id']}/reopen", json={"note": "fan not the cause"}, headers=VIEWER)
    assert r.status_code == 403
    r = client.post(f"/api/alerts/{alert['id']}/reopen", json={"note": "fan not the cause"}, headers=OP)
    assert r.status_code == 200 and r.json()["status"] == "open"
    assert client.post("/api/alerts/no-such/ack", json={}, headers=OP).status_code == 404


def test_extra_links_point_at_the_console():
    spec = importlib.util.spec_from_file_location("mi300x_cert_console_links", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    from types import SimpleNamespace

    names = [link.name for link in mod.Mi300xCertPlugin.global_operator_extra_links]
    assert names == ["Certification report", "Data Docs", "Signed bundle"]
    key = SimpleNamespace(dag_id="recertify_h1", task_id="register", run_id="manual__2026-11-29T07:00:00+00:00")
    url = mod.CertificationReportLink().get_link(None, ti_key=key)
    assert url.endswith("/mi300x-cert/go/recertify_h1/manual__2026-11-29T07%3A00%3A00%2B00%3A00/report"), url
    assert mod.DataDocsLink().get_link(None, ti_key=SimpleNamespace(dag_id="manual_certify", task_id="check_conf",
                                                                     run_id="r")) == ""
