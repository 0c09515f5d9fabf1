"""One table feeds the verdict and the report: the latency, thermal and whisper suites judge the
tables their experiments wrote under ``stats/`` at finalize, and the report shows the same cells.
A missing table fails its suite naming it; finalizing again (what ``--resume`` does) rewrites them."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from mi300x_cert.experiments import EXPERIMENTS, finalize_experiment  # noqa: E402
from mi300x_cert.validation import expectations_dir, validate  # noqa: E402
from tiny_run import debug_run  # noqa: E402
USED = ("bare-metal", "sd-throughput", "whisper")
TABLES = {"latency": ["stats/sd_latency.csv", "stats/sd_latency.problems.json"],
          "thermal": ["stats/bare_metal_thermal.csv", "stats/bare_metal_recovery.csv",
                      "stats/bare_metal_thermal.problems.json"],
          "whisper": ["stats/whisper_tokens.csv", "stats/whisper_batches.csv", "stats/whisper_batches.problems.json"]}
EVIDENCE = {"latency": ["results/sd-throughput/rows.csv"], "whisper": ["results/whisper/rows.csv"],
            "thermal": ["telemetry/bare-metal-g1-c0-1.csv", "events/bare-metal-g0-c12-15.csv"]}
MARGIN = 2.5  # °C: not the smoke set's 10 °C: the report must show the verdict's margin, not the set's


def _cell(v) -> str:
    """A cell as the report's tables print it."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return str(v)


def _row_html(values: list, left: set[int] = frozenset()) -> str:
    return "<tr>" + "".join(f'<td class="{"l" if i in left else ""}">{_cell(v)}</td>' for i, v in enumerate(values)) + "</tr>"


