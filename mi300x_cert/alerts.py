"""Expectation-failure alerts and certification outcome records.

An alert is one JSON file per failed validation suite of one run, written atomically to the alerts
directory (``$MI300X_CERT_ALERTS_DIR``, else ``<state dir>/alerts``)::

    {id, created, host, dag_id, run_id, run_dir, suite, failures: [...], report, data_docs,
     bundle_uri, acknowledged, acknowledged_by, acknowledged_at, note}

The state directory is ``$MI300X_CERT_STATE_DIR``, else ``$AIRFLOW_HOME/mi300x-cert`` when
``AIRFLOW_HOME`` is set, else ``~/.mi300x-cert``. Outcome records (one per certification run: certified
or not, verdicts, links) live in ``<state dir>/outcomes`` (``$MI300X_CERT_OUTCOMES_DIR``).

The record is always written; notifications (e-mail through an Airflow SMTP connection, Slack through
a webhook connection) are sent by :func:`notify` when configured, and a notifier that fails is logged,
never allowed to hide the alert. The CLI (``mi300x-cert alerts``), the DAGs and the Airflow dashboard
plugin all read and write through this module. No heavy imports.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from .errors import CertError
from .rundir import atomic_write_json, utcnow

__all__ = [
    "state_dir",
    "alerts_dir",
    "outcomes_dir",
    "make_alert",
    "write_alert",
    "raise_alert",
    "list_alerts",
    "get_alert",
    "acknowledge",
    "update_run_links",
    "format_alert",
    "format_failure",
    "summary_text",
    "notify",
    "write_outcome",
    "list_outcomes",
]

log = logging.getLogger(__name__)
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


# ---- locations ---------------------------------------------------------------------------------
def state_dir() -> Path:
    if os.environ.get("MI300X_CERT_STATE_DIR"):
        return Path(os.environ["MI300X_CERT_STATE_DIR"])
    if os.environ.get("AIRFLOW_HOME"):
        return Path(os.environ["AIRFLOW_HOME"]) / "mi300x-cert"
    return Path.home() / ".mi300x-cert"


def alerts_dir() -> Path:
    return Path(os.environ.get("MI300X_CERT_ALERTS_DIR") or state_dir() / "alerts")


def outcomes_dir() -> Path:
    return Path(os.environ.get("MI300X_CERT_OUTCOMES_DIR") or state_dir() / "outcomes")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "x"


# ---- formatting --------------------------------------------------------------------------------
def format_failure(f: dict) -> str:
    """One failed expectation as one readable line: expectation, card, observed vs expected."""
    parts = [str(f.get("expectation") or f.get("expectation_type") or f.get("type") or "expectation")]
    for key in ("column", "card", "phase", "experiment", "case_id"):
        if f.get(key) not in (None, ""):
            parts.append(f"{key}={f[key]}")
    line = " ".join(parts)
    observed = f.get("observed", f.get("observed_value"))
    expected = f.get("expected", f.get("expected_value"))
    if observed is not None or expected is not None:
        line += f": observed {observed!r}, expected {expected!r}"
    if f.get("message"):
        line += f" ({f['message']})"
    return line


def format_alert(alert: dict) -> str:
    state = f"ACKNOWLEDGED by {alert.get('acknowledged_by')}" if alert.get("acknowledged") else "OPEN"
    lines = [f"[{state}] {alert['id']}  host={alert.get('host')} suite={alert.get('suite')} "
             f"run={alert.get('run_id')} created={alert.get('created')}"]
    for f in alert.get("failures") or []:
        lines.append(f"    - {format_failure(f)}")
    for key, label in (("report", "report"), ("data_docs", "data docs"), ("bundle_uri", "bundle"), ("run_dir", "run dir")):
        if alert.get(key):
            lines.append(f"    {label}: {alert[key]}")
    if alert.get("note"):
        lines.append(f"    note: {alert['note']}")
    return "\n".join(lines)


def summary_text(suite: str, failures: list[dict], host: str | None = None) -> str:
    head = f"suite {suite!r} failed on host {host}" if host else f"suite {suite!r} failed"
    n = len(failures)
    lines = [f"{head}: {n} expectation{'s' if n != 1 else ''} not met"]
    lines += [f"  - {format_failure(f)}" for f in failures]
    return "\n".join(lines)


# ---- records -----------------------------------------------------------------------------------
def make_alert(*, suite: str, failures: list[dict], host: str | None = None, dag_id: str | None = None,
               run_id: str | None = None, run_dir: str | None = None, report: str | None = None,
               data_docs: str | None = None) -> dict:
    created = utcnow()
    key = f"{host}|{dag_id}|{run_id}|{run_dir}|{suite}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return {
        "id": f"{stamp}-{_safe(host or 'local')}-{_safe(suite)}-{digest}",
        "created": created,
        "host": host,
        "dag_id": dag_id,
        "run_id": run_id,
        "run_dir": run_dir,
        "suite": suite,
        "failures": list(failures),
        "report": report,
        "data_docs": data_docs,
        "bundle_uri": None,
        "acknowledged": False,
        "acknowledged_by": None,
        "acknowledged_at": None,
        "note": "",
    }


def _existing_for(host: str | None, dag_id: str | None, run_id: str | None, run_dir: str | None, suite: str) -> dict | None:
    for a in list_alerts(include_acknowledged=True):
        if (a.get("host"), a.get("dag_id"), a.get("run_id"), a.get("run_dir"), a.get("suite")) == (host, dag_id, run_id, run_dir, suite):
            return a
    return None


def write_alert(alert: dict) -> Path:
    """Write (or replace) one alert record atomically. Returns its path."""
    if not _ID_RE.match(alert.get("id", "")):
        raise CertError(f"alert id {alert.get('id')!r} is not a valid id")
    path = alerts_dir() / f"{alert['id']}.json"
    atomic_write_json(path, alert)
    return path


def raise_alert(*, suite: str, failures: list[dict], host: str | None = None, dag_id: str | None = None,
                run_id: str | None = None, run_dir: str | None = None, report: str | None = None,
                data_docs: str | None = None, recipients: list[str] | None = None,
                smtp_conn_id: str | None = None, slack_conn_id: str | None = None,
                context: dict | None = None) -> dict:
    """Write the alert record (idempotent per run and suite: a retried task updates the same record),
    then send the configured notifications. Returns the alert with ``notified`` channels."""
    alert = _existing_for(host, dag_id, run_id, run_dir, suite)
    if alert is None:
        alert = make_alert(suite=suite, failures=failures, host=host, dag_id=dag_id, run_id=run_id,
                           run_dir=run_dir, report=report, data_docs=data_docs)
    else:
        alert.update(failures=list(failures), report=report or alert.get("report"),
                     data_docs=data_docs or alert.get("data_docs"))
    write_alert(alert)
    alert["notified"] = notify(alert, recipients=recipients or [], smtp_conn_id=smtp_conn_id,
                               slack_conn_id=slack_conn_id, context=context)
    return alert


def list_alerts(include_acknowledged: bool = False) -> list[dict]:
    """Alerts, newest first. Unreadable files are skipped with a warning."""
    d = alerts_dir()
    out: list[dict] = []
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        try:
            a = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable alert %s: %s", p, e)
            continue
        if include_acknowledged or not a.get("acknowledged"):
            out.append(a)
    out.sort(key=lambda a: (a.get("created") or "", a.get("id") or ""), reverse=True)
    return out


def get_alert(alert_id: str) -> dict:
    if not _ID_RE.match(alert_id or ""):
        raise CertError(f"alert id {alert_id!r} is not a valid id")
    p = alerts_dir() / f"{alert_id}.json"
    if not p.is_file():
        raise CertError(f"alert {alert_id!r} not found in {alerts_dir()}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CertError(f"alert {alert_id!r} is not valid JSON: {e}") from e


def acknowledge(alert_id: str, by: str, note: str = "") -> dict:
    """Mark an alert acknowledged by ``by`` with an optional note. Returns the updated record."""
    if not by or not str(by).strip():
        raise CertError("acknowledging an alert needs a name (by)")
    alert = get_alert(alert_id)
    alert.update(acknowledged=True, acknowledged_by=str(by).strip(), acknowledged_at=utcnow(), note=note or "")
    write_alert(alert)
    return alert


def update_run_links(run_id: str | None, run_dir: str | None, *, report: str | None = None,
                     data_docs: str | None = None, bundle_uri: str | None = None) -> int:
    """Add the report / bundle links to every alert of one run (known only after the report task)."""
    n = 0
    for a in list_alerts(include_acknowledged=True):
        if (run_id and a.get("run_id") == run_id) or (run_dir and a.get("run_dir") == run_dir):
            if report:
                a["report"] = report
            if data_docs and not a.get("data_docs"):
                a["data_docs"] = data_docs
            if bundle_uri:
                a["bundle_uri"] = bundle_uri
            write_alert(a)
            n += 1
    return n


# ---- notifications -----------------------------------------------------------------------------
def _connection_exists(conn_id: str) -> bool:
    try:
        from airflow.sdk import BaseHook  # type: ignore[attr-defined]
    except ImportError:
        try:
            from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
        except ImportError:
            return False
    try:
        BaseHook.get_connection(conn_id)
        return True
    except Exception:  # AirflowNotFoundException and friends
        return False


def _subject(alert: dict) -> str:
    return f"[mi300x-cert] {alert.get('host')}: suite {alert.get('suite')} failed ({alert.get('run_id')})"


def _html(alert: dict) -> str:
    import html

    return "<pre>" + html.escape(format_alert(alert)) + "</pre>"


def notify(alert: dict, *, recipients: list[str], smtp_conn_id: str | None = None,
           slack_conn_id: str | None = None, context: dict | None = None) -> list[str]:
    """Send the alert by e-mail (SmtpNotifier) and Slack (SlackWebhookNotifier) where configured:
    recipients listed and the Airflow connection defined. Returns the channels that were sent."""
    sent: list[str] = []
    ctx = dict(context or {})
    if recipients and smtp_conn_id and _connection_exists(smtp_conn_id):
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            SmtpNotifier(to=list(recipients), smtp_conn_id=smtp_conn_id, subject=_subject(alert),
                         html_content=_html(alert)).notify(ctx)
            sent.append("email")
        except Exception as e:  # a broken mail relay must not hide the alert record
            log.warning("e-mail notification for alert %s failed: %s", alert.get("id"), e)
    elif recipients:
        log.info("alert %s: e-mail not sent (connection %r not configured)", alert.get("id"), smtp_conn_id)
    if slack_conn_id and _connection_exists(slack_conn_id):
        try:
            from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

            SlackWebhookNotifier(slack_webhook_conn_id=slack_conn_id, text=format_alert(alert)).notify(ctx)
            sent.append("slack")
        except Exception as e:
            log.warning("Slack notification for alert %s failed: %s", alert.get("id"), e)
    return sent


# ---- outcome records ---------------------------------------------------------------------------
def write_outcome(outcome: dict) -> Path:
    """Write the certification outcome of one run (``certified`` plus links). Returns its path."""
    name = f"{_safe(outcome.get('host') or 'local')}-{_safe(outcome.get('run_id') or utcnow())}.json"
    outcome = {"recorded": utcnow(), **outcome}
    path = outcomes_dir() / name
    atomic_write_json(path, outcome)
    from .history import record_run_quietly  # per-serial history; logs, never raises

    record_run_quietly(outcome.get("run_dir"), certified=outcome.get("certified"))
    return path


def list_outcomes(limit: int = 50) -> list[dict]:
    d = outcomes_dir()
    rows: list[dict] = []
    if d.is_dir():
        for p in d.glob("*.json"):
            try:
                rows.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                log.warning("skipping unreadable outcome %s: %s", p, e)
    rows.sort(key=lambda r: r.get("recorded") or "", reverse=True)
    return rows[:limit]
