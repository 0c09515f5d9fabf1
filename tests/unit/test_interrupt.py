"""A run stopped from outside (SIGTERM as Airflow/systemd send it, Ctrl-C, or SIGKILL) leaves no
worker process behind and no run that says "running" forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "profiles" / "tiny.yaml"
CASE = "p1-b1x3-r1"  # the first sd-throughput case of the tiny profile: one worker


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _start_hanging_run(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """``mi300x-cert run sd-throughput`` whose worker hangs at its first measured batch; returns the
    CLI process and its worker pids once the worker hangs."""
    env = {**os.environ, "MI300X_CERT_WORKLOAD": "debug", "OMP_NUM_THREADS": "1",
           "MI300X_CERT_DEBUG_PARAMS": json.dumps({"hang_at": 0})}
    cli = subprocess.Popen([sys.executable, "-m", "mi300x_cert.cli", "run", "sd-throughput", "--profile", str(TINY),
                            "--out", str(out), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    log = out / "results" / "sd-throughput" / "cases" / CASE / "proc0.log"
    try:
        _wait(lambda: log.is_file() and "hanging at batch 0" in log.read_text(), 60, "the worker to hang")
    except AssertionError:
        cli.kill()
        raise
    workers = [p.pid for p in psutil.Process(cli.pid).children(recursive=True)]
    assert workers, "the hanging worker is a child of the CLI"
    return cli, workers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_kills_workers_and_marks_the_run_failed(tmp_path, sig):
    out = tmp_path / "run"
    cli, workers = _start_hanging_run(out)
    cli.send_signal(sig)
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 2, err
    assert f"interrupted ({sig.name})" in err and "Traceback" not in err
    assert not [p for p in workers if _alive(p)], "worker processes survived the interrupted run"
    meta = json.loads((out / "run.json").read_text())
    assert meta["state"] == "failed" and meta["finished"]
    assert meta["error"] == f"interrupted ({sig.name}) during sd-throughput"
    case = json.loads((out / "results" / "sd-throughput" / "cases" / f"{CASE}.json").read_text())
    assert case["status"] == "failed" and case["reason"].startswith(f"interrupted ({sig.name})")


def test_worker_exits_when_its_launcher_is_killed(tmp_path):
    """SIGKILL leaves the CLI no chance to clean up: the workers notice their stdin close and exit."""
    cli, workers = _start_hanging_run(tmp_path / "run")
    cli.kill()
    cli.communicate(timeout=30)
    _wait(lambda: not [p for p in workers if _alive(p)], 15, "orphaned workers to exit")


def test_cli_run_with_failed_cases_says_why_on_one_line(tmp_path, monkeypatch, capsys):
    from mi300x_cert import cli

    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MI300X_CERT_DEBUG_PARAMS", json.dumps({"crash_at": 0}))
    out = tmp_path / "run"
    assert cli.main(["run", "resnet50", "--profile", str(TINY), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: run failed: failed cases: resnet50/") and "crash at batch 0" in line
    assert json.loads((out / "run.json").read_text())["state"] == "failed"
