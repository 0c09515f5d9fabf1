"""Launcher + worker protocol, driven by the worker's debug workload (no torch, no model)."""

from __future__ import annotations

import os
import time

import pytest

from mi300x_cert.launcher import launch, pin_env

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _spec(proc: int, card: int, plan: dict, **params) -> dict:
    return {"proc": proc, "card": card, "device": "cpu", "kind": "debug", "params": params,
            "warmup_batches": 1, "plan": plan}


class Sink:
    def __init__(self):
        self.messages: list[tuple[int, dict]] = []

    def __call__(self, spec: dict, msg: dict) -> None:
        self.messages.append((spec["proc"], msg))

    def rows(self, proc: int | None = None, warmup: bool = False) -> list[dict]:
        return [m for p, m in self.messages if m["type"] == "row" and bool(m.get("warmup")) == warmup
                and (proc is None or p == proc)]


def test_workers_start_together_after_go(tmp_path):
    sink = Sink()
    go_times = []
    # proc 2 loads slowly: the others must still wait for it at the barrier
    specs = [_spec(p, c, {"mode": "fixed", "batch_size": 2, "n_batches": 3}, latency_s=0.01,
                   load_s=0.6 if p == 2 else 0.0) for p, c in enumerate([12, 13, 14])]
    res = launch(specs, timeout_s=20, on_message=sink, log_dir=tmp_path, on_go=lambda: go_times.append(time.time()))
    assert res.ok, res.reason
    assert [w.status for w in res.workers] == ["ok", "ok", "ok"]
    assert all(w.rows == 3 and w.warmup_rows == 1 for w in res.workers)
    first = [m["t"] for _, m in sink.messages if m["type"] == "batch_start" and m["batch_index"] == 0]
    assert len(first) == 3
    assert res.t_go is not None and go_times and go_times[0] <= res.t_go
    # every first batch starts after go, and within a small window of it
    assert all(res.t_go <= t < res.t_go + 0.5 for t in first), [t - res.t_go for t in first]
    # warm-up rows all arrive before go
    assert all(m["t_end"] <= res.t_go for m in sink.rows(warmup=True))
    assert {w.conditions["model"] for w in res.workers} == {"debug:debug"}


def test_hanging_worker_is_killed_at_timeout(tmp_path):
    sink = Sink()
    specs = [_spec(0, 0, {"mode": "fixed", "batch_size": 1, "n_batches": 3}),
             _spec(1, 1, {"mode": "fixed", "batch_size": 1, "n_batches": 3}, hang_at=1)]
    t0 = time.time()
    res = launch(specs, timeout_s=1.5, on_message=sink, log_dir=tmp_path)
    assert time.time() - t0 < 10
    assert not res.ok
    w0, w1 = res.workers
    assert w0.status == "ok" and w0.rows == 3
    assert w1.status == "timeout" and w1.reason == "timeout after 1.5s"
    assert w1.rows == 1  # the batch before the hang was kept
    assert "proc 1 (card 1): timeout after 1.5s" in res.reason
    # the process group is gone
    with pytest.raises(ProcessLookupError):
        os.killpg(w1.pid, 0)


def test_crashing_worker_keeps_its_rows_and_reports_stderr(tmp_path):
    sink = Sink()
    specs = [_spec(0, 3, {"mode": "fixed", "batch_size": 1, "n_batches": 5}, crash_at=2)]
    res = launch(specs, timeout_s=20, on_message=sink, log_dir=tmp_path)
    assert not res.ok
    w = res.workers[0]
    assert w.status == "failed" and w.returncode == 3
    assert w.reason == "debug workload: crash at batch 2"
    assert [m["batch_index"] for m in sink.rows(0)] == [0, 1]
    assert (tmp_path / "proc0.log").read_text().strip().endswith("crash at batch 2")


def test_load_failure_aborts_the_launch(tmp_path):
    specs = [_spec(0, 0, {"mode": "fixed", "batch_size": 1, "n_batches": 2}, load_s=5.0),
             _spec(1, 1, {"mode": "fixed", "batch_size": 1, "n_batches": 2}, fail_load="no weights", only_procs=[1])]
    t0 = time.time()
    res = launch(specs, timeout_s=20, log_dir=tmp_path)
    assert time.time() - t0 < 4  # did not wait for the slow loader
    assert not res.ok and res.t_go is None
    assert res.workers[1].status == "failed" and "no weights" in res.workers[1].reason
    assert res.workers[0].status == "aborted"
    assert "failed before ready" in res.reason


def test_load_timeout(tmp_path):
    specs = [_spec(0, 0, {"mode": "fixed", "batch_size": 1, "n_batches": 1}, load_s=30)]
    res = launch(specs, timeout_s=20, load_timeout_s=1.0, log_dir=tmp_path)
    assert not res.ok
    assert res.workers[0].status == "timeout"
    assert res.workers[0].reason.startswith("timeout after 1s waiting for ready")


def test_duration_plan_repeats_until_min_s(tmp_path):
    sink = Sink()
    specs = [_spec(0, 0, {"mode": "duration", "batch_size": 1, "min_s": 0.3}, latency_s=0.05)]
    res = launch(specs, timeout_s=20, on_message=sink, log_dir=tmp_path)
    assert res.ok
    rows = sink.rows(0)
    assert len(rows) >= 3
    assert rows[-1]["t_end"] - res.t_go >= 0.3
    # one batch even when min_s is tiny
    sink2 = Sink()
    res = launch([_spec(0, 0, {"mode": "duration", "batch_size": 1, "min_s": 0.0})], timeout_s=20, on_message=sink2)
    assert res.ok and len(sink2.rows(0)) == 1


def test_pin_env():
    e = pin_env(12, "nvidia", "cuda", 4, base={})
    assert e["CUDA_VISIBLE_DEVICES"] == "12" and e["MI300X_CERT_VIRTUAL_CARD"] == "12"
    a = pin_env(12, "amd", "auto", 4, base={})
    assert a["ROCR_VISIBLE_DEVICES"] == "12" and a["HIP_VISIBLE_DEVICES"] == "0" and a["CUDA_VISIBLE_DEVICES"] == "0"
    c = pin_env(5, "virtual", "cpu", 2, base={})
    assert "CUDA_VISIBLE_DEVICES" not in c and c["MI300X_CERT_VIRTUAL_CARD"] == "5"
    assert c["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert pin_env(5, "virtual", "cpu", 2, base={"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
