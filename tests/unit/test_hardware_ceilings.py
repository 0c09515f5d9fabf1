"""hardware-ceilings on the simulated box: the plan, the tables, a weak card of each kind fails the
suite naming it, and the report shows the very numbers the verdict judged.

The peer-to-peer matrix runs here on simulated cards only (a real one needs a host with two GPUs or
more; the GPU host available for measurement has one)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mi300x_cert.config import load_profile
from mi300x_cert.experiments import EXPERIMENTS, get_experiment, prepare_and_run
from mi300x_cert.validation import validate

NAME = "hardware-ceilings"
REPO = Path(__file__).resolve().parents[2]


def _only(name: str, **extra) -> dict:
    return {"experiments": {n: ({"enabled": n == name} | (extra if n == name else {})) for n in EXPERIMENTS}}


def _run(tmp_path: Path, sim: dict | None = None) -> Path:
    ov = _only(NAME)
    if sim:
        ov["telemetry"] = {"simulated": sim}
    out = tmp_path / "run"
    res = prepare_and_run("smoke", out, [NAME], overrides=ov, progress=False, wait_s=60)
    assert res["state"] == "complete", res
    return out


def test_plan_fans_out_alone_all_p2p_power():
    exp = get_experiment(NAME)
    prof = load_profile("smoke")
    ids = [c["case_id"] for c in exp.cases(prof)]
    assert ids == ["alone-c0", "alone-c1", "alone-c2", "alone-c3", "all-c0-3", "p2p", "power-c0-3"]
    p2p = next(c for c in exp.cases(prof) if c["mode"] == "p2p")
    assert len(p2p["tests"]) == 12 and exp.worker_specs(prof, p2p)[0]["all_cards_visible"]
    one = load_profile("smoke", overrides={"experiments": {NAME: {"cards": "[5]"}}})
    assert [c["case_id"] for c in exp.cases(one)] == ["alone-c5", "power-c5"]  # no pairs on one card


def test_profile_section_is_typed():
    from mi300x_cert.errors import CardError, ProfileError

    with pytest.raises(ProfileError, match=r"experiments\.hardware-ceilings\.dtypes"):
        load_profile("smoke", overrides={"experiments": {NAME: {"dtypes": ["int4"]}}})
    with pytest.raises(CardError, match=r"experiments\.hardware-ceilings\.cards"):
        load_profile("smoke", overrides={"experiments": {NAME: {"cards": "[40]"}}})


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Card 1 has half the HBM bandwidth, card 2's link trained at x8, card 3 cannot hold its power."""
    run = _run(tmp_path_factory.mktemp("faulty"), {"hbm_scale": {1: 0.5}, "pcie_width": {2: 8}, "power_cap_w": {3: 400}})
    return run, validate(run, NAME)


def test_faulty_cards_fail_the_suite_naming_each(faulty):
    _, v = faulty
    assert not v["success"]
    by = {}
    for f in v["failures"]:
        by.setdefault(f["expectation"], set()).add(f.get("subject"))
    assert {"card 1 alone hbm-copy", "card 1 all hbm-copy"} <= by["hbm_copy_floor"]
    assert "card 1 alone hbm-triad" in by["hbm_triad_floor"]
    assert by["link_width"] == {"card 2 host link"}
    assert {"card 2 alone h2d", "card 2 alone d2h"} <= by["h2d_floor"] | by["d2h_floor"]
    assert by["power_held"] == {"card 3 sustained power"}
    healthy = "card 0"
    assert not any(s and s.startswith(healthy + " ") for subjects in by.values() for s in subjects)
    # every failure names its observed value
    assert all(f.get("observed") is not None for f in v["failures"] if f["expectation"] != "no_failed_cases")


def test_power_table_from_telemetry(faulty):
    run, _ = faulty
    power = pd.read_csv(run / "stats" / "hardware_ceilings_power.csv").set_index("card")
    assert power.loc[3, "power_median_w"] <= 400.0 and power.loc[3, "power_fraction"] < 0.6
    assert "power" in power.loc[3, "throttle_reasons"]
    assert (power.loc[[0, 1, 2], "power_fraction"] > 0.85).all()
    assert (power["power_limit_w"] == 750.0).all()


def test_p2p_matrix_on_simulated_cards(faulty):
    run, v = faulty
    p2p = pd.read_csv(run / "stats" / "hardware_ceilings_p2p.csv")
    assert len(p2p) == 12 and set(p2p["same_domain"]) == {True}  # cards 0-3 share XGMI domain 0
    assert (p2p["gbps"] > 40).all()
    assert not any(f["expectation"].startswith("p2p") for f in v["failures"])


