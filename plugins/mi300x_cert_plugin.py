"""Airflow plugin: the operator's console at ``/mi300x-cert/``, reading the fleet registry.

Pages (HTML, rendered by :mod:`mi300x_cert.console`): ``/`` fleet overview (filters, sorts, paging),
``/host/{host}`` certifications over time with what changed, ``/serials`` and ``/serial/{serial}``
(one GPU's trends and drift flags), ``/run/{host}/{run_id}`` one certification and its evidence,
``/alerts`` open and acknowledged alerts. Evidence: ``/evidence/{host}/{run_id}/{path}`` serves a
file of the run's published bundle from S3 once its digest checks out against the registry
(:class:`mi300x_cert.evidence.Evidence`); ``/go/{dag_id}/{run_id}/{report|data-docs|bundle|run}`` is
where the Airflow extra links of a run's tasks point. JSON: ``/api/fleet``, ``/api/certifications``,
``/api/alerts``, ``/api/history/{serial}``, ``/api/serials``, ``POST /api/alerts/{id}/ack`` and
``POST /api/alerts/{id}/reopen``.

Airflow mounts plugin FastAPI apps *without* its own authentication, so every route here checks the
Airflow JWT itself (``Authorization: Bearer …`` or the UI's ``_token`` cookie) through the auth
manager and answers 401 without a valid one. Acknowledging or reopening an alert needs edit
permission (``PUT``) on the host's DAG in the auth manager (403 otherwise). State-changing requests
authenticated by the cookie must also carry ``X-Requested-With`` (a cross-site form cannot set it).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

try:
    from airflow.sdk import BaseOperatorLink
except ImportError:  # pragma: no cover - older Airflow
    from airflow.models.baseoperatorlink import BaseOperatorLink  # type: ignore[no-redef]

URL_PREFIX = "/mi300x-cert"
COOKIE = "_token"
NOTE_MAX = 2000
# evidence pages may load what they ship and nothing else (the sites are offline by design)
EVIDENCE_CSP = "default-src 'self' data: blob: 'unsafe-inline' 'unsafe-eval'; connect-src 'self'; form-action 'none'"


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


def _can_edit_dag(user: Any, dag_id: str) -> bool:
    """Edit permission (PUT) on ``dag_id`` in Airflow's auth manager: what acknowledging needs."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    try:
        return bool(get_auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=dag_id), user=user))
    except Exception:  # an auth manager that cannot decide: no
        return False


def _registry():
    from mi300x_cert.registry import open_registry

    return open_registry()


