"""`mi300x-cert certify` end to end: run → validate → report → sign → publish → verify from S3.

Uses the unit-test profile with the worker's debug workload (the real models are exercised by the
workload tests and by the Airflow smoke test), so the whole chain runs in seconds.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from mi300x_cert import cli

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "profiles" / "tiny.yaml"


def _profile(tmp_path: Path, name: str, **simulated) -> Path:
    """The tiny profile, with a fast simulated thermal model so its sub-second phases heat up."""
    prof = yaml.safe_load(TINY.read_text())
    prof.setdefault("telemetry", {})["simulated"] = {"time_scale": 300.0, **simulated}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


@pytest.fixture
def cert_env(monkeypatch, s3_server, signing_env):
    bucket = f"certify-{uuid.uuid4().hex[:10]}"
    for k, v in {
        "MI300X_CERT_WORKLOAD": "debug", "MI300X_CERT_S3_ENDPOINT": s3_server.endpoint,
        "MI300X_CERT_S3_BUCKET": bucket, "MI300X_CERT_S3_CREATE_BUCKET": "true",
        "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
    }.items():
        monkeypatch.setenv(k, v)
    return {"endpoint": s3_server.endpoint, "bucket": bucket}


def _keys(env) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=env["endpoint"], aws_access_key_id="local",
                      aws_secret_access_key="local", region_name="us-east-1")
    try:
        out = s3.list_objects_v2(Bucket=env["bucket"]).get("Contents", [])
    except s3.exceptions.NoSuchBucket:
        return []
    return [o["Key"] for o in out]


def test_certify_passes_and_publishes_a_verifiable_bundle(tmp_path, cert_env, capsys):
    out = tmp_path / "run"
    rc = cli.main(["certify", "--profile", str(_profile(tmp_path, "ok")), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "CERTIFIED" in captured.err
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "complete"
    verdicts = json.loads((out / "validation" / "verdicts.json").read_text())
    assert verdicts["success"] is True
    assert (out / "report" / "index.html").is_file()
    assert (out / "validation" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()
    keys = _keys(cert_env)
    prefix = "certifications/test-host/"
    assert keys and all(k.startswith(prefix) for k in keys)
    assert any(k.endswith("envelope.dsse.json") for k in keys)
    # verify from S3 through the CLI, as an operator would
    run_prefix = "/".join(keys[0].split("/")[:4])
    assert cli.main(["verify", f"s3://{cert_env['bucket']}/{run_prefix}"]) == 0
    assert '"ok": true' in capsys.readouterr().out
    # the registry has what the DAG's register task would have written: the certification (from the
    # bundle read back from S3), one row per card by serial, no alert
    from mi300x_cert.registry import open_registry

    reg = open_registry()
    cert = reg.get_certification("test-host", run["run_id"])
    assert cert["result"] == "CERTIFIED" and cert["source"] == "certify" and cert["trusted"] is True
    assert cert["bundle_uri"] == f"s3://{cert_env['bucket']}/{run_prefix}" and cert["signer_keyid"]
    assert len(cert["cards"]) == len(json.loads((out / "inventory.json").read_text())["cards"])
    assert reg.list_alerts(include_acknowledged=True) == []
    assert cli.main(["fleet", "--json"]) == 0
    fleet = {r["host"]: r for r in json.loads(capsys.readouterr().out)}
    assert fleet["test-host"]["result"] == "CERTIFIED"
    # registering the same published bundle again changes nothing
    assert cli.main(["register", f"s3://{cert_env['bucket']}/{run_prefix}"]) == 0
    assert "already registered, nothing changed" in capsys.readouterr().out


def test_certify_with_a_hot_card_fails_naming_it(tmp_path, cert_env, capsys):
    path = _profile(tmp_path, "hot", hot_cards={13: 30.0})
    rc = cli.main(["certify", "--profile", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err[-3000:]
    text = captured.out + captured.err
    assert "thermal" in text and "card 13" in text
    assert "NOT CERTIFIED" in captured.err
    verdicts = json.loads((tmp_path / "run" / "validation" / "verdicts.json").read_text())
    assert verdicts["success"] is False
    assert verdicts["suites"]["thermal"]["success"] is False
    # the same registry rows and alert as the DAG path: a NOT CERTIFIED certification, the thermal
    # alert naming card 13, the failed expectations, and the hot card's row in its serial's history
    from mi300x_cert.registry import open_registry

    reg = open_registry()
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    cert = reg.get_certification("test-host", run_id)
    assert cert["result"] == "NOT CERTIFIED" and cert["verdicts"]["thermal"] is False
    assert any(f["suite"] == "thermal" and f["card"] == 13 for f in cert["failed"])
    (alert,) = reg.list_alerts()
    assert alert["suite"] == "thermal" and alert["kind"] == "expectation" and alert["host"] == "test-host"
    assert any(str(f.get("card")) == "13" for f in alert["failures"])
    hot = [c for c in cert["cards"] if c["card"] == 13][0]
    assert hot["card_ok"] is False
    assert [r["run_id"] for r in reg.serial_history(hot["serial"])] == [run_id]


def test_certify_bad_profile_is_one_error_and_no_run_dir(tmp_path, cert_env, capsys):
    prof = yaml.safe_load(TINY.read_text())
    prof["experiments"]["sd-throughput"]["batch_configs"] = ["8by64"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(prof))
    rc = cli.main(["certify", "--profile", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "batch_configs" in err and "8by64" in err and str(path) in err
    assert not (tmp_path / "run").exists()
    assert _keys(cert_env) == []


def test_certify_resume_finishes_a_killed_run_and_publishes(tmp_path, cert_env, capsys):
    """`certify` SIGKILLed while a worker is mid-case leaves `state: running`; `certify --resume`
    measures what is missing, then validates, signs, publishes and verifies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    prof = _profile(tmp_path, "ok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MI300X_CERT_DEBUG_PARAMS": json.dumps({"hang_at": 0})}
    proc = subprocess.Popen([sys.executable, "-m", "mi300x_cert.cli", "certify", "--profile", str(prof), "--out",
                             str(out), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "results" / "bare-metal" / "cases"
    t0 = time.time()
    while not any("hanging at batch 0" in p.read_text() for p in log.glob("*/proc*.log")):
        assert time.time() - t0 < 60 and proc.poll() is None, "the worker never hung"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert json.loads((out / "run.json").read_text())["state"] == "running"

    rc = cli.main(["certify", "--resume", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert f"resuming run directory: {out}" in err and "published: s3://" in err and "CERTIFIED" in err
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "complete" and [r["state"] for r in run["resumed"]] == ["running"]
    assert any(k.endswith("/envelope.dsse.json") for k in _keys(cert_env))
    from mi300x_cert.registry import open_registry

    assert open_registry().get_certification("test-host", run["run_id"])["result"] == "CERTIFIED"
