"""Workers forked from a preloaded process (mi300x_cert.preload) run the same protocol as spawned
ones: their own session, pins, pipes and exit status, killed at timeout, gone with the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mi300x_cert import preload
from mi300x_cert.errors import WorkerError
from mi300x_cert.launcher import launch

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
# a preloader that kept a worker's pipe open would hang a launch, not fail it: bound every test
pytestmark = pytest.mark.timeout(180)


def _spec(proc: int, card: int, n: int = 3, **params) -> dict:
    return {"proc": proc, "card": card, "device": "cpu", "kind": "debug", "params": {"latency_s": 0.01, **params},
            "warmup_batches": 1, "plan": {"mode": "fixed", "batch_size": 2, "n_batches": n}}


def _parent_and_session(pid: int) -> tuple[int, int]:
    return psutil.Process(pid).ppid(), os.getsid(pid)


def test_forked_workers_run_the_protocol_in_their_own_sessions_with_their_own_pins(tmp_path):
    seen: dict[int, tuple[int, int]] = {}
    res = launch([_spec(0, 12), _spec(1, 13), _spec(2, 14)], timeout_s=20, log_dir=tmp_path, start="preload",
                 on_spawn=lambda pid, s: seen.__setitem__(pid, _parent_and_session(pid)))
    assert res.ok, res.reason
    assert [w.start for w in res.workers] == ["preloaded"] * 3
    assert [w.status for w in res.workers] == ["ok"] * 3 and all(w.rows == 3 and w.warmup_rows == 1 for w in res.workers)
    assert [w.returncode for w in res.workers] == [0, 0, 0]
    # each worker: forked by the one preloader (not by this process), in a session of its own
    parents = {ppid for ppid, _ in seen.values()}
    assert len(seen) == 3 and len(parents) == 1 and os.getpid() not in parents
    assert all(sid == pid for pid, (_, sid) in seen.items())
    # each saw the pins of its own card, set after the fork
    assert [w.conditions["virtual_card"] for w in res.workers] == ["12", "13", "14"]
    assert (tmp_path / "preloader.log").exists()
    # the launch's own preloader ended with it
    assert not psutil.pid_exists(parents.pop())


def test_spawned_workers_stay_the_default_for_modelled_workloads(tmp_path):
    res = launch([_spec(0, 1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path)
    assert res.ok and [w.start for w in res.workers] == ["spawned", "spawned"]
    assert not (tmp_path / "preloader.log").exists()


def test_a_forked_worker_that_crashes_or_hangs_is_reported_like_a_spawned_one(tmp_path):
    res = launch([_spec(0, 1, crash_at=1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path / "crash", start="preload")
    assert not res.ok
    crashed, fine = res.workers
    assert (crashed.status, crashed.returncode, crashed.rows) == ("failed", 3, 1)
    assert "crash at batch 1" in crashed.reason
    assert (fine.status, fine.returncode, fine.rows) == ("ok", 0, 3)

    pids: list[int] = []
    t0 = time.time()
    res = launch([_spec(0, 1, hang_at=1), _spec(1, 2)], timeout_s=2, log_dir=tmp_path / "hang", start="preload",
                 on_spawn=lambda pid, s: pids.append(pid))
    hung = res.workers[0]
    assert (hung.status, hung.reason, hung.returncode) == ("timeout", "timeout after 2s", -signal.SIGKILL)
    assert time.time() - t0 < 15
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


def test_one_preloader_serves_every_launch_of_an_experiment_then_ends(tmp_path):
    parents: list[int] = []
    told: list[int] = []
    fds: list[int] = []
    with preload.preloading() as pool:
        for k in range(4):
            t0 = time.time()
            res = launch([_spec(0, 1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path / str(k), start="preload",
                         on_spawn=lambda pid, s: parents.append(psutil.Process(pid).ppid()), on_preloader=told.append)
            assert res.ok and [w.start for w in res.workers] == ["preloaded", "preloaded"]
            assert time.time() - t0 < 10  # every worker's stdout reached end of file as it exited
            (pre,) = pool._by_key.values()
            fds.append(len(os.listdir(f"/proc/{pre.proc.pid}/fd")))
        assert pre.alive and parents == [pre.proc.pid] * 8
        assert set(told) == {pre.proc.pid} and len(told) >= 4  # each case's network monitor audits it
        # the preloader keeps none of its workers' pipe ends
        assert fds == [fds[0]] * 4, fds
    assert pre.proc.poll() is not None, "the preloader outlived its experiment"
    assert not Path(pre._dir).exists()


def test_a_preloader_that_cannot_start_falls_back_to_spawned_workers(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no preloader here")

    monkeypatch.setattr(preload, "Preloader", broken)
    res = launch([_spec(0, 1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path, start="preload")
    assert res.ok, res.reason
    assert [w.start for w in res.workers] == ["spawned (no preloader: no preloader here)"] * 2


def test_a_library_that_fails_to_import_is_named(tmp_path):
    fake = tmp_path / "site" / "diffusers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this diffusers install is broken')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    with pytest.raises(RuntimeError, match="the preloader is not ready: ImportError: this diffusers install is broken"):
        preload.Preloader(None, env, ["sd"], timeout_s=120, log_path=tmp_path / "preloader.log")
    assert "this diffusers install is broken" in (tmp_path / "preloader.log").read_text()


def test_start_mode_comes_from_the_environment_and_a_bad_value_is_named(tmp_path):
    assert preload.start_mode({}) == "preload"
    assert preload.start_mode({"MI300X_CERT_WORKER_START": "Spawn"}) == "spawn"
    with pytest.raises(WorkerError, match=r"MI300X_CERT_WORKER_START='fork': expected one of preload, spawn"):
        preload.start_mode({"MI300X_CERT_WORKER_START": "fork"})
    env = {**os.environ, "MI300X_CERT_WORKER_START": "spawn"}
    res = launch([_spec(0, 1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path, env=env)
    assert res.ok and [w.start for w in res.workers] == ["spawned", "spawned"]


def test_the_launcher_killed_takes_its_preloader_and_workers_with_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from mi300x_cert.launcher import launch
        spec = lambda p: {{"proc": p, "card": p, "device": "cpu", "kind": "debug", "params": {{"latency_s": 0.01, "hang_at": 0}},
                          "warmup_batches": 1, "plan": {{"mode": "fixed", "batch_size": 1, "n_batches": 2}}}}
        launch([spec(0), spec(1)], timeout_s=600, start="preload", on_go=lambda: print("go", flush=True))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert p.stdout.readline().strip() == "go"
        (pre,) = psutil.Process(p.pid).children()  # the preloader; the workers are its children
        assert "mi300x_cert.preload" in " ".join(pre.cmdline())
        family = [pre, *pre.children()]
        assert len(family) == 3
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        gone, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, [a.pid for a in alive]
    finally:
        if p.poll() is None:
            p.kill()


def test_a_preloader_with_a_second_thread_refuses_to_fork():
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        with pytest.raises(RuntimeError, match=r"\d+ threads after the imports; forking could deadlock a worker"):
            preload._check_fork_safe()
    finally:
        stop.set()
        t.join()


def test_the_preloader_runs_single_threaded_and_counts_gpus_without_the_driver(tmp_path):
    """Whoever starts it, the preloader gets one thread per math library and the NVML device count
    (a library that asks at import whether a GPU exists must not initialize the driver)."""
    env = {**os.environ, "OMP_NUM_THREADS": "8", "MI300X_CERT_VIRTUAL_CARD": "3", "CUDA_VISIBLE_DEVICES": "3"}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    pre = preload.Preloader(None, env, [], timeout_s=60)
    try:
        raw = Path(f"/proc/{pre.proc.pid}/environ").read_bytes().split(b"\0")
        seen = dict(x.decode().split("=", 1) for x in raw if b"=" in x)
    finally:
        pre.close()
    assert seen["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert (seen["OMP_NUM_THREADS"], seen["MKL_NUM_THREADS"], seen["OPENBLAS_NUM_THREADS"]) == ("1", "1", "1")
    assert "MI300X_CERT_VIRTUAL_CARD" not in seen and "CUDA_VISIBLE_DEVICES" not in seen


def test_gpu_workers_are_always_spawned_unless_forced(tmp_path):
    from mi300x_cert.launcher import _preloader

    sd = {"kind": "sd", "params": {}}
    for device in ("cuda", "auto"):
        pre, own, note = _preloader([{**sd, "device": device}] * 2, None, dict(os.environ), "nvidia", None, 60, tmp_path)
        assert (pre, own, note) == (None, False, "spawned")
    # CPU workers of a model workload: preloaded (here with the import stubbed out: no kind to import)
    pre, own, note = _preloader([{"kind": "debug", "device": "cpu"}] * 2, None, dict(os.environ), "nvidia", "preload",
                                60, tmp_path)
    try:
        assert pre is not None and own and pre.alive
    finally:
        pre.close()


def test_a_large_worker_environment_reaches_the_worker(tmp_path):
    """A request larger than one socket read (module systems export big variables) is read whole."""
    env = {**os.environ, **{f"BIG_SETTING_{i}": "x" * 40_000 for i in range(5)}}  # 200 KB, each under exec's limit
    res = launch([_spec(0, 1), _spec(1, 2)], timeout_s=20, log_dir=tmp_path, start="preload", env=env)
    assert res.ok, res.reason
    assert [w.start for w in res.workers] == ["preloaded", "preloaded"]


def test_a_preloader_killed_under_its_workers_fails_them_closed_without_hanging(tmp_path):
    killed: list[int] = []

    def kill_preloader(pid: int, spec: dict) -> None:
        if not killed:
            killed.append(psutil.Process(pid).ppid())
            os.kill(killed[0], signal.SIGKILL)

    t0 = time.time()
    res = launch([_spec(0, 1, n=20, latency_s=0.05), _spec(1, 2, n=20, latency_s=0.05)], timeout_s=30,
                 log_dir=tmp_path, start="preload", on_spawn=kill_preloader)
    assert time.time() - t0 < 30
    assert not res.ok
    state = [(w.status, w.start, w.reason) for w in res.workers]
    # the forked worker's exit status is unknown: a failure, never a pass
    assert res.workers[0].start == "preloaded" and res.workers[0].status == "failed", state
    assert res.workers[0].reason == "its exit status was lost: the preloader that forked it ended first"
    # a worker asked for after the preloader died is spawned, saying why
    assert res.workers[1].start.startswith("spawned (the preloader failed: "), state


def test_a_refusal_on_this_host_is_not_paid_again(tmp_path, monkeypatch):
    monkeypatch.setitem(preload._HOST, "refused", "the preloader is not ready: RuntimeError: 3 threads after the imports")
    sd = {"kind": "sd", "params": {}, "device": "cpu"}
    from mi300x_cert.launcher import _preloader

    assert _preloader([sd, sd], None, dict(os.environ), "virtual", None, 60, tmp_path) == (
        None, False, "spawned (no preloader: the preloader is not ready: RuntimeError: 3 threads after the imports)")
    assert not (tmp_path / "preloader.log").exists()
