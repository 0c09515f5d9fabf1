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


def _copy(runs: Path, tmp_path: Path, name: str = "h200-1") -> Path:
    import shutil

    copy = tmp_path / name
    shutil.copytree(runs / name, copy)
    shutil.rmtree(copy / "validation", ignore_errors=True)
    return copy


def _drop_section(run: Path, experiment: str) -> None:
    prof = yaml.safe_load((run / "profile.yaml").read_text())
    del prof["experiments"][experiment]
    (run / "profile.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))


def _set_record(run: Path, names: list[str]) -> None:
    import json

    meta = json.loads((run / "run.json").read_text())
    meta["experiments_registered"] = names
    (run / "run.json").write_text(json.dumps(meta))


def test_a_missing_section_of_an_experiment_older_than_the_run_fails_closed(runs, tmp_path):
    """Review finding: deleting whisper's section (and its evidence) from a run that has no record
    of the registered experiments made whisper 'predated', skipped, and the run CERTIFIED. Only the
    documented experiments may be predated by a run without the record; whisper takes the default
    (enabled) and fails for missing evidence."""
    import shutil

    from mi300x_cert.outcome import decide
    from mi300x_cert.experiments import PREDATED_WITHOUT_RECORD
    from mi300x_cert.rundir import RunDir
    from mi300x_cert.validation import validate

    assert PREDATED_WITHOUT_RECORD == {"hardware-ceilings"}
    copy = _copy(runs, tmp_path)
    assert "experiments_registered" not in RunDir(copy).meta  # archived before the record existed
    _drop_section(copy, "whisper")
    shutil.rmtree(copy / "results" / "whisper")
    for f in (copy / "stats").glob("whisper*"):
        f.unlink()
    rd = RunDir(copy)
    assert rd.predated_experiments() == ["hardware-ceilings"]
    assert rd.load_profile().experiments.whisper.enabled is True
    v = validate(copy, "whisper")
    assert v["status"] == "failed" and v["success"] is False, v
    assert any("whisper" in f["reason"] and "fails closed" in f["reason"] for f in v["failures"]), v["failures"]
    d = decide(state="complete", verdicts={"suites": {"whisper": v}})
    assert not d.certified and "whisper" in d.failed_suites


def test_a_run_predates_only_what_its_record_lacks(runs, tmp_path):
    """With run.json's experiments_registered: predated = registered now - that record (and no
    section); a section missing for a recorded experiment is a malformed profile and fails closed."""
    from mi300x_cert.experiments import experiment_names
    from mi300x_cert.rundir import RunDir
    from mi300x_cert.validation import validate

    copy = _copy(runs, tmp_path)
    _drop_section(copy, "whisper")
    _set_record(copy, [n for n in experiment_names() if n != "hardware-ceilings"])
    assert RunDir(copy).predated_experiments() == ["hardware-ceilings"]
    assert RunDir(copy).load_profile().experiments.whisper.enabled is True  # recorded: not predated
    # the record says whisper was registered later: then (and only then) the run predates it
    _set_record(copy, [n for n in experiment_names() if n not in ("hardware-ceilings", "whisper")])
    assert RunDir(copy).predated_experiments() == ["whisper", "hardware-ceilings"]
    v = validate(copy, "whisper")
    assert v["status"] == "skipped" and "predates the whisper experiment" in v["reason"], v
    # the record names every experiment: nothing is predated, hardware-ceilings (no section) is demanded
    _set_record(copy, experiment_names())
    assert RunDir(copy).predated_experiments() == []
    v = validate(copy, "hardware-ceilings")
    assert v["status"] == "failed", v
    # an unreadable record predates nothing
    _set_record(copy, "hardware-ceilings")  # type: ignore[arg-type]
    assert RunDir(copy).predated_experiments() == []


def test_a_predated_experiments_default_cards_are_not_checked_against_the_host(runs, tmp_path):
    """Review finding: a predated (disabled) bare-metal section took today's defaults, whose card
    groups [12-15] a one-card host lacks, and load_profile raised. A disabled experiment's card sets
    are not checked; an enabled one's still are, naming the missing section."""
    import pytest

    from mi300x_cert.errors import RunDirError
    from mi300x_cert.experiments import experiment_names
    from mi300x_cert.rundir import RunDir

    copy = _copy(runs, tmp_path)
    _drop_section(copy, "bare-metal")
    _set_record(copy, [n for n in experiment_names() if n not in ("bare-metal", "hardware-ceilings")])
    prof = RunDir(copy).load_profile()
    assert prof.experiments.bare_metal.enabled is False
    assert RunDir(copy).predated_experiments() == ["bare-metal", "hardware-ceilings"]
    # recorded (or a run without the record): the default section is enabled, its cards are checked
    _set_record(copy, experiment_names())
    with pytest.raises(RunDirError, match=r"unknown card id.*no section for bare-metal"):
        RunDir(copy).load_profile()


def test_a_new_run_records_the_registered_experiments(tmp_path):
    from mi300x_cert.experiments import experiment_names
    from mi300x_cert.rundir import RunDir

    rd = RunDir.create(tmp_path / "r", host="h", profile_name="p", sku="s", profile_yaml="name: p\nsku: s\n")
    assert rd.meta["experiments_registered"] == sorted(experiment_names())
    rd2 = RunDir.create(tmp_path / "r2", host="h", profile_name="p", sku="s", profile_yaml="name: p\nsku: s\n",
                        experiments_registered=["whisper", "bare-metal"])
    assert rd2.meta["experiments_registered"] == ["bare-metal", "whisper"]
