"""Expectation-failure alerts: a hot simulated card fails the thermal suite, the task fails with a
readable summary, an alert record is written and the SMTP notifier sends a mail to a local sink."""

from __future__ import annotations

import json
import socket
import socketserver
import threading

import pytest


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: greeting, EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 sink ESMTP\r\n")
        msg = {"from": None, "to": [], "data": ""}
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode(errors="replace").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.wfile.write(b"250-sink\r\n250 8BITMIME\r\n" if verb == "EHLO" else b"250 sink\r\n")
            elif verb == "MAIL":
                msg["from"] = cmd.split(":", 1)[1].strip()
                self.wfile.write(b"250 OK\r\n")
            elif verb == "RCPT":
                msg["to"].append(cmd.split(":", 1)[1].strip().strip("<>"))
                self.wfile.write(b"250 OK\r\n")
            elif verb == "DATA":
                self.wfile.write(b"354 end with .\r\n")
                body = []
                while True:
                    dl = self.rfile.readline()
                    if not dl or dl in (b".\r\n", b".\n"):
                        break
                    body.append(dl.decode(errors="replace"))
                msg["data"] = "".join(body)
                self.server.messages.append(dict(msg))  # type: ignore[attr-defined]
                msg = {"from": None, "to": [], "data": ""}
                self.wfile.write(b"250 queued\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:  # RSET, NOOP, anything else
                self.wfile.write(b"250 OK\r\n")


@pytest.fixture
def smtp_sink():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpHandler)
    srv.daemon_threads = True
    srv.messages = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_alert_records_list_ack_and_format():
    from mi300x_cert import alerts
    from mi300x_cert.errors import CertError
    from mi300x_cert.registry import open_registry

    reg = open_registry()
    failures = [{"expectation": "junction_active_max", "card": 3, "observed": 85.32525000000001, "expected": "<= 85"}]
    a, created = reg.raise_alert(suite="thermal", kind="expectation", failures=failures, host="h1", run_id="r1",
                                 dag_id="recertify_h1", data_docs="s3://b/p/artifacts/dd/index.html",
                                 message=alerts.summary_text("thermal", failures, host="h1"))
    again, created_again = reg.raise_alert(suite="thermal", kind="expectation", failures=failures, host="h1",
                                           run_id="r1", message="retry")
    assert created and not created_again and again["id"] == a["id"], "a retried task updates its alert"
    assert [x["id"] for x in reg.list_alerts()] == [a["id"]]
    text = alerts.format_alert(reg.get_alert(a["id"]))
    assert "OPEN" in text and "card=3" in text and "observed 85.33" in text and "'<= 85'" in text
    reg.update_run_links("h1", "r1", report="s3://b/p/artifacts/report/index.html", bundle_uri="s3://b/p")
    acked = reg.acknowledge(a["id"], by="oncall", note="fan replaced")
    assert acked["status"] == "acknowledged" and acked["acknowledged_by"] == "oncall" and acked["note"] == "fan replaced"
    assert reg.list_alerts() == []
    full = reg.list_alerts(include_acknowledged=True)[0]
    assert full["report"].endswith("index.html") and full["bundle_uri"] == "s3://b/p"
    assert "ACKNOWLEDGED by oncall" in alerts.format_alert(full)
    with pytest.raises(CertError, match="not found|unknown|no alert"):
        reg.acknowledge("nope", by="x")


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_hot_card_fails_thermal_alerts_and_mails(tmp_path, s3_server, smtp_sink, monkeypatch):
    from mi300x_cert.airflow_local import smoke

    port = smtp_sink.server_address[1]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": port,
        "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "mi300x-cert@example.com", "timeout": 10},
    }))
    monkeypatch.setenv("MI300X_CERT_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("MI300X_CERT_S3_BUCKET", "airflow-alerts")
    monkeypatch.setenv("MI300X_CERT_S3_CREATE_BUCKET", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MI300X_CERT_STATE_DIR", raising=False)

    # bare-metal only keeps it short; card 3 is in the active group [0-3] of the smoke profile
    result = smoke(home=tmp_path / "airflow", out=tmp_path / "runs", hot_card=3, conf={"experiments": ["bare-metal"]})
    states = result["task_states"]
    assert result["state"] == "failed", states
    assert states["validation.validate_thermal"] == "failed", states
    assert states["validation.validate_network"] == "success", states
    assert states["validation.validate_latency"] == "skipped", states
    # the evidence is still reported, signed and published
    assert states["report"] == "success" and states["sign"] == "success" and states["publish"] == "success", states
    assert states["register"] == "failed"  # the control plane's conclusion: NOT certified
    outcome = result["outcome"]
    assert outcome["certified"] is False and outcome["verdicts"]["thermal"] is False
    assert any("thermal" in r for r in outcome["reasons"])
    assert outcome["bundle_uri"].startswith("s3://airflow-alerts/")

    (alert,) = result["alerts"]
    assert alert["suite"] == "thermal" and alert["host"] == "smoke-host" and alert["status"] == "open"
    assert alert["failures"], alert
    assert alert["report"].startswith(outcome["bundle_uri"]) and alert["bundle_uri"] == outcome["bundle_uri"]

    assert smtp_sink.messages, "the SMTP notifier sent nothing"
    mail = smtp_sink.messages[0]
    assert "gpu-fleet@example.com" in mail["to"]
    assert "thermal" in mail["data"] and "smoke-host" in mail["data"]

    # the CLI sees and acknowledges the alert the control plane's register task raised
    from mi300x_cert.cli import main
    from mi300x_cert.registry import open_registry

    from mi300x_cert.airflow_dags import _safe

    state = tmp_path / "airflow" / "mi300x-cert"
    monkeypatch.setenv("MI300X_CERT_STATE_DIR", str(state))  # the registry the DAG's register task wrote
    assert main(["alerts"]) == 0
    assert main(["alerts", "--ack", alert["id"], "--by", "oncall", "--note", "checked fans"]) == 0
    from mi300x_cert.registry import close_all

    close_all()
    reg = open_registry()
    assert reg.list_alerts() == [] and reg.get_alert(alert["id"])["acknowledged_by"] == "oncall"
    cert = reg.get_certification("smoke-host", _safe(result["run_id"]))
    assert cert["result"] == "NOT CERTIFIED" and cert["failed"], cert
