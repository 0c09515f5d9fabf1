"""`mi300x-cert baseline` on fabricated runs: the rule, the traces, and refusals that write nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from fake_run import make_fake_run  # noqa: E402

from mi300x_cert import cli  # noqa: E402
from mi300x_cert.errors import ValidationError  # noqa: E402
from mi300x_cert.validation.baseline import derive  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return make_fake_run(base / "a", seed=1), make_fake_run(base / "b", seed=2)


def test_floor_and_ceiling_follow_the_rule(two_runs):
    b = derive(list(two_runs))
    src = b.sources["whisper.min_tokens_per_s"]
    vals = [v["value"] for v in src["values"]]
    center, spread = sorted(vals)[0] + (max(vals) - min(vals)) / 2, max(vals) - min(vals)
    assert src["center"] == pytest.approx(center, rel=1e-6)
    assert b.params["whisper"]["min_tokens_per_s"] <= center - max(2 * spread, 0.15 * center) + 1e-9
    lat = b.sources["latency.per_image_max_s_by_batch_config.4x1"]
    assert b.params["latency"]["per_image_max_s_by_batch_config"]["4x1"] >= lat["center"] + lat["margin"] - 1e-9
    assert b.params["thermal"]["active_max_c"] >= b.sources["thermal.active_max_c"]["center"] + 5.0
    assert b.sources["network.max_external_connections"]["rule"] == "policy"


def test_cli_writes_a_traceable_file(two_runs, tmp_path):
    out = tmp_path / "p.yaml"
    assert cli.main(["baseline", *map(str, two_runs), "--out", str(out), "--set", "fake"]) == 0
    data = yaml.safe_load(out.read_text())
    assert data["set"] == "fake" and {r["dir"] for r in data["derivation"]["runs"]} == {"a", "b"}
    for line in out.read_text().split("suites:", 1)[1].split("derivation:", 1)[0].splitlines():
        if ":" in line and line.split(":", 1)[1].strip() not in ("",):
            assert "#" in line, line


def test_an_incomplete_reference_run_is_refused_and_nothing_written(two_runs, tmp_path):
    bad = make_fake_run(tmp_path / "bad")
    meta = json.loads((bad / "run.json").read_text())
    meta["state"] = "failed"
    (bad / "run.json").write_text(json.dumps(meta))
    out = tmp_path / "p.yaml"
    with pytest.raises(ValidationError, match="not 'complete'"):
        derive([two_runs[0], bad])
    assert cli.main(["baseline", str(two_runs[0]), str(bad), "--out", str(out)]) == 2
    assert not out.exists()


def test_a_run_with_missing_evidence_is_refused(tmp_path):
    run = make_fake_run(tmp_path / "r", drop_file="telemetry/bare-metal-g1-c0-3.csv")
    with pytest.raises(ValidationError, match="bare-metal-g1-c0-3"):
        derive([run])