def _section(html: str, title: str) -> str:
    start = html.index(f"<h2>{title}")
    end = html.find("<h2>", start + 4)
    return html[start:end if end > 0 else None]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real tiny run (debug workload) of the three experiments, validated with a 1 °C recovery margin."""
    base = tmp_path_factory.mktemp("tables")
    ov = {"experiments": {n: {"enabled": n in USED} for n in EXPERIMENTS}}
    run_dir, result = debug_run(base / "run", USED, overrides=ov, run_id="tables-run")
    assert result["state"] == "complete", result
    exp = base / "exp"
    shutil.copytree(expectations_dir(), exp)
    p = exp / "params" / "smoke.yaml"
    text = p.read_text()
    assert "recovery_margin_c: 10.0" in text
    p.write_text(text.replace("recovery_margin_c: 10.0", f"recovery_margin_c: {MARGIN}"))
    for suite in ("latency", "thermal", "whisper"):
        validate(run_dir, suite, expectations=exp)
    from mi300x_cert.report import build_report

    return Path(run_dir), exp, build_report(run_dir).read_text()


def _frame(root: Path, suite: str) -> pd.DataFrame:
    return pd.read_csv(root / "validation" / "frames" / f"{suite}.csv")


def test_latency_report_numbers_equal_verdict_numbers(run):
    from mi300x_cert.experiments.sd_throughput import LATENCY_COLUMNS

    root, _, html = run
    frame = _frame(root, "latency")
    configs = frame[frame["kind"] == "config"]
    table = pd.read_csv(root / "stats" / "sd_latency.csv")
    assert len(configs) == len(table) == 4  # tiny: N ∈ {1, 2} × {1x3, 2x2}
    merged = configs.merge(table, on="subject", suffixes=("_frame", "_stats"))
    for col in ("n_rows", "median_per_image_s", "cv_per_image", "per_card_scaling", "cards_used"):
        assert merged[f"{col}_frame"].tolist() == merged[f"{col}_stats"].tolist(), col
    assert (configs["n_rows"] > 0).all() and configs["median_per_image_s"].notna().all()
    section = _section(html, "SD latency per configuration")
    for r in configs.to_dict("records"):  # the report's row is the frame's row, cell for cell
        values = [r[c] for c in LATENCY_COLUMNS if c != "subject"]
        values = [int(v) if c in ("process_count", "n_rows", "failed_rows", "cards_used", "baseline_process_count") else v
                  for c, v in zip([c for c in LATENCY_COLUMNS if c != "subject"], values)]
        assert _row_html(values, left={1}) in section, r["subject"]


def test_thermal_report_numbers_equal_verdict_numbers(run):
    root, _, html = run
    verdict = json.loads((root / "validation" / "thermal.json").read_text())
    assert verdict["params"]["recovery_margin_c"] == MARGIN
    frame = _frame(root, "thermal")
    table = pd.read_csv(root / "stats" / "bare_metal_thermal.csv")
    merged = frame.merge(table, on="subject", suffixes=("_frame", "_stats"))
    assert len(merged) == len(frame) == len(table) > 0
    for col in ("samples", "junction_mean_c", "junction_p95_c", "junction_max_c", "memory_max_c", "delta_active_idle_c",
                "power_mean_w", "junction_readable"):
        a, b = merged[f"{col}_frame"], merged[f"{col}_stats"]
        assert ((a == b) | (a.isna() & b.isna())).all(), col
    active = frame[frame["role"] == "active"]
    assert len(active) == 6 and (active["recovery_s"] > 0).any()
    section = _section(html, "Thermal summary per card")
    assert f"within {MARGIN:g} °C of its idle mean (the thermal verdict&#x27;s parameters)" in section
    cols = ["card", "role", "samples", "junction_mean_c", "junction_mean_f", "junction_p95_c", "junction_p95_f",
            "junction_max_c", "junction_max_f", "memory_max_c", "memory_max_f", "delta_active_idle_c", "recovery_s",
            "throttle_events"]
    shown = frame[frame["role"].isin(["idle", "active", "cooldown"])]
    assert len(shown) > len(active)
    for r in shown.to_dict("records"):
        values = [int(r["card"]), r["role"], int(r["samples"])] + [r[c] for c in cols[3:]]
        assert _row_html(values, left={1}) in section, r["subject"]


def test_recovery_follows_the_verdict_margin(run):
    """The recovery curve is stored once; a margin picks its point, the same way for any reader."""
    from mi300x_cert.experiments.bare_metal import recovery_s
    from mi300x_cert.rundir import RunDir
    from mi300x_cert.validation.frames import thermal_frame

    root, _, _ = run
    profile = RunDir(root).load_profile()
    tight = thermal_frame(root, profile, {"recovery_margin_c": MARGIN}).df.set_index("subject")
    loose = thermal_frame(root, profile, {"recovery_margin_c": 10.0}).df.set_index("subject")
    act = tight[tight["role"] == "active"].index
    inf = float("inf")
    assert (loose.loc[act, "recovery_s"].fillna(inf) <= tight.loc[act, "recovery_s"].fillna(inf)).all()
    curve = pd.read_csv(root / "stats" / "bare_metal_recovery.csv")
    for subject in act:
        card, idle = int(tight.loc[subject, "card"]), tight.loc[subject, "idle_mean_c"]
        pts = curve[curve["card"] == card]
        assert pts["junction_c"].is_monotonic_decreasing and len(pts) > 0
        got, want = tight.loc[subject, "recovery_s"], recovery_s(curve, card, idle, MARGIN)
        assert got == want or (got != got and want != want)


def test_whisper_report_numbers_equal_verdict_numbers(run):
    from mi300x_cert.experiments.whisper_tokens import BATCH_COLUMNS

    root, _, html = run
    frame = _frame(root, "whisper")
    totals = frame[frame["kind"] == "total"]
    table = pd.read_csv(root / "stats" / "whisper_tokens.csv")
    merged = totals.merge(table, on="case_id")
    assert len(merged) == len(table) == 1
    assert (merged["tokens_per_s"] == merged["total_tokens_per_s"]).all()
    section = _section(html, "Whisper token throughput")
    for v in table["total_tokens_per_s"]:
        assert f'<td class="">{v:.6g}</td>' in section, v
    # tokens per clip: the verdict's batch rows are the table's rows, and the report prints them
    batches = frame[frame["kind"] == "batch"]
    per_batch = pd.read_csv(root / "stats" / "whisper_batches.csv")
    assert len(batches) == len(per_batch) > 0
    both = batches.merge(per_batch, on="subject", suffixes=("_frame", "_stats"))
    assert len(both) == len(per_batch)
    for col in ("tokens_per_clip", "configured_tokens"):
        assert both[f"{col}_frame"].tolist() == both[f"{col}_stats"].tolist(), col
    assert (per_batch["tokens_per_clip"] == per_batch["configured_tokens"]).all()
    verdict = json.loads((root / "validation" / "whisper.json").read_text())
    assert verdict["success"] is True, verdict["failures"]
    cols = [c for c in BATCH_COLUMNS if c != "subject"]
    for r in per_batch.to_dict("records"):
        values = [int(r[c]) if c in ("proc", "card", "batch_index") else r[c] for c in cols]
        assert _row_html(values, left={0, 4}) in section, r["subject"]


def test_whisper_verdict_judges_the_table_not_the_rows(run, tmp_path):
    """A batch whose tokens per clip in the table differ from the configured number fails the verdict
    naming that batch, even though the rows are untouched; a planned case missing from the table
    fails naming the case; finalizing again restores the table from the rows."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "validation")
    t = copy / "stats" / "whisper_batches.csv"
    good = t.read_bytes()
    df = pd.read_csv(t)
    df.loc[0, "tokens_per_clip"] = df.loc[0, "configured_tokens"] - 1
    df.to_csv(t, index=False)
    v = validate(copy, "whisper", expectations=exp)
    assert v["success"] is False
    bad = [f for f in v["failures"] if f.get("expectation") == "tokens_per_clip_configured"]
    assert [f["subject"] for f in bad] == [df.loc[0, "subject"]], v["failures"]
    df[df["case_id"] != "r1"].to_csv(t, index=False)
    v = validate(copy, "whisper", expectations=exp)
    assert any("missing row of planned case r1 in stats/whisper_batches.csv" in f["reason"] for f in v["failures"])
    df.drop(columns=["tokens_per_clip"]).to_csv(t, index=False)
    v = validate(copy, "whisper", expectations=exp)
    assert v["success"] is False
    assert any("missing column 'tokens_per_clip' in stats/whisper_batches.csv" in f["reason"] for f in v["failures"])
    finalize_experiment(copy, "whisper")
    assert t.read_bytes() == good
    assert validate(copy, "whisper", expectations=exp)["success"] is True


