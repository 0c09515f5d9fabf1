"""The archived reference runs (``expectations/reference-runs/*.tgz``) carry the ``stats/`` tables
today's verdicts read: ``baseline`` on them, without finalizing first, reproduces the committed
params files (sections from other runs excepted, as expectations/README.md says), and a run that
predates an experiment is not asked for that experiment's evidence."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from mi300x_cert.validation import expectations_dir
from mi300x_cert.validation.baseline import derive

EXP = expectations_dir()
REF = EXP / "reference-runs"
PARAMS = EXP / "params"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference-runs")
    for f in sorted(REF.glob("*.tgz")):
        with tarfile.open(f) as t:
            t.extractall(root, filter="data")
    return root


def _suites(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["suites"]


def test_every_archive_carries_the_verdict_tables(runs):
    from mi300x_cert.rundir import RunDir

    for d in ("h200-1", "h200-2", "h200-opt-1", "run"):
        enabled = {n for n, s in RunDir(runs / d).load_profile().experiments.model_dump(by_alias=True).items()
                   if s.get("enabled")}
        want = {"sd-throughput": ["stats/sd_latency.csv"], "whisper": ["stats/whisper_tokens.csv", "stats/whisper_batches.csv"],
                "bare-metal": ["stats/bare_metal_thermal.csv", "stats/bare_metal_recovery.csv"],
                "resnet50": ["stats/resnet50.csv"], "hardware-ceilings": ["stats/hardware_ceilings.csv"]}
        for exp in enabled:
            for table in want.get(exp, []):
                assert (runs / d / table).is_file(), (d, table)
                problems = runs / d / Path(table).with_suffix(".problems.json")
                if problems.exists():
                    assert problems.read_text().strip() == "[]", (d, problems.read_text())


@pytest.mark.parametrize("dirs,policy,committed", [
    (["h200-1", "h200-2"], "h100.yaml", "h200.yaml"),
    (["h200-opt-1"], "h200.yaml", "h200-optimized.yaml"),
])
def test_baseline_reproduces_the_committed_set(runs, dirs, policy, committed):
    """Every section but hardware-ceilings (these runs predate it / left it out; its floors come
    from the ceilings run, below)."""
    got = derive([runs / d for d in dirs], policy=PARAMS / policy).params
    want = _suites(PARAMS / committed)
    assert "hardware-ceilings" not in got
    assert got == {s: v for s, v in want.items() if s != "hardware-ceilings"}


def test_the_ceilings_run_reproduces_the_hardware_ceilings_floors(runs):
    got = derive([runs / "run"], policy=PARAMS / "h200.yaml").params["hardware-ceilings"]
    for committed in ("h200.yaml", "h200-optimized.yaml"):
        assert got == _suites(PARAMS / committed)["hardware-ceilings"], committed


def test_a_run_that_predates_an_experiment_is_not_asked_for_it(runs):
    from mi300x_cert.rundir import RunDir

    rd = RunDir(runs / "h200-1")
    assert rd.predated_experiments() == ["hardware-ceilings"]
    assert rd.load_profile().experiments.hardware_ceilings.enabled is False
    assert RunDir(runs / "h200-opt-1").predated_experiments() == []  # disabled there, not predated


def test_its_suite_is_skipped_saying_so_and_fails_once_the_profile_names_it(runs, tmp_path):
    """Skipped only because the plan lacked it: the same run whose profile names the experiment
    (enabled) fails its suite for the missing table."""
    import shutil

    from mi300x_cert.validation import validate

    v = validate(runs / "h200-1", "hardware-ceilings")
    assert v["success"] is True and v["status"] == "skipped", v
    assert "predates the hardware-ceilings experiment" in v["reason"]
    copy = tmp_path / "h200-1"
    shutil.copytree(runs / "h200-1", copy)
    shutil.rmtree(copy / "validation", ignore_errors=True)
    prof = yaml.safe_load((copy / "profile.yaml").read_text())
    prof["experiments"]["hardware-ceilings"] = {"enabled": True}
    (copy / "profile.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    v = validate(copy, "hardware-ceilings")
    assert v["success"] is False
    assert any("stats/hardware_ceilings.csv" in f["reason"] for f in v["failures"]), [f["reason"] for f in v["failures"]]
