"""Experiments end to end with the worker's debug workload (real telemetry sampler on the simulated
backend, real network monitor, real launcher and worker processes; no torch)."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mi300x_cert.errors import CardError, WorkerError
from mi300x_cert.experiments import (EXPERIMENTS, finalize_experiment, finish_run, get_experiment, prepare_run,
                                     run_all, run_case, run_experiment)
from mi300x_cert.experiments.base import ROW_COLUMNS
from mi300x_cert.rundir import RunDir
from mi300x_cert.config import load_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from tiny_run import debug_run  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "profiles" / "tiny.yaml"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir, result = debug_run(tmp_path_factory.mktemp("runs") / "full", EXPERIMENTS, run_id="test-run")
    return RunDir(run_dir), result


@pytest.fixture
def debug_env(monkeypatch):
    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MI300X_CERT_DEBUG_PARAMS", raising=False)
    return monkeypatch


def test_registry_is_lazy_and_never_imports_torch():
    code = ("import sys; from mi300x_cert.experiments import get_experiment, EXPERIMENTS;"
            "[get_experiment(n) for n in EXPERIMENTS];"
            "import mi300x_cert.launcher, mi300x_cert.stats;"
            "print(','.join(m for m in ('torch','diffusers','transformers','pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    assert get_experiment("sd-throughput").name == "sd-throughput"
    with pytest.raises(Exception, match="unknown experiment 'nope'"):
        get_experiment("nope")


def test_sd_plan_case_ids_and_cards():
    prof = load_profile(TINY)
    cases = get_experiment("sd-throughput").plan(None, prof)
    assert [c["case_id"] for c in cases] == ["p1-b1x3-r1", "p1-b1x3-r2", "p1-b2x2-r1", "p1-b2x2-r2",
                                             "p2-b1x3-r1", "p2-b1x3-r2", "p2-b2x2-r1", "p2-b2x2-r2"]
    assert cases[0]["cards"] == [0] and cases[4]["cards"] == [0, 2]  # the first N of the "eight" set
    json.dumps(cases)  # JSON-able
    shared = load_profile(TINY, overrides={"experiments": {"sd-throughput": {"cards": [3], "procs_per_card": 2}}})
    c = get_experiment("sd-throughput").plan(None, shared)[-1]
    assert c["cards"] == [3, 3] and c["shared"] == [True, True]
    with pytest.raises(CardError, match=r"2 processes do not fit on cards \[3\]"):
        get_experiment("sd-throughput").plan(None, load_profile(TINY, overrides={"experiments": {"sd-throughput": {"cards": [3]}}}))


def test_full_run_is_complete(full_run):
    rd, result = full_run
    assert result["state"] == "complete", result.get("error")
    assert rd.state == "complete"
    assert set(result["experiments"]) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert rd.meta["experiments"][name]["state"] == "finalized"
    conds = rd.read_json("conditions.json")
    assert set(conds["experiments"]) == set(EXPERIMENTS)
    sd = conds["experiments"]["sd-throughput"]
    assert sd["process_counts"] == [1, 2] and sd["batch_configs"] == ["1x3", "2x2"]
    assert sd["telemetry_backend"] == "simulated" and sd["network_mode"] == "observed"
    assert sd["workload"]["model"] == "debug:sd"


def test_sd_rows_and_stats(full_run):
    rd, _ = full_run
    rows = _csv(rd.root / "results" / "sd-throughput" / "rows.csv")
    assert list(rows[0])[:len(ROW_COLUMNS)] == ROW_COLUMNS
    # N processes × n batches × 2 repetitions per (N, config)
    for pc in (1, 2):
        for bc, n in (("1x3", 3), ("2x2", 2)):
            sel = [r for r in rows if int(r["process_count"]) == pc and r["batch_config"] == bc]
            assert len(sel) == pc * n * 2
    assert all(r["warmup"] == "False" and r["status"] == "ok" and r["network_mode"] == "observed" for r in rows)
    assert {r["card"] for r in rows if r["case_id"] == "p2-b2x2-r1"} == {"0", "2"}
    r = rows[0]
    assert float(r["per_image_s"]) == pytest.approx(float(r["latency_s"]) / int(r["batch_size"]))
    assert float(r["latency_overhead_s"]) >= float(r["latency_s"])
    warm = _csv(rd.root / "results" / "sd-throughput" / "warmup_rows.csv")
    assert len(warm) == 4 * 1 + 4 * 2 and all(w["warmup"] == "True" for w in warm)  # 1 warm-up per process per case
    # the stats files equal an independent recomputation from rows.csv
    for table, col, fn in (("appendix_a_mean", "per_image_s", statistics.fmean),
                           ("appendix_b_median_overhead", "latency_overhead_s", statistics.median),
                           ("appendix_b_std", "latency_s", statistics.stdev),
                           ("appendix_a_max", "per_image_s", max)):
        t = _csv(rd.root / "stats" / f"{table}.csv")
        assert [x["N-processes"] for x in t] == ["1", "2"]
        assert list(t[0]) == ["N-processes", "Accelerator", "1x3", "2x2"]
        assert t[0]["Accelerator"] == "AMD Instinct MI300X (simulated)"
        for line in t:
            for bc in ("1x3", "2x2"):
                vals = [float(r[col]) for r in rows if r["process_count"] == line["N-processes"] and r["batch_config"] == bc]
                assert float(line[bc]) == pytest.approx(fn(vals), rel=1e-9)


def test_case_files_telemetry_and_barrier(full_run):
    rd, _ = full_run
    st = rd.case_status("sd-throughput", "p2-b1x3-r1")
    assert st["status"] == "ok" and st["reason"] is None and st["network_mode"] == "observed"
    assert st["rows"] == 6 and st["warmup_rows"] == 2 and st["telemetry"]["samples"] > 0
    events = _csv(rd.root / "events" / "sd-throughput-p2-b1x3-r1.csv")
    starts = [e for e in events if e["kind"] == "batch_start"]
    ends = [e for e in events if e["kind"] == "batch_end"]
    assert len(starts) == len(ends) == 6
    first = [float(e["t"]) for e in starts if e["batch_index"] == "0"]
    assert len(first) == 2 and all(st["t_go"] <= t < st["t_go"] + 1.0 for t in first)
    assert [e["phase"] for e in events if e["kind"] == "phase"] == ["load", "active", "done"]
    tel = _csv(rd.root / "telemetry" / "sd-throughput-p2-b1x3-r1.csv")
    assert {t["card"] for t in tel} == {str(c) for c in range(16)}  # every card of the host is sampled
    assert (rd.root / "network" / "sd-throughput-p2-b1x3-r1.csv").exists()
    assert (rd.root / "sockets" / "sd-throughput-p2-b1x3-r1.csv").exists()


def test_bare_metal_phases_and_heating(full_run):
    rd, _ = full_run
    prof = rd.load_profile()
    spec = prof.experiments.bare_metal
    st = rd.case_status("bare-metal", "g0-c12-15")
    assert st["status"] == "ok"
    events = _csv(rd.root / "events" / "bare-metal-g0-c12-15.csv")
    phases = [(e["phase"], float(e["t"])) for e in events if e["kind"] == "phase"]
    assert [p for p, _ in phases] == ["idle", "load", "active", "cooldown", "done"]
    t = dict(phases)
    assert t["load"] - t["idle"] >= spec.idle_s - 0.01
    assert t["done"] - t["cooldown"] >= spec.cooldown_s - 0.01
    rows = [r for r in _csv(rd.root / "results" / "bare-metal" / "rows.csv") if r["case_id"] == "g0-c12-15"]
    assert {r["card"] for r in rows} == {"12", "13", "14", "15"}
    for c in ("12", "13", "14", "15"):
        mine = [r for r in rows if r["card"] == c]
        assert mine and float(mine[-1]["t_end"]) - st["t_go"] >= spec.active_s
    # the simulated active cards run hotter than idle ones by the end of the active phase
    tel = [r for r in _csv(rd.root / "telemetry" / "bare-metal-g0-c12-15.csv") if r["phase"] == "active"]
    last_t = max(float(r["t"]) for r in tel)
    last = {r["card"]: float(r["junction_c"]) for r in tel if float(r["t"]) == last_t}
    assert min(last[c] for c in ("12", "13", "14", "15")) > max(last[c] for c in ("0", "5", "8"))
    groups = _csv(rd.root / "stats" / "bare_metal_groups.csv")
    assert [g["case_id"] for g in groups] == ["g0-c12-15", "g1-c0-1"]


def test_whisper_and_resnet_rows(full_run):
    rd, result = full_run
    w = _csv(rd.root / "results" / "whisper" / "rows.csv")
    assert [int(r["batch_size"]) for r in w] == [3, 3, 1]  # 7 clips in batches of 3
    assert sum(int(r["tokens"]) for r in w) == 7 * 5
    assert all(float(r["tokens_per_s"]) == pytest.approx(int(r["tokens"]) / float(r["latency_s"])) for r in w)
    summ = result["experiments"]["whisper"]
    assert summ["total_tokens"] == 35 and summ["gpus"] == 1
    assert summ["tokens_per_s_per_gpu"] == pytest.approx(summ["total_tokens_per_s"])
    r = _csv(rd.root / "results" / "resnet50" / "rows.csv")
    assert {(x["image_size"], x["mode"], x["batch_size"]) for x in r} == {("64", "eager", "1"), ("64", "eager", "2")}
    table = _csv(rd.root / "stats" / "resnet50.csv")
    assert len(table) == 2 and all(float(x["images_per_s"]) > 0 for x in table)


def test_completed_case_is_skipped(full_run):
    rd, _ = full_run
    case = get_experiment("sd-throughput").plan(rd, rd.load_profile())[0]
    p = rd.case_rows_path("sd-throughput", case["case_id"])
    before = (p.stat().st_mtime_ns, p.read_bytes())
    st = run_case(rd.root, "sd-throughput", case)
    assert st["skipped"] is True and st["status"] == "ok"
    assert (p.stat().st_mtime_ns, p.read_bytes()) == before


def _small_run(tmp_path, **sd) -> RunDir:
    ov = {"experiments": {"bare-metal": {"enabled": False}, "whisper": {"enabled": False},
                          "resnet50": {"enabled": False}, "hardware-ceilings": {"enabled": False},
                          "sd-throughput": {"process_counts": [2], "batch_configs": ["1x3"], "repetitions": 1, **sd}}}
    return RunDir(prepare_run(TINY, tmp_path / "run", overrides=ov))


def test_crashed_worker_fails_the_case_then_retry_reruns_it(tmp_path, debug_env):
    rd = _small_run(tmp_path)
    case = get_experiment("sd-throughput").plan(rd, rd.load_profile())[0]
    debug_env.setenv("MI300X_CERT_DEBUG_PARAMS", json.dumps({"crash_at": 1, "only_procs": [1]}))
    st = run_case(rd.root, "sd-throughput", case)
    assert st["status"] == "failed" and "crash at batch 1" in st["reason"] and "proc 1 (card 2)" in st["reason"]
    rows = _csv(rd.case_rows_path("sd-throughput", case["case_id"]))
    measured = [r for r in rows if r["warmup"] == "False"]
    assert sorted((r["proc"], r["batch_index"]) for r in measured) == [("0", "0"), ("0", "1"), ("0", "2"), ("1", "0")]
    with pytest.raises(WorkerError, match="crash at batch 1"):
        run_case(rd.root, "sd-throughput", case, raise_on_failure=True)
    summary = finalize_experiment(rd.root, "sd-throughput")
    assert summary["state"] == "incomplete" and case["case_id"] in summary["failed_cases"]
    assert finish_run(rd.root) == "failed"
    assert case["case_id"] in rd.meta["error"]
    # the fault is gone: a retry runs the case from scratch, the failed attempts are kept aside
    debug_env.delenv("MI300X_CERT_DEBUG_PARAMS")
    st = run_case(rd.root, "sd-throughput", case)
    assert st["status"] == "ok" and st["attempt"] == 3
    assert len([r for r in _csv(rd.case_rows_path("sd-throughput", case["case_id"])) if r["warmup"] == "False"]) == 6
    attempts = rd.experiment_dir("sd-throughput") / "cases" / "attempts"
    assert (attempts / f"{case['case_id']}.rows.csv.attempt1").exists()
    assert (rd.root / "telemetry" / "attempts" / f"sd-throughput-{case['case_id']}.csv.attempt2").exists()
    assert finalize_experiment(rd.root, "sd-throughput")["state"] == "finalized"
    assert finish_run(rd.root) == "complete"


def test_hung_worker_times_out(tmp_path, debug_env):
    rd = _small_run(tmp_path, timeout_s=1.5)
    debug_env.setenv("MI300X_CERT_DEBUG_PARAMS", json.dumps({"hang_at": 0, "only_procs": [0]}))
    case = get_experiment("sd-throughput").plan(rd, rd.load_profile())[0]
    st = run_case(rd.root, "sd-throughput", case)
    assert st["status"] == "failed" and "timeout after 1.5s" in st["reason"]
    assert {w["status"] for w in st["workers"]} == {"timeout", "ok"}


def test_progress_goes_to_stderr(tmp_path, debug_env, capsys):
    rd = _small_run(tmp_path)
    summary = run_experiment(rd.root, "sd-throughput", progress=True)
    assert summary["state"] == "finalized"
    err = capsys.readouterr().err
    assert "sd-throughput" in err and "p2-b1x3-r1" in err


def test_enforced_isolation_runs_workers_in_a_private_namespace(tmp_path, debug_env):
    from mi300x_cert.network import enforced_available

    if enforced_available()[0] is None:
        pytest.skip("no private network namespace on this machine")
    ov = {"network": {"mode": "enforced"},
          "experiments": {"bare-metal": {"enabled": False}, "whisper": {"enabled": False}, "resnet50": {"enabled": False},
                          "sd-throughput": {"process_counts": [1], "batch_configs": ["1x2"], "repetitions": 1}}}
    rd = RunDir(prepare_run(TINY, tmp_path / "run", overrides=ov))
    assert rd.read_json("conditions.json")["network_mode"] == "enforced"
    summary = run_experiment(rd.root, "sd-throughput")
    assert summary["state"] == "finalized"
    st = rd.case_status("sd-throughput", "p1-b1x2-r1")
    assert st["network_mode"] == "enforced"
    rows = _csv(rd.root / "results" / "sd-throughput" / "rows.csv")
    assert len(rows) == 2 and {r["network_mode"] for r in rows} == {"enforced"}


def test_real_workload_case_resnet_tiny(tmp_path, monkeypatch):
    """One case through the real worker → workloads.load_workload path (torch on CPU, tiny model)."""
    monkeypatch.delenv("MI300X_CERT_WORKLOAD", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ov = {"experiments": {"bare-metal": {"enabled": False}, "whisper": {"enabled": False},
                          "sd-throughput": {"enabled": False},
                          "resnet50": {"image_sizes": [64, 96], "batch_sizes": [2], "iterations": 2, "timeout_s": 120}}}
    rd = RunDir(prepare_run(TINY, tmp_path / "run", overrides=ov))
    result = run_all(rd.root, list(EXPERIMENTS))
    assert result["state"] == "complete", result.get("error")
    rows = _csv(rd.root / "results" / "resnet50" / "rows.csv")
    assert len(rows) == 4
    r = rows[0]
    assert (r["model"], r["synthetic"], r["device"], r["backend"], r["dtype"]) == (
        "synthetic:resnet-tiny", "True", "cpu", "cpu", "float32")
    assert r["mode"] == "eager" and r["image_size"] == "64" and int(r["items"]) == 2
    assert float(r["latency_overhead_s"]) >= float(r["latency_s"]) > 0
    conds = rd.read_json("conditions.json")["experiments"]["resnet50"]["workload"]
    assert conds["model"] == "synthetic:resnet-tiny" and "versions" in conds
    # CPU workers of a model workload, two cases of one: forked from the experiment's one preloader,
    # which imported torch and transformers' ResNet once (mi300x_cert.preload)
    statuses = [json.loads(p.read_text()) for p in (rd.root / "results" / "resnet50" / "cases").glob("*.json")]
    assert len(statuses) == 2
    assert [w["start"] for st in statuses for w in st["workers"]] == ["preloaded", "preloaded"], statuses