@pytest.mark.parametrize("suite,table", [(s, t) for d in (TABLES, EVIDENCE) for s, ts in d.items() for t in ts])
def test_a_missing_table_fails_its_suite_naming_it(run, tmp_path, suite, table):
    """A table gone, or the evidence it was computed from (the bundle carries both)."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "validation")
    before = validate(copy, suite, expectations=exp)
    assert not any(table in f["reason"] for f in before["failures"])
    (copy / table).unlink()
    v = validate(copy, suite, expectations=exp)
    assert v["success"] is False
    assert any(table in f["reason"] for f in v["failures"]), [f["reason"] for f in v["failures"]]


from mi300x_cert.validation.frames import LATENCY_JUDGED, THERMAL_JUDGED  # noqa: E402

JUDGED = ([("latency", "stats/sd_latency.csv", c) for c in LATENCY_JUDGED]
          + [("thermal", "stats/bare_metal_thermal.csv", c) for c in THERMAL_JUDGED]
          + [("thermal", "stats/bare_metal_recovery.csv", c) for c in ("card", "seconds", "junction_c")])


@pytest.mark.parametrize("suite,table,column", JUDGED)
def test_a_missing_judged_column_fails_its_suite_naming_it(run, tmp_path, suite, table, column):
    """Review finding: a column the suite judges, absent from its table, was filled with NaN and the
    range checks passed over it. Now it is a problem naming table and column (FAIL input_present)."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "validation")
    t = copy / table
    pd.read_csv(t).drop(columns=[column]).to_csv(t, index=False)
    v = validate(copy, suite, expectations=exp)
    assert v["success"] is False and v["status"] == "failed"
    want = f"missing column {column!r} in {table}"
    assert any(want in f["reason"] and f["expectation"] == "input_present" for f in v["failures"]), \
        [f["reason"] for f in v["failures"]]


