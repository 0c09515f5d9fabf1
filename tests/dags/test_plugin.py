"""The console plugin checks the Airflow JWT itself and acknowledges alerts (the console's pages and
evidence on real bundles: test_console.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "mi300x_cert_plugin.py"


class _User:
    def get_name(self) -> str:
        return "oncall"


class _AuthManager:
    async def get_user_from_token(self, token: str):
        if token != "good":
            raise ValueError("bad token")
        return _User()

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        return True


@pytest.fixture
def client(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(tmp_path))
    import airflow.api_fastapi.app as app_mod

    monkeypatch.setattr(app_mod, "get_auth_manager", lambda: _AuthManager())
    spec = importlib.util.spec_from_file_location("mi300x_cert_plugin_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    assert mod.Mi300xCertPlugin.external_views[0]["url_route"] == "mi300x-cert"
    return TestClient(mod.create_app())


def test_routes_need_a_valid_token(client):
    assert client.get("/").status_code == 401
    assert client.get("/api/alerts", headers={"Authorization": "Bearer nope"}).status_code == 401
    client.cookies.set("_token", "nope")
    assert client.get("/api/outcomes").status_code == 401
    client.cookies.clear()
    r = client.get("/", headers={"Authorization": "Bearer good"})
    assert r.status_code == 200 and "Signed in as oncall" in r.text and "Fleet overview" in r.text


def test_acknowledge_from_the_dashboard(client):
    from mi300x_cert.registry import open_registry

    reg = open_registry()
    a, _ = reg.raise_alert(suite="thermal", kind="expectation", host="h1", dag_id="recertify_h1", run_id="r1",
                           message="suite 'thermal' failed on host h1",
                           failures=[{"expectation": "junction_max", "card": 2, "observed": 99, "expected": "<= 95"}])
    page = client.get("/alerts", headers={"Authorization": "Bearer good"}).text
    assert a["id"] in page and "<b>junction_max</b> · card 2: observed <b>99</b>, expected &lt;= 95" in page
    client.cookies.set("_token", "good")
    r = client.post(f"/api/alerts/{a['id']}/ack", json={"note": "fan swapped"})
    assert r.status_code == 403, "cookie-authenticated POST without X-Requested-With"
    r = client.post(f"/api/alerts/{a['id']}/ack", json={"note": "fan swapped"}, headers={"X-Requested-With": "fetch"})
    assert r.status_code == 200 and r.json()["acknowledged_by"] == "oncall"
    assert reg.list_alerts() == []
    client.cookies.clear()
    r = client.post("/api/alerts/no-such-alert/ack", json={}, headers={"Authorization": "Bearer good"})
    assert r.status_code == 404
    r = client.post(f"/api/alerts/{a['id']}/ack", json=["a list"], headers={"Authorization": "Bearer good"})
    assert r.status_code == 400, "a malformed body is the client's error, not a 500"
    assert client.get("/api/alerts?all=true", headers={"Authorization": "Bearer good"}).json()[0]["note"] == "fan swapped"
