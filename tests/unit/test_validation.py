"""GX verdicts on fabricated run directories: a clean smoke run passes every suite; each injected
fault fails the right suite naming what failed; missing inputs and tampered suites fail closed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from fake_run import make_fake_run  # noqa: E402

from mi300x_cert.validation import SUITES, expectations_dir, format_verdict, validate  # noqa: E402


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = make_fake_run(tmp_path_factory.mktemp("clean") / "run")
    return root, validate(root)


def _fails(verdict: dict, expectation: str) -> list[dict]:
    return [f for f in verdict["failures"] if f["expectation"] == expectation]


def test_clean_smoke_run_passes_every_suite(clean):
    root, v = clean
    assert v["success"] is True, format_verdict(v)
    assert set(v["suites"]) == set(SUITES)
    for name, s in v["suites"].items():
        assert s["status"] == "passed", (name, s["failures"])
        assert s["evaluated"] == s["declared"] == s["loaded"] > 0
    # verdict files and Data Docs exist
    saved = json.loads((root / "validation" / "verdicts.json").read_text())
    assert saved["success"] is True and set(saved["suites"]) == set(SUITES)
    for name in SUITES:
        assert json.loads((root / "validation" / f"{name}.json").read_text())["suite"] == name
    assert (root / "validation" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()
    assert "PASS" in format_verdict(v)


def test_every_suite_declares_its_count_and_uses_parameters():
    for name in SUITES:
        data = json.loads((expectations_dir() / f"{name}.json").read_text())
        assert data["meta"]["declared_expectations"] == len(data["expectations"])
    thermal = (expectations_dir() / "thermal.json").read_text()
    assert '"$PARAMETER": "idle_max_c"' in thermal and '"$PARAMETER": "junction_limit_c"' in thermal


def test_hot_card_fails_thermal_naming_card_and_value(tmp_path):
    root = make_fake_run(tmp_path / "run", hot_card=13, hot_delta=30.0)
    v = validate(root, "thermal")
    assert v["success"] is False
    band = _fails(v, "active_band")
    assert [f["card"] for f in band] == [13]
    assert band[0]["observed"] > 70 and band[0]["observed_f"] > 158
    assert "card 13 active" in band[0]["reason"] and "°F" in band[0]["reason"]
    assert all(f.get("card") == 13 for f in v["failures"] if f.get("card") is not None)


def test_unreadable_sensor_fails_naming_the_card(tmp_path):
    root = make_fake_run(tmp_path / "run", broken_sensor_card=5)
    v = validate(root, "thermal")
    f = _fails(v, "junction_sensor_readable")
    assert {x["card"] for x in f} == {5} and all(x["observed"] == 0.0 for x in f)
    assert f[0]["reason"].startswith("unreadable sensor: card 5")


def test_throttle_fails_thermal(tmp_path):
    root = make_fake_run(tmp_path / "run", throttle_card=2)
    v = validate(root, "thermal")
    f = _fails(v, "no_thermal_throttle")
    assert [x["card"] for x in f] == [2] and f[0]["observed"] > 0


def test_outbound_traffic_fails_network(tmp_path):
    root = make_fake_run(tmp_path / "run", external_bytes=5_000_000)
    v = validate(root, "network")
    f = _fails(v, "external_bytes_sent")
    assert v["success"] is False and len(f) == 1
    # the excess over the host's idle-phase rate (≈150 B/s here) is judged in observed mode
    assert f[0]["interface"] == "eth0" and f[0]["phase"] == "active" and 4_900_000 < f[0]["observed"] <= 5_000_000
    assert "observed" in v["evidence"]["decided_by"]


def test_enforced_mode_host_traffic_is_background_not_failure(tmp_path):
    """Enforced mode: the workers' own namespaces decide; megabytes on the host's eth0 are other
    processes' bytes, reported as background."""
    root = make_fake_run(tmp_path / "run", external_bytes=5_000_000, mode="enforced")
    v = validate(root, "network")
    assert v["success"] is True, format_verdict(v)
    ev = v["evidence"]
    assert ev["mode"] == "enforced" and ev["workers"] == ev["workers_isolated"] > 0
    assert ev["background_bytes"]["bytes_sent"] > 5_000_000
    assert "namespace" in ev["decided_by"]


def test_enforced_mode_worker_in_host_namespace_fails(tmp_path):
    root = make_fake_run(tmp_path / "run", mode="enforced", leaky_worker=True)
    v = validate(root, "network")
    f = _fails(v, "worker_isolated")
    assert v["success"] is False and len(f) == 1 and f[0]["pid"] == 4000 and "host" not in f[0]["subject"]


def test_enforced_mode_without_namespace_evidence_fails(tmp_path):
    root = make_fake_run(tmp_path / "run", mode="enforced")
    (root / "netns" / "whisper-r1.csv").unlink()
    v = validate(root, "network")
    assert v["success"] is False
    assert any("netns/whisper-r1.csv" in f["reason"] for f in v["failures"]), format_verdict(v)


def test_external_connection_fails_network(tmp_path):
    root = make_fake_run(tmp_path / "run", external_connection=True)
    v = validate(root, "network")
    assert v["success"] is False
    f = _fails(v, "no_external_connections")
    assert f and all("52.1.2.3:443" in x["subject"] and x["observed"] is True for x in f)
    assert _fails(v, "external_connection_count")[0]["observed"] == len(f)


def test_unknown_network_mode_fails(tmp_path):
    root = make_fake_run(tmp_path / "run", mode="auto")
    v = validate(root, "network")
    assert [f["observed"] for f in _fails(v, "mode_known")] == ["auto"]


