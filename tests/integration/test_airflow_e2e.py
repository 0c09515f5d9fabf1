"""The smoke recertification DAG, run in-process with ``dag.test`` in a fresh AIRFLOW_HOME, against the
real engine: every task succeeds, every suite passes, and the signed bundle lands in S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def test_smoke_dag_certifies_and_publishes(tmp_path, s3_server, monkeypatch):
    from mi300x_cert.airflow_local import smoke
    from mi300x_cert.storage import parse_s3_uri

    monkeypatch.setenv("MI300X_CERT_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("MI300X_CERT_S3_BUCKET", "airflow-e2e")
    monkeypatch.setenv("MI300X_CERT_S3_CREATE_BUCKET", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MI300X_CERT_STATE_DIR", raising=False)

    result = smoke(home=tmp_path / "airflow", out=tmp_path / "runs", echo=True)
    states = result["task_states"]
    assert result["state"] == "success", states
    for tid in ("preflight", "bare_metal", "plan_sd", "finalize_sd", "whisper", "resnet50", "hardware_ceilings",
                "finish_run", "report", "sign", "publish", "register"):
        assert states.get(tid) == "success", (tid, states)
    cases = [k for k in states if k.startswith("run_sd_case[")]
    assert len(cases) >= 2 and all(states[k] == "success" for k in cases), states
    from mi300x_cert.airflow_dags import SUITES

    for suite in SUITES:
        assert states.get(f"validation.validate_{suite}") == "success", (suite, states)

    outcome = result["outcome"]
    assert outcome["certified"] is True, outcome
    assert set(outcome["verdicts"]) == set(SUITES) and "hardware-ceilings" in SUITES
    assert all(outcome["verdicts"].values())
    run_dir = Path(outcome["run_dir"])
    assert run_dir.is_relative_to(tmp_path / "runs")
    assert json.loads((run_dir / "run.json").read_text())["state"] == "complete"
    assert Path(outcome["report_file"]).is_file()
    assert outcome["report"] == outcome["bundle_uri"] + "/artifacts/report/index.html"
    assert outcome["source"] == "register" and outcome["trusted"] is True and len(outcome["cards"]) == 16
    assert result["alerts"] == []
    assert result["verified"]["trusted"] is True and result["verified"]["decision"]["certified"] is True

    # the bundle is in S3, and its signature and digests check out
    uri = outcome["bundle_uri"]
    assert uri.startswith("s3://airflow-e2e/")
    assert result["verified"], result
    import boto3

    bucket, prefix = parse_s3_uri(uri)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="local",
                      aws_secret_access_key="local", region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/").get("Contents", [])]
    assert any(k.endswith("envelope.dsse.json") for k in keys), keys
    assert any(k.endswith("manifest.json") for k in keys), keys
