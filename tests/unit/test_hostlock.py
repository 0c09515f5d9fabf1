"""One run per host at a time: a second run on a locked host waits (bounded) or refuses naming the
holder; a lock left by a killed process is taken over; the CLI and the Airflow task path take the
same lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mi300x_cert.errors import HostBusyError
from mi300x_cert.hostlock import holder, host_lock, lock_path

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "profiles" / "tiny.yaml"
HOLD = """
import sys, time
from mi300x_cert.hostlock import host_lock
with host_lock(sys.argv[1], sys.argv[2], 0):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _hold(host: str, run_dir: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock of ``host`` for ``seconds``; returns once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, host, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", p.stderr.read()
    return p


def test_second_run_refuses_naming_the_holder(tmp_path):
    other = _hold("gpu-a", tmp_path / "run-1", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(HostBusyError) as e:
            with host_lock("gpu-a", tmp_path / "run-2", wait_s=0):
                pass
        assert time.monotonic() - t0 < 2
        msg = str(e.value)
        assert msg.startswith(f"host gpu-a is busy: pid {other.pid} on ")
        assert f"measuring run {tmp_path / 'run-1'} since 20" in msg and "gave up after waiting 0 s" in msg
        assert "--wait SECONDS" in msg
        # another host is not affected
        with host_lock("gpu-b", tmp_path / "run-3", wait_s=0):
            pass
    finally:
        other.kill()
        other.wait()


def test_second_run_waits_bounded_then_refuses(tmp_path, capsys):
    other = _hold("gpu-a", tmp_path / "run-1", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(HostBusyError, match=r"gave up after waiting 1\.5 s"):
            with host_lock("gpu-a", tmp_path / "run-2", wait_s=1.5):
                pass
        assert 1.4 < time.monotonic() - t0 < 5
        assert f"host gpu-a is busy: pid {other.pid}" in capsys.readouterr().err  # said while waiting
    finally:
        other.kill()
        other.wait()


def test_second_run_proceeds_when_the_first_finishes(tmp_path):
    other = _hold("gpu-a", tmp_path / "run-1", 1.0)
    t0 = time.monotonic()
    with host_lock("gpu-a", tmp_path / "run-2", wait_s=30) as rec:
        assert 0.3 < time.monotonic() - t0 < 15
        assert rec["pid"] == os.getpid() and holder("gpu-a")["run_dir"] == str(tmp_path / "run-2")
    assert other.wait(10) == 0
    assert lock_path("gpu-a").read_text() == ""  # released cleanly: no holder left behind


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    other = _hold("gpu-a", tmp_path / "run-1", 60)
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert holder("gpu-a")["pid"] == other.pid  # the file still names the dead holder
    with host_lock("gpu-a", tmp_path / "run-2", wait_s=0):
        pass
    err = capsys.readouterr().err
    assert f"took over the stale lock of host gpu-a from pid {other.pid}" in err and "that process is gone" in err


def test_reentrant_for_the_same_run_only(tmp_path):
    with host_lock("gpu-a", tmp_path / "run-1", wait_s=0):
        with host_lock("gpu-a", tmp_path / "run-1", wait_s=0):
            pass
        assert holder("gpu-a")["pid"] == os.getpid()  # the inner release keeps the outer hold
        with pytest.raises(HostBusyError, match="this process already measures run"):
            with host_lock("gpu-a", tmp_path / "run-2", wait_s=0):
                pass


def test_cli_run_on_a_locked_host_refuses_before_creating_the_run(tmp_path, capsys, monkeypatch):
    from mi300x_cert import cli

    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    other = _hold("test-host", tmp_path / "first", 30)  # tiny.yaml: host.name test-host
    try:
        out = tmp_path / "second"
        assert cli.main(["run", "resnet50", "--profile", str(TINY), "--out", str(out), "--quiet", "--wait", "0"]) == 2
        err = capsys.readouterr().err
        [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert line.startswith(f"error: host test-host is busy: pid {other.pid} on ")
        assert str(tmp_path / "first") in line
        assert not out.exists(), "a refused run leaves no run directory"
        assert cli.main(["certify", "--profile", str(TINY), "--out", str(out), "--quiet", "--wait", "0",
                         "--no-publish"]) == 2
        assert "error: host test-host is busy" in capsys.readouterr().err and not out.exists()
    finally:
        other.kill()
        other.wait()


def test_airflow_task_path_takes_the_same_lock(tmp_path, monkeypatch):
    """``pipeline.run_case`` / ``run_experiment`` (the DAG's measuring tasks) wait for / refuse a held host."""
    from mi300x_cert import pipeline

    monkeypatch.setenv("MI300X_CERT_WORKLOAD", "debug")
    monkeypatch.setenv("MI300X_CERT_LOCK_WAIT_S", "0")
    run_dir = pipeline.prepare_run(TINY, tmp_path / "run")
    case = pipeline.plan_cases(run_dir, "sd-throughput")[0]
    other = _hold("test-host", tmp_path / "cli-run", 30)
    try:
        with pytest.raises(HostBusyError, match=rf"host test-host is busy: pid {other.pid}"):
            pipeline.run_case(run_dir, "sd-throughput", case)
        with pytest.raises(HostBusyError, match=rf"host test-host is busy: pid {other.pid}"):
            pipeline.run_experiment(run_dir, "whisper")
        cases = Path(run_dir) / "results" / "sd-throughput" / "cases"
        assert not list(cases.glob("*.json")) if cases.exists() else True  # nothing measured, nothing recorded
    finally:
        other.kill()
        other.wait()
    st = pipeline.run_case(run_dir, "sd-throughput", case)  # free again: the task's retry runs it
    assert st["status"] == "ok", st


def test_bad_wait_values_are_refused(monkeypatch):
    from mi300x_cert import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "all", "--profile", "smoke", "--out", "x", "--wait", "-1"])
    monkeypatch.setenv("MI300X_CERT_LOCK_WAIT_S", "soon")
    with pytest.raises(HostBusyError, match="MI300X_CERT_LOCK_WAIT_S='soon' is not a number of seconds"):
        with host_lock("gpu-a", "x"):
            pass
