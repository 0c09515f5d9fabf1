"""On real smoke runs (`mi300x-cert run all --profile smoke`, tiny models, simulated cards; made
once per module and copied per test):

* evidence completeness — the plan is the checklist: each of six mutations of a complete run
  makes the suite that needs the evidence FAIL with a reason naming what is missing;
* calibration — `mi300x-cert baseline` on two smoke runs writes a params file whose every number
  carries its rule and source runs, and both runs pass under it.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mi300x_cert import cli
from mi300x_cert.validation import expectations_dir, format_verdict, validate

pytestmark = pytest.mark.integration


def _smoke_run(out: Path) -> Path:
    rc = cli.main(["run", "all", "--profile", "smoke", "--out", str(out), "--quiet"])
    assert rc == 0, f"smoke run failed: {(out / 'run.json').read_text() if (out / 'run.json').exists() else out}"
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    return _smoke_run(tmp_path_factory.mktemp("smoke-a") / "run")


@pytest.fixture
def run_copy(smoke_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(smoke_run, dst, ignore=shutil.ignore_patterns("validation", "report", "bundle"))
    return dst


def _reasons(v: dict) -> str:
    return " | ".join(str(f.get("reason")) for f in v["failures"])


def _sd_case_ids(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "results" / "sd-throughput" / "cases").glob("*.json"))


def test_the_complete_smoke_run_passes_every_suite(run_copy):
    v = validate(run_copy)
    assert v["success"] is True, format_verdict(v)


# ---- the six mutations -------------------------------------------------------------------------
GROUP = "g1-c0-3"  # the smoke profile's second bare-metal group: cards [0-3]


def test_bare_metal_group_telemetry_deleted_fails_thermal(run_copy):
    (run_copy / "telemetry" / f"bare-metal-{GROUP}.csv").unlink()
    v = validate(run_copy, "thermal")
    assert v["success"] is False
    assert f"missing telemetry of bare-metal group {GROUP}" in _reasons(v), _reasons(v)


def test_bare_metal_group_telemetry_cut_to_header_fails_thermal(run_copy):
    p = run_copy / "telemetry" / f"bare-metal-{GROUP}.csv"
    p.write_text(p.read_text().splitlines()[0] + "\n")
    v = validate(run_copy, "thermal")
    assert v["success"] is False
    assert f"empty telemetry of bare-metal group {GROUP}" in _reasons(v), _reasons(v)


def test_bare_metal_group_telemetry_cut_before_active_fails_thermal(run_copy):
    events = list(csv.DictReader(open(run_copy / "events" / f"bare-metal-{GROUP}.csv", newline="")))
    t_active = min(float(e["t"]) for e in events if e["kind"] == "phase" and e["phase"] == "active")
    p = run_copy / "telemetry" / f"bare-metal-{GROUP}.csv"
    lines = p.read_text().splitlines()
    head = lines[0].split(",")
    ti = head.index("t")
    kept = [ln for ln in lines[1:] if float(ln.split(",")[ti]) < t_active]
    assert 0 < len(kept) < len(lines) - 1
    p.write_text("\n".join([lines[0]] + kept) + "\n")
    # the thermal verdict reads the table finalize computed from the telemetry: the run as if its
    # telemetry had stopped before the active phase when it was finalized
    assert cli.main(["finalize", str(run_copy), "bare-metal"]) == 0
    v = validate(run_copy, "thermal")
    assert v["success"] is False
    assert f"no active telemetry for card(s) [0, 1, 2, 3] of bare-metal group {GROUP}" in _reasons(v), _reasons(v)


def test_one_sd_case_network_csv_removed_fails_network(run_copy):
    cid = _sd_case_ids(run_copy)[0]
    (run_copy / "network" / f"sd-throughput-{cid}.csv").unlink()
    v = validate(run_copy, "network")
    assert v["success"] is False
    assert f"missing network evidence of sd-throughput case {cid}: network/sd-throughput-{cid}.csv" in _reasons(v)


def test_every_sd_network_and_socket_csv_removed_fails_network(run_copy):
    for kind in ("network", "sockets"):
        for p in (run_copy / kind).glob("sd-throughput-*.csv"):
            p.unlink()
    v = validate(run_copy, "network")
    assert v["success"] is False
    text = _reasons(v)
    for cid in _sd_case_ids(run_copy):
        for kind in ("network", "sockets"):
            assert f"missing {kind} evidence of sd-throughput case {cid}" in text, text


def test_one_sd_case_status_deleted_fails_latency(run_copy):
    cid = _sd_case_ids(run_copy)[-1]
    (run_copy / "results" / "sd-throughput" / "cases" / f"{cid}.json").unlink()
    v = validate(run_copy, "latency")
    assert v["success"] is False
    assert f"missing case status of sd-throughput case {cid}" in _reasons(v), _reasons(v)
    assert any(f.get("case_id") == cid and f["expectation"] == "no_failed_cases" for f in v["failures"])


# ---- calibration ---------------------------------------------------------------------------------
def test_baseline_on_two_smoke_runs_is_traceable_and_the_runs_pass_it(smoke_run, tmp_path, capsys):
    second = _smoke_run(tmp_path / "smoke-b")
    exp = tmp_path / "expectations"
    shutil.copytree(expectations_dir(), exp, ignore=shutil.ignore_patterns("reference-runs"))
    out = exp / "params" / "smoke.yaml"
    out.unlink()
    rc = cli.main(["baseline", str(smoke_run), str(second), "--out", str(out),
                   "--policy", str(expectations_dir() / "params" / "smoke.yaml")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    text = out.read_text()
    data = yaml.safe_load(text)
    run_ids = {json.loads((r / "run.json").read_text())["run_id"] for r in (smoke_run, second)}
    assert {r["run_id"] for r in data["derivation"]["runs"]} == run_ids
    # every number of every suite: a comment on its line, and a sources entry with its rule
    in_suites, numbers = False, 0
    for line in text.splitlines():
        if line.startswith("suites:"):
            in_suites = True
            continue
        if in_suites and not line.startswith(" "):
            break
        if in_suites and re.match(r"^\s+[\w.-]+: -?[\d.]+", line):
            numbers += 1
            assert "#" in line and ("median" in line or "policy" in line or "ceiling" in line), line
    assert numbers >= 15
    for suite, params in data["suites"].items():
        for name, value in params.items():
            keys = [f"{suite}.{name}.{k}" for k in value] if isinstance(value, dict) else [f"{suite}.{name}"]
            for key in keys:
                src = data["sources"][key]
                assert src["rule"]
                if src["rule"] != "policy" and "values" in src:
                    assert {v["run"] for v in src["values"]} == run_ids
                    assert all(v["date"] and v["cards"] for v in src["values"])
    for run in (smoke_run, second):
        copy = tmp_path / f"check-{run.parent.name}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("validation", "report", "bundle"))
        v = validate(copy, expectations=exp)
        assert v["success"] is True, format_verdict(v)