@pytest.mark.parametrize("column", ["n_rows", "failed_rows"])
def test_a_missing_row_count_fails_the_latency_suite(run, tmp_path, column):
    """An empty count in a config row is a FAIL of its not-null expectation, not skipped by the range check."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "validation")
    t = copy / "stats" / "sd_latency.csv"
    df = pd.read_csv(t)
    df[column] = df[column].astype(float)
    df.loc[0, column] = float("nan")
    df.to_csv(t, index=False)
    v = validate(copy, "latency", expectations=exp)
    assert v["success"] is False
    ids = {"n_rows": "rows_known", "failed_rows": "failed_rows_known"}
    bad = [f for f in v["failures"] if f.get("expectation") == ids[column]]
    assert [f["subject"] for f in bad] == [df.loc[0, "subject"]], v["failures"]


def test_finalize_findings_fail_the_suite(run, tmp_path):
    """What finalize found wrong (here: an unreadable telemetry stream) stays a failure of the verdict."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    (copy / "stats" / "bare_metal_thermal.problems.json").write_text(json.dumps(
        ["unreadable file telemetry/bare-metal-g1-c0-1.csv: EmptyDataError: No columns to parse from file"]))
    v = validate(copy, "thermal", expectations=exp)
    assert v["success"] is False
    assert any("unreadable file telemetry/bare-metal-g1-c0-1.csv" in f["reason"] for f in v["failures"])


def test_finalize_again_rewrites_the_tables(run, tmp_path, capsys):
    """Finalizing again — ``run --resume`` finalizes every experiment; ``mi300x-cert finalize DIR``
    does it for a finished run (one finalized by an earlier version) — writes the tables anew, equal."""
    from mi300x_cert import cli

    root, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    before = {t: (copy / t).read_bytes() for ts in TABLES.values() for t in ts}
    for t in before:
        (copy / t).unlink()
    finalize_experiment(copy, "bare-metal")
    assert cli.main(["finalize", str(copy), "sd-throughput", "whisper"]) == 0
    for t, data in before.items():
        assert (copy / t).read_bytes() == data, t
    (copy / "stats" / "sd_latency.csv").unlink()
    assert cli.main(["finalize", str(copy)]) == 0  # every experiment the run finalized
    assert (copy / "stats" / "sd_latency.csv").read_bytes() == before["stats/sd_latency.csv"]
    meta = json.loads((copy / "run.json").read_text())
    assert meta["state"] == "complete" and set(meta["experiments"]) == set(USED)
    capsys.readouterr()
    assert cli.main(["finalize", str(copy), "resnet50"]) == 2  # disabled in this run: never finalized
    assert "experiment 'resnet50' was never finalized in run" in capsys.readouterr().err
    meta["state"] = "running"
    (copy / "run.json").write_text(json.dumps(meta))
    assert cli.main(["finalize", str(copy)]) == 2
    assert f"finish it with `mi300x-cert run --resume {copy}`" in capsys.readouterr().err


def test_cards_without_phase_samples_are_a_finalize_finding(run, tmp_path):
    """A group's stream cut before its cool-down: finalize records the cards without cool-down
    samples, and the thermal verdict fails naming them."""
    root, exp, _ = run
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    tel = copy / "telemetry" / "bare-metal-g1-c0-1.csv"
    df = pd.read_csv(tel)
    ev = pd.read_csv(copy / "events" / "bare-metal-g1-c0-1.csv")
    cool_t = float(ev[(ev["kind"] == "phase") & (ev["phase"] == "cooldown")]["t"].iloc[0])
    df[df["t"] < cool_t].to_csv(tel, index=False)
    finalize_experiment(copy, "bare-metal")
    found = json.loads((copy / "stats" / "bare_metal_thermal.problems.json").read_text())
    assert any("no cooldown telemetry for card(s) [0, 1]" in p for p in found), found
    v = validate(copy, "thermal", expectations=exp)
    assert v["success"] is False and any("no cooldown telemetry for card(s) [0, 1]" in f["reason"] for f in v["failures"])

