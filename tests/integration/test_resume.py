"""Resumable runs: ``mi300x-cert run all --profile smoke`` SIGKILLed during the SD matrix, then
``mi300x-cert run --resume DIR``: the run completes, no row is lost or duplicated, the cases done
before the kill are not measured again."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SD = "sd-throughput"


def _cli() -> list[str]:
    exe = shutil.which("mi300x-cert")
    return [exe] if exe else [sys.executable, "-m", "mi300x_cert.cli"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _in_progress_case(cases: Path) -> str | None:
    """An SD case with measured rows streamed but no status file yet (its workers are mid-matrix)."""
    if not cases.is_dir():
        return None
    for rows in sorted(cases.glob("*.rows.csv")):
        cid = rows.name[: -len(".rows.csv")]
        if (cases / f"{cid}.json").exists():
            continue
        try:
            data = _rows(rows)
        except (OSError, csv.Error):
            continue
        if any(r.get("warmup", "").lower() in ("false", "0") for r in data):
            return cid
    return None


def test_sigkill_during_the_sd_matrix_then_resume(tmp_path):
    out = tmp_path / "run"
    cases = out / "results" / SD / "cases"
    cli = subprocess.Popen(_cli() + ["run", "all", "--profile", "smoke", "--out", str(out), "--quiet"],
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_in = None
    done_before: dict[str, str] = {}
    t0 = time.time()
    try:
        while time.time() - t0 < 400:
            if cli.poll() is not None:
                pytest.fail(f"the run ended before the SD matrix could be interrupted: {cli.communicate()[1][-3000:]}")
            done = sorted(p.name for p in cases.glob("*.json")) if cases.is_dir() else []
            cid = _in_progress_case(cases) if done else None  # at least one SD case finished first
            if cid:
                done_before = {p.name: p.read_text() for p in cases.glob("*.json")}
                cli.send_signal(signal.SIGKILL)
                killed_in = cid
                break
            time.sleep(0.02)
    finally:
        if cli.poll() is None and killed_in is None:
            cli.kill()
        cli.communicate(timeout=60)
    assert killed_in, "never saw an SD case in progress"
    meta = json.loads((out / "run.json").read_text())
    assert meta["state"] == "running"  # SIGKILL leaves no chance to record anything

    # a plain run into the same directory names the command that finishes it
    again = subprocess.run(_cli() + ["run", "all", "--profile", "smoke", "--out", str(out), "--quiet"],
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert f"finish that run with `mi300x-cert run --resume {out}`" in again.stderr, again.stderr

    res = subprocess.run(_cli() + ["run", "--resume", str(out), "--quiet"], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming run directory: {out}" in res.stderr and f"run complete: {out}" in res.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["state"] == "complete" and meta["error"] is None and meta["finished"]
    assert [r["state"] for r in meta["resumed"]] == ["running"]
    from mi300x_cert.experiments import EXPERIMENTS

    assert {e: i["state"] for e, i in meta["experiments"].items()} == {e: "finalized" for e in EXPERIMENTS}
    assert SD in EXPERIMENTS and "hardware-ceilings" in EXPERIMENTS

    # cases finished before the kill were kept as they were, not measured again
    for name, text in done_before.items():
        if json.loads(text).get("status") == "ok":
            assert (cases / name).read_text() == text, f"{name} was measured again"
    killed = json.loads((cases / f"{killed_in}.json").read_text())
    assert killed["status"] == "ok" and killed["attempt"] == 2
    partial = cases / "attempts" / f"{killed_in}.rows.csv.attempt1"
    assert partial.is_file(), "the interrupted attempt's rows are kept aside, not mixed in"
    assert (out / "telemetry" / "attempts" / f"{SD}-{killed_in}.csv.attempt1").is_file()

    # every planned SD case has exactly its rows: none lost, none twice
    from mi300x_cert.experiments import get_experiment
    from mi300x_cert.rundir import RunDir

    rd = RunDir(out)
    plan = get_experiment(SD).plan(rd, rd.load_profile())
    rows = _rows(out / "results" / SD / "rows.csv")
    keys = [(r["case_id"], r["proc"], r["batch_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows after resume"
    for case in plan:
        got = [r for r in rows if r["case_id"] == case["case_id"]]
        assert len(got) == case["process_count"] * case["n_batches"], (case["case_id"], len(got))
        assert {r["proc"] for r in got} == {str(p) for p in range(case["process_count"])}
    assert len(rows) == sum(c["process_count"] * c["n_batches"] for c in plan)
    for exp in ("bare-metal", "whisper", "resnet50"):
        assert _rows(out / "results" / exp / "rows.csv"), f"{exp} has no rows"

    # the verdict tables were written when the resumed run finalized: every row counted, nothing missing
    from mi300x_cert.validation.frames import build_frame

    latency = _rows(out / "stats" / "sd_latency.csv")
    assert sum(int(r["n_rows"]) for r in latency) == len(rows) and {r["failed_rows"] for r in latency} == {"0"}
    for suite in ("latency", "thermal", "whisper"):
        problems = build_frame(suite, out, rd.load_profile(), {}).problems
        assert not [p for p in problems if "stats/" in p], problems

    # resuming a complete run changes nothing
    res = subprocess.run(_cli() + ["run", "--resume", str(out), "--quiet"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and json.loads((out / "run.json").read_text())["resumed"] == meta["resumed"]


def test_resume_usage_errors(tmp_path, capsys):
    from mi300x_cert import cli

    assert cli.main(["run", "--resume", str(tmp_path), "--profile", "smoke"]) == 2
    assert "run --resume DIR continues the run in DIR with its stored profile; leave out --profile" in capsys.readouterr().err
    assert cli.main(["run", "whisper", "--resume", str(tmp_path)]) == 2
    assert "leave out 'whisper'" in capsys.readouterr().err
    assert cli.main(["run", "all", "--profile", "smoke"]) == 2
    assert "run needs --out (or --resume DIR to finish an interrupted run)" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a run directory (no run.json)" in capsys.readouterr().err
    assert cli.main(["certify", "--resume", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "certify --resume DIR continues the run in DIR" in capsys.readouterr().err