def _json(obj: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(json.loads(json.dumps(obj, default=str)), status_code=status_code)


def _fleet_hosts():
    from mi300x_cert.errors import CertError
    from mi300x_cert.fleet import load_fleet

    try:
        return load_fleet().registry_hosts()
    except CertError:
        return None


def _open_count(reg) -> int:
    return len(reg.list_alerts(include_acknowledged=False))


def _host_dag(alert: dict) -> str:
    return alert.get("dag_id") if str(alert.get("dag_id") or "").startswith("recertify_") else f"recertify_{alert['host']}"


def _serials_for(reg, alerts: list[dict]) -> dict[tuple[str, str], dict[int, str]]:
    """(host, run id) → {card: GPU serial} for the runs the alerts belong to (serials on failures)."""
    from mi300x_cert.console import card_serials

    out: dict[tuple[str, str], dict[int, str]] = {}
    for a in alerts:
        key = (a["host"], a.get("run_id") or "")
        if a.get("run_id") and key not in out:
            out[key] = card_serials(reg.get_certification(*key))
    return out


def _int_arg(request: Request, name: str, default: int) -> int:
    """An integer query argument; a malformed one is the default (a page number is not worth a 4xx)."""
    try:
        return int(request.query_params.get(name, default))
    except (TypeError, ValueError):
        return default


def _body_note(raw: bytes) -> str:
    """The ``note`` of an acknowledge/reopen body: a JSON object ``{"note": "..."}`` (or empty)."""
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(status_code=400, detail="body must be JSON: {\"note\": \"...\"}") from None
    if not isinstance(body, dict):
        raise HTTPException(status_code=400, detail=f"body must be a JSON object {{\"note\": \"...\"}}, not a "
                                                    f"{type(body).__name__}")
    unknown = sorted(set(body) - {"note"})
    if unknown:
        raise HTTPException(status_code=400, detail=f"unknown field(s) {', '.join(unknown)} (only 'note')")
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise HTTPException(status_code=400, detail=f"note must be a string, got {type(note).__name__}")
    if note and len(note) > NOTE_MAX:
        raise HTTPException(status_code=400, detail=f"note is {len(note)} characters; at most {NOTE_MAX}")
    return (note or "").strip()


def create_app() -> FastAPI:
    from mi300x_cert import console
    from mi300x_cert.errors import CertError, StorageError

    app = FastAPI(title="mi300x-cert console", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(CertError)
    async def _cert_error(request: Request, exc: CertError) -> JSONResponse:  # e.g. the registry is unreachable
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def _html(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers={"Cache-Control": "no-store"})

    # ---- pages ----
    @app.get("/", response_class=HTMLResponse)
    def fleet_page(request: Request, sku: str | None = None, result: str | None = None, expired: str | None = None,
                   sort: str = "host", order: str = "asc", user: Any = Depends(_user_from_request)) -> HTMLResponse:
        pg, per_page = _int_arg(request, "page", 1), _int_arg(request, "per_page", 25)
        reg = _registry()
        return _html(console.fleet_page(reg.fleet(hosts=_fleet_hosts()), user=_user_name(user), open_alerts=_open_count(reg),
                                       sku=sku or None, result=result or None, expired=expired or None, sort=sort,
                                       order="desc" if order == "desc" else "asc", page=pg, per_page=per_page))

    @app.get("/host/{host}", response_class=HTMLResponse)
    def host_page(host: str, request: Request, user: Any = Depends(_user_from_request)) -> HTMLResponse:
        pg = max(1, _int_arg(request, "page", 1))
        per = 10
        reg = _registry()
        rows = reg.list_certifications(host=host, limit=per + 2, offset=(pg - 1) * per)
        full = [reg.get_certification(host, r["run_id"]) for r in rows[:per + 1]]
        certs, older = full[:per], (full[per] if len(full) > per else None)
        host_row = next((h for h in reg.fleet(hosts=_fleet_hosts()) if h["host"] == host), None)
        if host_row is None and not certs:
            return _html(console.error_page("Unknown host", f"host {host!r} is neither in the registry nor in the fleet file",
                                           user=_user_name(user)), 404)
        return _html(console.host_page(host, host_row, certs, older, user=_user_name(user), open_alerts=_open_count(reg),
                                      page=pg, has_more=len(rows) > per))

    @app.get("/serials", response_class=HTMLResponse)
    def serials_page(user: Any = Depends(_user_from_request)) -> HTMLResponse:
        reg = _registry()
        return _html(console.serials_page(reg.list_serials(), user=_user_name(user), open_alerts=_open_count(reg)))

    @app.get("/serial/{serial}", response_class=HTMLResponse)
    def serial_page(serial: str, user: Any = Depends(_user_from_request)) -> HTMLResponse:
        from mi300x_cert.history import UnknownSerialError

        reg = _registry()
        try:
            rows = reg.serial_history(serial)
        except UnknownSerialError as e:
            return _html(console.error_page("Unknown GPU serial", str(e), user=_user_name(user)), 404)
        return _html(console.serial_page(serial, rows, user=_user_name(user), open_alerts=_open_count(reg)))

    @app.get("/run/{host}/{run_id}", response_class=HTMLResponse)
    def run_page(host: str, run_id: str, user: Any = Depends(_user_from_request)) -> HTMLResponse:
        reg = _registry()
        cert = reg.get_certification(host, run_id)
        if cert is None:
            return _html(console.error_page("Unknown run", f"no certification of run {run_id!r} on host {host!r} in the "
                                           "registry (its register task may not have concluded yet)",
                                           user=_user_name(user)), 404)
        alerts = [a for a in reg.list_alerts(include_acknowledged=True, host=host) if a.get("run_id") == run_id]
        return _html(console.run_page(cert, user=_user_name(user), open_alerts=_open_count(reg), alerts=alerts))

    @app.get("/alerts", response_class=HTMLResponse)
    def alerts_page(host: str | None = None, user: Any = Depends(_user_from_request)) -> HTMLResponse:
        reg = _registry()
        open_ = reg.list_alerts(include_acknowledged=False, host=host or None)
        acked = [a for a in reg.list_alerts(include_acknowledged=True, host=host or None, limit=300)
                 if a.get("status") == "acknowledged"][:100]
        serials = _serials_for(reg, open_ + acked)
        return _html(console.alerts_page(open_, acked, user=_user_name(user), serials_of=serials, host=host or None))

    # ---- evidence ----
    def _evidence(host: str, run_id: str):
        from mi300x_cert.evidence import Evidence, EvidenceError

        cert = _registry().get_certification(host, run_id)
        if cert is None:
            raise HTTPException(status_code=404, detail=f"no certification of run {run_id!r} on host {host!r} in the registry")
        try:
            return cert, Evidence.for_certification(cert)
        except EvidenceError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        except StorageError as e:
            raise HTTPException(status_code=502, detail=f"object store: {e}") from None

    @app.get("/evidence/{host}/{run_id}/{path:path}")
    def evidence(host: str, run_id: str, path: str, user: Any = Depends(_user_from_request)) -> Response:
        from mi300x_cert.evidence import EvidenceError, content_type

        cert, ev = _evidence(host, run_id)
        if path in ("", "/"):
            return _html(console.files_page(cert, ev.names(), user=_user_name(user)))
        try:
            data = ev.read(path)
        except EvidenceError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        except StorageError as e:
            raise HTTPException(status_code=502, detail=f"object store: {e}") from None
        return Response(data, media_type=content_type(path), headers={
            "Content-Security-Policy": EVIDENCE_CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=300", "X-Evidence-Checked": "registry envelope sha256, signed statement, manifest sha256"})

    @app.get("/go/{dag_id}/{run_id}/{what}")
    def go(dag_id: str, run_id: str, what: str, user: Any = Depends(_user_from_request)) -> Response:
        """Where a run's Airflow extra links point: resolve the Airflow run to its registry record."""
        from mi300x_cert.airflow_dags import safe_run_id

        if not dag_id.startswith("recertify_"):
            raise HTTPException(status_code=404, detail=f"{dag_id} is not a host's recertification DAG")
        host, rid = dag_id[len("recertify_"):], safe_run_id(run_id)
        cert = _registry().get_certification(host, rid)
        if cert is None:
            return _html(console.error_page("Not registered yet", f"run {run_id} of {dag_id} has no certification in the "
                                           "registry yet: its register task has not concluded (or it failed before)",
                                           user=_user_name(user)), 404)
        target = {"report": console.evidence_url(host, rid, "artifacts/report/index.html"),
                  "data-docs": console.evidence_url(host, rid, "artifacts/validation/gx/uncommitted/data_docs/local_site/index.html"),
                  "bundle": console.evidence_url(host, rid, ""),
                  "run": f"{URL_PREFIX}/run/{quote(host, safe='')}/{quote(rid, safe='')}"}.get(what)
        if target is None:
            raise HTTPException(status_code=404, detail=f"{what!r}: one of report, data-docs, bundle, run")
        return RedirectResponse(target, status_code=307)

    # ---- JSON ----
    @app.get("/api/fleet")
    def fleet(user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().fleet(hosts=_fleet_hosts()))

    @app.get("/api/alerts")
    def list_alerts(all: bool = False, host: str | None = None, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_alerts(include_acknowledged=all, host=host))

    @app.get("/api/certifications")
    def list_certifications(host: str | None = None, limit: int = 50, offset: int = 0,
                            user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_certifications(host=host, limit=max(1, min(limit, 500)), offset=max(0, offset)))

    @app.get("/api/outcomes")
    def list_outcomes(limit: int = 50, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_certifications(limit=max(1, min(limit, 500))))

    @app.get("/api/serials")
    def serials(user: Any = Depends(_user_from_request)) -> JSONResponse:
        return _json(_registry().list_serials())

    @app.get("/api/history/{serial}")
    def history(serial: str, user: Any = Depends(_user_from_request)) -> JSONResponse:
        from mi300x_cert.history import UnknownSerialError

        try:
            return _json(_registry().serial_history(serial))
        except UnknownSerialError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    async def _change(alert_id: str, request: Request, user: Any, ack: bool) -> JSONResponse:
        if getattr(request.state, "cert_via_cookie", False) and not request.headers.get("x-requested-with"):
            raise HTTPException(status_code=403, detail="cookie-authenticated requests need X-Requested-With")
        note = _body_note(await request.body())
        reg = _registry()
        try:
            alert = reg.get_alert(alert_id)
        except CertError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        dag_id = _host_dag(alert)
        if not _can_edit_dag(user, dag_id):
            raise HTTPException(status_code=403, detail=f"{_user_name(user)} may not {'acknowledge' if ack else 'reopen'} "
                                                        f"alerts of {alert['host']}: that needs edit permission on DAG {dag_id}")
        by = _user_name(user)
        out = reg.acknowledge(alert_id, by=by, note=note) if ack else reg.reopen(alert_id, by=by, note=note)
        serials = console.card_serials(reg.get_certification(out["host"], out["run_id"])) if out.get("run_id") else {}
        out = dict(out, html=console.alert_fragment(out, serials), open_alerts=_open_count(reg))
        return _json(out)

    @app.post("/api/alerts/{alert_id}/ack")
    async def ack(alert_id: str, request: Request, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return await _change(alert_id, request, user, ack=True)

    @app.post("/api/alerts/{alert_id}/reopen")
    async def reopen(alert_id: str, request: Request, user: Any = Depends(_user_from_request)) -> JSONResponse:
        return await _change(alert_id, request, user, ack=False)

    return app


# ---- Airflow extra links on a run's tasks ------------------------------------------------------
_LINK_TASKS = {"report", "sign", "publish", "register"}


def _go_link(ti_key: Any, what: str) -> str:
    dag_id, task_id = getattr(ti_key, "dag_id", ""), getattr(ti_key, "task_id", "")
    if not str(dag_id).startswith("recertify_") or task_id not in _LINK_TASKS:
        return ""
    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="") or ""
    except Exception:  # noqa: BLE001
        base = ""
    from urllib.parse import urlparse

    root = urlparse(base).path.rstrip("/") if base else ""
    return f"{root}{URL_PREFIX}/go/{quote(str(dag_id), safe='')}/{quote(str(ti_key.run_id), safe='')}/{what}"


class CertificationReportLink(BaseOperatorLink):
    name = "Certification report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _go_link(ti_key, "report")


class DataDocsLink(BaseOperatorLink):
    name = "Data Docs"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _go_link(ti_key, "data-docs")


class BundleLink(BaseOperatorLink):
    name = "Signed bundle"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return _go_link(ti_key, "bundle")


class Mi300xCertPlugin(AirflowPlugin):
    name = "mi300x_cert"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Certification console"}]
    external_views = [{
        "name": "Certification",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "mi300x-cert",
    }]
    global_operator_extra_links = [CertificationReportLink(), DataDocsLink(), BundleLink()]