def test_missing_metric_fails_closed(tmp_path):
    root = make_fake_run(tmp_path / "run", drop_column=("telemetry", "junction_c"))
    v = validate(root, "thermal")
    assert v["success"] is False
    reasons = " | ".join(f["reason"] for f in v["failures"])
    assert "missing column 'junction_c'" in reasons
    assert _fails(v, "junction_metric_present"), reasons


def test_missing_file_fails_closed(tmp_path):
    root = make_fake_run(tmp_path / "run", drop_file="results/whisper/rows.csv")
    v = validate(root, "whisper")
    assert v["success"] is False
    assert any("missing file: results/whisper/rows.csv" in f["reason"] for f in v["failures"])


def test_failed_case_fails_latency(tmp_path):
    root = make_fake_run(tmp_path / "run", failed_case=True)
    v = validate(root, "latency")
    f = _fails(v, "no_failed_cases")
    assert [x["case_id"] for x in f] == ["p2-b2x2-r1"] and f[0]["observed"] == "failed"
    assert "exited with code -9" in f[0]["reason"]


def test_slow_batch_config_fails_latency_naming_config(tmp_path):
    root = make_fake_run(tmp_path / "run", slow_config="2x2")
    # 3x slower at every N: per-process scaling still holds and the smoke SKU bound is loose,
    # but a per-batch-config bound catches it
    assert validate(root, "latency")["success"] is True
    shutil.copytree(expectations_dir(), tmp_path / "exp")
    p = tmp_path / "exp" / "params" / "smoke.yaml"
    p.write_text(p.read_text().replace("per_image_max_s_by_batch_config: {}", "per_image_max_s_by_batch_config: {2x2: 0.3}"))
    v = validate(root, "latency", expectations=tmp_path / "exp")
    f = _fails(v, "per_image_latency_by_batch_config")
    assert {x["batch_config"] for x in f} == {"2x2"} and {x["process_count"] for x in f} == {1, 2, 4}


def test_dropped_or_unknown_expectation_fails_closed(tmp_path, clean):
    root, _ = clean
    exp = tmp_path / "exp"
    shutil.copytree(expectations_dir(), exp)
    # (1) an expectation removed, declared count unchanged
    data = json.loads((exp / "thermal.json").read_text())
    data["expectations"].pop()
    (exp / "thermal.json").write_text(json.dumps(data))
    # (2) an unknown (custom, never imported) expectation type: GX drops it silently on load
    data = json.loads((exp / "network.json").read_text())
    data["expectations"][3]["type"] = "expect_column_values_to_be_cool_custom"
    (exp / "network.json").write_text(json.dumps(data))
    run = tmp_path / "run"
    shutil.copytree(root, run)
    v = validate(run, expectations=exp)
    assert v["success"] is False
    th, net = v["suites"]["thermal"], v["suites"]["network"]
    assert th["declared"] == 15 and th["loaded"] == 14 and _fails(th, "declared_count")
    assert net["declared"] == 11 and net["loaded"] == 10
    reason = _fails(net, "declared_count")[0]["reason"]
    assert "expect_column_values_to_be_cool_custom" in reason and "declares 11" in reason
    assert v["suites"]["latency"]["success"] is True


def test_disabled_experiment_is_skipped_but_missing_data_fails(tmp_path):
    root = make_fake_run(tmp_path / "run", disabled=["whisper"])
    v = validate(root, "whisper")
    assert v["status"] == "skipped" and v["reason"] == "skipped: experiment disabled" and v["success"] is True
    assert "SKIPPED" in format_verdict(v)


def test_missing_thresholds_set_fails_closed(tmp_path, clean):
    root, _ = clean
    run = tmp_path / "run"
    shutil.copytree(root, run)
    p = run / "profile.yaml"
    p.write_text(p.read_text().replace("thresholds: smoke", "thresholds: nosuchsku"))
    v = validate(run, "resnet50")
    assert v["success"] is False and "nosuchsku" in v["failures"][0]["reason"]


def test_run_that_did_not_complete_fails_overall(tmp_path):
    """Clean data of an interrupted run: the suite itself passes, the overall verdict fails closed."""
    root = make_fake_run(tmp_path / "run")
    meta = json.loads((root / "run.json").read_text())
    meta.update(state="failed", error="interrupted (SIGTERM) during resnet50")
    (root / "run.json").write_text(json.dumps(meta))
    v = validate(root, "whisper")
    assert v["success"] is True
    saved = json.loads((root / "validation" / "verdicts.json").read_text())
    assert saved["success"] is False
    [p] = saved["run_problems"]
    assert p["expectation"] == "run_complete" and p["observed"] == "failed"
    assert "interrupted (SIGTERM) during resnet50" in p["reason"]
    assert "FAIL     run       run state is 'failed'" in format_verdict(saved)


def test_invalid_stored_profile_is_one_run_dir_error(tmp_path, capsys):
    from mi300x_cert import cli
    from mi300x_cert.errors import RunDirError

    root = make_fake_run(tmp_path / "run")
    with open(root / "profile.yaml", "a") as f:
        f.write("bogus_key: 1\n")
    with pytest.raises(RunDirError, match=r"stored profile is not valid: .*profile\.yaml: bogus_key: unknown key"):
        validate(root, "whisper")
    assert cli.main(["validate", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus_key: unknown key" in err and "Traceback" not in err
    (root / "profile.yaml").unlink()
    with pytest.raises(RunDirError, match="has no profile.yaml"):
        validate(root)