def test_report_numbers_equal_verdict_numbers(faulty):
    """One table feeds both: the frame the suite judged and the report's bars show the same figures."""
    from mi300x_cert.report import build_report

    run, _ = faulty
    frame = pd.read_csv(run / "validation" / "frames" / f"{NAME}.csv")
    html = build_report(run).read_text()
    section = html[html.index("Hardware ceilings"):]
    ceilings = frame[frame["kind"] == "ceiling"]
    assert len(ceilings) == 4 * 7 + 4 * 7
    for r in ceilings.to_dict("records"):
        assert f"{r['value']:.4g}" in section, r["subject"]
    stats = pd.read_csv(run / "stats" / "hardware_ceilings.csv")
    merged = ceilings.merge(stats, on=["mode", "card", "test"], suffixes=("_frame", "_stats"))
    assert len(merged) == len(ceilings) and (merged["value_frame"] == merged["value_stats"]).all()
    assert "Peer-to-peer bandwidth" in section and section.count("heatmap") >= 1


def test_healthy_box_passes(tmp_path):
    run = _run(tmp_path)
    v = validate(run, NAME)
    assert v["success"], v["failures"]
    assert v["evaluated"] == v["declared"] == 20


@pytest.fixture(scope="module")
def resnet_and_ceilings(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path_factory.mktemp("util") / "r"
    ov = {"experiments": {n: {"enabled": n in ("resnet50", NAME)} for n in EXPERIMENTS}}
    ov["experiments"][NAME]["cards"] = "[0]"
    try:
        res = prepare_and_run("smoke", out, ["resnet50", NAME], overrides=ov, progress=False, wait_s=60)
    finally:
        mp.undo()
    assert res["state"] == "complete", res
    return out


def test_resnet50_report_equals_verdict(resnet_and_ceilings):
    """ResNet-50: the verdict's images/s and the report's are the same stats/resnet50.csv cells."""
    from mi300x_cert.report import build_report

    out = resnet_and_ceilings
    validate(out, "resnet50")
    frame = pd.read_csv(out / "validation" / "frames" / "resnet50.csv")
    stats = pd.read_csv(out / "stats" / "resnet50.csv")
    thr = frame[frame["kind"] == "throughput"].merge(stats, on="case_id", suffixes=("_frame", "_stats"))
    assert len(thr) == len(stats) == 2 and (thr["images_per_s_frame"] == thr["images_per_s_stats"]).all()
    html = build_report(out).read_text()
    section = html[html.index("ResNet-50 throughput"):]
    for v in stats["images_per_s"]:  # the report prints the table's cell (6 significant digits)
        assert f"<td class=\"\">{v:.6g}</td>" in section, v


def test_utilization_in_table_report_statement_and_history(resnet_and_ceilings):
    from mi300x_cert.bundle.signing import build_statement
    from mi300x_cert.history import card_history_rows
    from mi300x_cert.report import build_report
    from mi300x_cert.utilization import read_utilization

    out = resnet_and_ceilings
    rows = read_utilization(out)
    res = [r for r in rows if r["workload"] == "resnet50"]
    assert len(res) == 2 and all(r["ceiling_metric"] == "matrix_tflops" for r in res)
    ceiling = pd.read_csv(out / "stats" / "hardware_ceilings.csv")
    best = ceiling[(ceiling["card"] == 0) & ceiling["test"].isin(["gemm-float16", "gemm-bfloat16"])]["value"].max()
    for r in res:  # achieved = images/s × counted FLOPs per image; fraction = achieved / the measured ceiling
        assert r["ceiling"] == pytest.approx(best) and r["achieved"] > 0
        assert r["fraction"] == pytest.approx(r["achieved"] / best)
    assert "Utilization against the measured ceilings of this run" in build_report(out).read_text()
    card0 = next(r for r in card_history_rows(out) if r["card"] == 0)
    assert set(card0["utilization"]) == {f"resnet50 {r['case']}" for r in res}
    st = build_statement(subjects=[], meta={}, inventory=None, conditions=None, verdicts=None, profile_digest=None,
                         bundle_digests={}, signer_block={}, versions={}, notes=[], utilization=rows)
    assert st["predicate"]["certification"]["utilization"] == rows


@pytest.mark.parametrize("name,limit", [("resnet50", 4), (NAME, 4)])
def test_an_experiment_is_named_only_in_its_modules_and_the_registries(name, limit):
    files = subprocess.run(["git", "grep", "-l", name, "mi300x_cert"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert len(files) <= limit, files
    assert set(files) <= {"mi300x_cert/experiments/__init__.py", "mi300x_cert/workloads/__init__.py",
                          "mi300x_cert/experiments/resnet50.py", "mi300x_cert/workloads/resnet.py",
                          "mi300x_cert/experiments/hardware_ceilings.py", "mi300x_cert/workloads/ceilings.py"}, files
