"""Airflow plugin: the certification dashboard at ``/mi300x-cert/``, reading the fleet registry.

Pages and JSON routes read the control plane's registry (:mod:`mi300x_cert.registry`), never a GPU
host's disk: ``/api/fleet`` (one row per host), ``/api/certifications``, ``/api/alerts``,
``/api/history/{serial}``, ``/api/serials``, and ``POST /api/alerts/{id}/ack``.

Airflow mounts plugin FastAPI apps *without* its own authentication, so every route here checks the
Airflow JWT itself (``Authorization: Bearer …`` or the UI's ``_token`` cookie) through the auth
manager and answers 401 without a valid one. State-changing requests authenticated by the cookie
must also carry ``X-Requested-With`` (a cross-site form cannot set it).
"""

from __future__ import annotations

import html
import json
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

URL_PREFIX = "/mi300x-cert"
COOKIE = "_token"


async def _user_from_request(request: Request) -> Any:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    via_cookie = False
    if not token:
        token = request.cookies.get(COOKIE)
        via_cookie = bool(token)
    if not token:
        raise HTTPException(status_code=401, detail="Not authenticated: log in to Airflow or send a Bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        from airflow.api_fastapi.app import get_auth_manager

        user = await get_auth_manager().get_user_from_token(token)
    except Exception:  # expired, bad signature, revoked, malformed
        raise HTTPException(status_code=401, detail="Invalid or expired token",
                            headers={"WWW-Authenticate": "Bearer"}) from None
    if user is None:
        raise HTTPException(status_code=401, detail="Invalid token")
    request.state.cert_via_cookie = via_cookie
    return user


def _user_name(user: Any) -> str:
    for attr in ("get_name", "get_id"):
        fn = getattr(user, attr, None)
        if callable(fn):
            try:
                v = fn()
                if v:
                    return str(v)
            except Exception:
                pass
    return "airflow-user"


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _page(outcomes: list[dict], open_alerts: list[dict], user: str) -> str:
    from mi300x_cert.alerts import format_failure

    rows = []
    for o in outcomes:
        ok = o.get("certified")
        badge = '<span class="ok">CERTIFIED</span>' if ok else '<span class="bad">NOT CERTIFIED</span>'
        reasons = "; ".join(o.get("reasons") or [])
        links = " ".join(f'<code title="{_esc(o.get(k))}">{label}</code>' for k, label in
                         (("report", "report"), ("data_docs", "data docs"), ("bundle_uri", "bundle")) if o.get(k))
        rows.append(f"<tr><td>{_esc(o.get('registered_at'))}</td><td>{_esc(o.get('host'))}</td><td>{badge}</td>"
                    f"<td>{_esc(o.get('run_id'))}</td><td>{_esc(reasons)}</td><td>{links}<br>"
                    f"<small>{_esc(o.get('bundle_uri'))}</small></td></tr>")
    alerts_html = []
    for a in open_alerts:
        fails = "".join(f"<li>{_esc(format_failure(f))}</li>" for f in a.get("failures") or [])
        alerts_html.append(
            f'<div class="alert" id="alert-{_esc(a["id"])}"><b>{_esc(a.get("host"))}</b> · suite '
            f'<b>{_esc(a.get("suite"))}</b> · run {_esc(a.get("run_id"))} · {_esc(a.get("created"))}'
            f"<ul>{fails}</ul><small>report: {_esc(a.get('report'))} · data docs: {_esc(a.get('data_docs'))}"
            f" · bundle: {_esc(a.get('bundle_uri'))}</small><br>"
            f'<input placeholder="note" id="note-{_esc(a["id"])}"> '
            f'<button class="ack" data-id="{_esc(a["id"])}">Acknowledge</button></div>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Certification dashboard</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left;vertical-align:top}} .ok{{color:#080;font-weight:bold}} .bad{{color:#b00;font-weight:bold}}
.alert{{border:1px solid #e99;background:#fff4f4;padding:8px;margin:8px 0}}</style></head><body>
<h1>Certification dashboard</h1><p>Signed in as {_esc(user)}.</p>
<h2>Open alerts ({len(open_alerts)})</h2>{''.join(alerts_html) or '<p>No open alerts.</p>'}
<h2>Recent outcomes</h2><table><tr><th>recorded</th><th>host</th><th>outcome</th><th>run</th><th>reasons</th>
<th>evidence</th></tr>{''.join(rows) or '<tr><td colspan="6">No runs yet.</td></tr>'}</table>
<script>
document.querySelectorAll("button.ack").forEach(b => b.addEventListener("click", async () => {{
  const id = b.dataset.id, note = document.getElementById("note-" + id).value;
  const r = await fetch("{URL_PREFIX}/api/alerts/" + encodeURIComponent(id) + "/ack", {{method: "POST",
    credentials: "same-origin", headers: {{"Content-Type": "application/json", "X-Requested-With": "fetch"}},
    body: JSON.stringify({{note}})}});
  if (r.ok) document.getElementById("alert-" + id).remove(); else alert("acknowledge failed: " + r.status);
}}));
</script></body></html>"""


def _registry():
    from mi300x_cert.registry import open_registry

    return open_registry()


def _json(obj: Any) -> JSONResponse:
    return JSONResponse(json.loads(json.dumps(obj, default=str)))


def create_app() -> FastAPI:
    from mi300x_cert.errors import CertError

    app = FastAPI(title="mi300x-cert dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(CertError)
    async def _cert_error(request: Request, exc: CertError) -> JSONResponse:  # e.g. the registry is unreachable
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(user: Any = Depends(_user_from_request)) -> HTMLResponse:
        reg = _registry()
        return HTMLResponse(_page(reg.list_certifications(limit=50), reg.list_alerts(include_acknowledged=False),
                                  _user_name(user)))

    @app.get("/api/fleet")
    async def fleet(user: Any = Depends(_user_from_request)) -> JSONResponse:
        from mi300x_cert.fleet import load_fleet

        try:
            hosts = load_fleet().registry_hosts()
        except CertError:
            hosts = None
        return _json(_registry().fleet(hosts=hosts))

    @app.get("/api/alerts")
    async def list_alerts(all: bool = False, host: str | None = None, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_alerts(include_acknowledged=all, host=host))

    @app.get("/api/certifications")
    async def list_certifications(host: str | None = None, limit: int = 50, offset: int = 0,
                                  user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_certifications(host=host, limit=max(1, min(limit, 500)), offset=max(0, offset)))

    @app.get("/api/outcomes")
    async def list_outcomes(limit: int = 50, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_certifications(limit=max(1, min(limit, 500))))

    @app.get("/api/serials")
    async def serials(user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_serials())

    @app.get("/api/history/{serial}")
    async def history(serial: str, user: Any = Depends(_user_from_request)) -> JSONResponse:
        from mi300x_cert.history import UnknownSerialError

        try:
            return _json(_registry().serial_history(serial))
        except UnknownSerialError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @app.post("/api/alerts/{alert_id}/ack")
    async def ack(alert_id: str, request: Request, user: Any = Depends(_user_from_request)) -> JSONResponse:
        if getattr(request.state, "cert_via_cookie", False) and not request.headers.get("x-requested-with"):
            raise HTTPException(status_code=403, detail="cookie-authenticated requests need X-Requested-With")
        try:
            body = json.loads((await request.body()) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("note", ""), (str, type(None))):
            raise HTTPException(status_code=400, detail="body must be a JSON object: {\"note\": \"...\"}")
        reg = _registry()
        try:
            reg.get_alert(alert_id)
        except CertError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        return _json(reg.acknowledge(alert_id, by=_user_name(user), note=str(body.get("note") or "")))

    return app


class Mi300xCertPlugin(AirflowPlugin):
    name = "mi300x_cert"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Certification dashboard"}]
    external_views = [{
        "name": "Certification",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "mi300x-cert",
        "category": "browse",
    }]
