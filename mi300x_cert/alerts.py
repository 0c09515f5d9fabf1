"""Alert wording and notifications. The records themselves live in the fleet registry.

Alerts (one per failed suite of a run, a refused bundle, an expired certificate, drift…) are rows
of :mod:`mi300x_cert.registry`, written by :func:`mi300x_cert.register.conclude` on the control plane
and acknowledged there (``mi300x-cert alerts --ack``, the console). This module formats them for
people and sends the notifications (e-mail through an Airflow SMTP connection, Slack through a
webhook connection) when configured; a notifier that fails is logged, never allowed to hide the
record. It also names this machine's state directory (``$MI300X_CERT_STATE_DIR``, else
``$AIRFLOW_HOME/mi300x-cert`` when ``AIRFLOW_HOME`` is set, else ``~/.mi300x-cert``), where the
embedded registry and the runs live. No heavy imports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = [
    "state_dir",
    "format_alert",
    "format_failure",
    "summary_text",
    "notify",
]

log = logging.getLogger(__name__)


# ---- locations ---------------------------------------------------------------------------------
def state_dir() -> Path:
    if os.environ.get("MI300X_CERT_STATE_DIR"):
        return Path(os.environ["MI300X_CERT_STATE_DIR"])
    if os.environ.get("AIRFLOW_HOME"):
        return Path(os.environ["AIRFLOW_HOME"]) / "mi300x-cert"
    return Path.home() / ".mi300x-cert"


# ---- formatting --------------------------------------------------------------------------------
def _readable(v) -> str:
    """85.32525000000001 → 85.33; other values as repr."""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return repr(v)


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
        line += f": observed {_readable(observed)}, expected {_readable(expected)}"
    if f.get("message"):
        line += f" ({f['message']})"
    return line


def format_alert(alert: dict) -> str:
    acked = alert.get("status") == "acknowledged" or alert.get("acknowledged") is True
    state = f"ACKNOWLEDGED by {alert.get('acknowledged_by')} at {alert.get('acknowledged_at')}" if acked else "OPEN"
    kind = alert.get("kind") or "expectation"
    lines = [f"[{state}] {alert['id']}  host={alert.get('host')} {kind} suite={alert.get('suite')} "
             f"run={alert.get('run_id')} created={alert.get('created')}"
             + (f" severity={alert['severity']}" if alert.get("severity") not in (None, "error") else "")]
    failures = [f for f in alert.get("failures") or [] if isinstance(f, dict)]
    if alert.get("message") and (kind != "expectation" or not failures):
        lines += [f"    {line}" for line in str(alert["message"]).splitlines()]
    for f in failures:
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
