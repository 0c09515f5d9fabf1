"""Profiles: every shipped profile loads; bad profiles fail with one error naming file and field,
and prepare_run leaves no run directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from mi300x_cert.config import list_profiles, load_profile
from mi300x_cert.errors import CardError, ModelSourceError, ProfileError
from mi300x_cert.experiments import EXPERIMENTS, get_experiment, prepare_run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
SHIPPED = list_profiles()


def test_the_three_profiles_ship():
    assert {p.stem for p in SHIPPED} >= {"smoke", "mi300x", "h100"}


@pytest.mark.parametrize("path", SHIPPED + sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_loads_and_plans(path):
    prof = load_profile(path)
    for name in EXPERIMENTS:
        exp = get_experiment(name)
        if exp.enabled(prof):
            exp.check(prof)  # model sources resolve, card sets fit
            cases = exp.plan(None, prof)
            assert cases and len({c["case_id"] for c in cases}) == len(cases)


def test_mi300x_profile_is_the_report_matrix():
    prof = load_profile("mi300x")
    sd = prof.experiments.sd_throughput
    assert sd.process_counts == [1, 2, 4, 8, 16]
    assert sd.batch_configs == ["1x512", "2x256", "4x128", "8x64", "16x32", "32x16", "64x8", "128x4"]
    assert prof.dtype == "float32" and prof.telemetry.backend == "amdsmi"
    assert [prof.cards(g) for g in prof.experiments.bare_metal.groups] == [
        [12, 13, 14, 15], [0, 1, 2, 3], [0, 2, 5, 6, 7, 9, 11, 12]]
    assert prof.experiments.whisper.compile.mode == "max-autotune" and prof.experiments.whisper.compile.enabled
    cases = get_experiment("sd-throughput").plan(None, prof)
    assert len(cases) == 40
    assert get_experiment("whisper").plan(None, prof)[0]["clips"] * prof.experiments.whisper.new_tokens == 49664


def test_h100_profile_one_card():
    prof = load_profile("h100")
    assert prof.host.card_ids == [0] and prof.telemetry.backend == "nvml" and prof.dtype == "float16"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def _smoke_text() -> str:
    return (Path(SHIPPED[0]).parent / "smoke.yaml").read_text()


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("dtype: float32", "dtype: float32\ncolour: blue"), "colour: unknown key"),
    (lambda t: t.replace("rate_hz: 10", "rate_hz: -3"), "telemetry.rate_hz"),
    (lambda t: t.replace('batch_configs: ["1x2", "2x1"]', 'batch_configs: ["1x2", "two"]'), "experiments.sd-throughput.batch_configs"),
    (lambda t: t + "\n  : : [unclosed\n", "not valid YAML"),
])
def test_malformed_profile_is_one_profile_error(tmp_path, edit, field):
    p = _write(tmp_path, edit(_smoke_text()))
    out = tmp_path / "run"
    with pytest.raises(ProfileError) as ei:
        prepare_run(p, out)
    msg = str(ei.value)
    assert str(p) in msg and field in msg
    assert "\n" not in msg  # one line, YAML errors included
    assert not out.exists()


def test_unreadable_profile_is_one_profile_error(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xb4\x00\xff" * 10)
    with pytest.raises(ProfileError, match=r"binary\.yaml: cannot be read: 'utf-8' codec"):
        load_profile(p)


def test_unwritable_out_is_run_dir_error_and_leaves_nothing(tmp_path):
    from mi300x_cert.errors import RunDirError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="cannot create run directory .*a-file/run: Not a directory"):
        prepare_run("smoke", blocker / "run")
    with pytest.raises(RunDirError, match="exists and is not empty"):
        prepare_run("smoke", blocker)  # --out naming a file
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("pre_existing", [False, True])
def test_failure_right_after_create_removes_the_new_run(tmp_path, monkeypatch, pre_existing):
    import mi300x_cert.rundir as rundir

    real = rundir.atomic_write_json

    def full_disk(path, obj):
        if Path(path).name == "inventory.json":
            raise OSError(28, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(rundir, "atomic_write_json", full_disk)
    out = tmp_path / "run"
    if pre_existing:
        out.mkdir()
    from mi300x_cert.errors import RunDirError

    with pytest.raises(RunDirError, match="cannot write run directory .*No space left on device"):
        prepare_run("smoke", out)
    assert (out.is_dir() and not any(out.iterdir())) if pre_existing else not out.exists()


def test_unknown_card_is_card_error(tmp_path):
    p = _write(tmp_path, _smoke_text().replace('cards: "[0]"\n    batch_size: 4', 'cards: "[16]"\n    batch_size: 4'))
    out = tmp_path / "run"
    with pytest.raises(CardError, match=r"experiments\.whisper\.cards: unknown card id\(s\) \[16\]"):
        prepare_run(p, out)
    assert not out.exists()


def test_too_many_processes_is_card_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CardError, match=r"4 processes do not fit on cards \[0, 1\]"):
        prepare_run("smoke", out, overrides={"experiments": {"sd-throughput": {"cards": [0, 1], "process_counts": [1, 4]}}})
    assert not out.exists()


def test_missing_weights_dir_is_model_source_error(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-weights"
    with pytest.raises(ModelSourceError, match="no-such-weights"):
        prepare_run("smoke", out, overrides={"sd": {"model": str(missing)}})
    assert not out.exists()
    with pytest.raises(ModelSourceError, match="nope"):
        prepare_run("smoke", out, overrides={"experiments": {"whisper": {"model": "synthetic:nope"}}})
    assert not out.exists()


def test_disabled_experiment_is_not_checked(tmp_path):
    out = tmp_path / "run"
    run = prepare_run("smoke", out, overrides={"experiments": {"whisper": {"enabled": False, "model": "synthetic:nope"}}})
    assert run == out and (out / "run.json").is_file() and (out / "inventory.json").is_file()
    from mi300x_cert.rundir import RunDir

    rd = RunDir(out)
    assert rd.read_json("conditions.json")["enabled_experiments"] == ["bare-metal", "sd-throughput", "resnet50",
                                                                   "hardware-ceilings"]
    assert not get_experiment("whisper").enabled(rd.load_profile())


@pytest.mark.parametrize("run_id", ["../evil", "a/b", "", ".hidden", "x" * 129, "with space"])
def test_bad_run_id_is_refused_before_anything_is_written(tmp_path, run_id):
    from mi300x_cert.errors import RunDirError

    out = tmp_path / "run"
    with pytest.raises(RunDirError, match="is not usable"):
        prepare_run("smoke", out, run_id=run_id)
    assert not out.exists()


# ---- fleet ↔ profile consistency ---------------------------------------------------------------
def test_shipped_fleet_agrees_with_its_profiles():
    from mi300x_cert.fleet import load_fleet

    fleet = load_fleet()
    for s in fleet.servers:
        prof = load_profile(s.profile)
        assert s.card_ids == prof.host.card_ids, s.name
        assert all(set(cards) <= set(prof.host.card_ids) for cards in s.card_groups.values()), s.name
    assert fleet.server("h100-01").cards == 1


def _fleet(tmp_path: Path, cards: int, groups: str = "{'[0]': [0]}") -> Path:
    f = tmp_path / "fleet.yaml"
    f.write_text("servers:\n  - {name: smoke-host, profile: smoke, sku: smoke, cards: 16}\n"
                 f"  - {{name: h100-01, profile: h100, sku: h100, cards: {cards}, card_groups: {groups}}}\n")
    return f


def test_fleet_cards_differing_from_the_profile_is_one_error_naming_both_files(tmp_path):
    from mi300x_cert.fleet import load_fleet

    f = _fleet(tmp_path, 8, "{'[0-3]': [0, 1, 2, 3], '[4-7]': '4-7'}")
    with pytest.raises(ProfileError) as e:
        load_fleet(f)
    msg = str(e.value)
    h100 = load_profile("h100").source_file
    assert msg.startswith(f"{f} disagrees with the profiles: ")
    assert f"servers.1 (h100-01).cards = 8 but its profile {h100} has host.cards = 1 (cards [0])" in msg
    assert "servers.1 (h100-01).card_groups '[0-3]': unknown card id(s) [1, 2, 3]: the host has cards [0]" in msg
    assert "'[4-7]': unknown card id(s) [4, 5, 6, 7]" in msg
    assert "\n" not in msg and "smoke-host" not in msg  # one line; the host that agrees is not blamed


def test_fleet_card_group_naming_a_card_the_host_lacks_is_refused(tmp_path):
    from mi300x_cert.fleet import load_fleet

    with pytest.raises(ProfileError) as e:
        load_fleet(_fleet(tmp_path, 1, "{'[0-1]': '0-1'}"))
    assert str(e.value).endswith("servers.1 (h100-01).card_groups '[0-1]': unknown card id(s) [1]: the host has cards [0] "
                                 f"({load_profile('h100').source_file} host.cards)")
    assert load_fleet(_fleet(tmp_path, 1)).server("h100-01").card_groups == {"[0]": [0]}


def test_fleet_server_with_a_missing_profile_names_the_field(tmp_path):
    from mi300x_cert.fleet import load_fleet

    f = tmp_path / "fleet.yaml"
    f.write_text("servers:\n  - {name: a, profile: no-such-profile, sku: smoke, cards: 4}\n")
    with pytest.raises(ProfileError, match=r"servers\.0 \(a\)\.profile: profile 'no-such-profile' not found"):
        load_fleet(f)
