"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

# ---- running in parallel (pytest-xdist, as scripts/test.sh runs the suite) ----------------------
# Each test file is one unit of work (its module fixtures are built once), and the files that use
# the session's Airflow standalone (``airflow_standalone`` below) are one unit together, so it is
# started once. The longest units (measured with ``--durations``) go first so that they do not end
# the run alone. xdist's own ``loadgroup`` cannot express this with pytest 9 (its group suffix no
# longer reaches the node ids), hence a scheduler of our own (``--dist loadscope``).
#
# Tests marked ``host_network`` move traffic through the host's own interfaces (a veth pair), which
# every certification in observed mode counts as the host's traffic: each runs alone, with no other
# test of the run in progress on any worker (a lock file shared by the workers, taken exclusively
# by them and shared by every other test). Their file goes last.
_AIRFLOW_UNIT = "airflow-standalone"
_AIRFLOW_FILES = ("tests/browser/test_console_ui.py", "tests/browser/test_ui.py",
                  "tests/integration/test_airflow_standalone.py")
_FIRST = (_AIRFLOW_UNIT, "tests/integration/test_edge_fleet.py", "tests/integration/test_evidence_and_baseline.py",
          "tests/integration/test_certify.py", "tests/integration/test_alerts.py", "tests/integration/test_resume.py",
          "tests/dags/test_console.py")
_LAST = ("tests/integration/test_network_verdict.py",)


def _unit(nodeid: str) -> str:
    f = nodeid.split("::", 1)[0]
    return _AIRFLOW_UNIT if f in _AIRFLOW_FILES else f


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides);
    one where GPU tests are selected (one card, timed work)."""
    import re

    if re.search(r"(?<!not )\bgpu\b", config.option.markexpr or ""):
        return 1
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope``: the units above, in the order the workers collected them
    (``pytest_collection_modifyitems``). Other modes are xdist's own."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order, not xdist's sort by test count
    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker (workers collect; the controller only schedules): order as written
    stray = sorted({_unit(i.nodeid) for i in items if "airflow_standalone" in getattr(i, "fixturenames", ())}
                   - {_AIRFLOW_UNIT})
    if stray:  # it would start a second Airflow on another worker: list the file above
        raise pytest.UsageError(f"tests/conftest.py: {stray} use airflow_standalone; add them to _AIRFLOW_FILES")
    rank = {u: k for k, u in enumerate(_FIRST)}
    rank.update({u: len(_FIRST) + 1 + k for k, u in enumerate(_LAST)})
    items.sort(key=lambda i: rank.get(_unit(i.nodeid), len(_FIRST)))  # stable: file order kept within


def _run_lock(config):
    """The lock file the workers of this run share (beside their base temp dirs), else None."""
    if not hasattr(config, "workerinput"):
        return None
    from pathlib import Path

    if config.option.basetemp:  # xdist gives each worker <the run's base temp>/<worker id>
        return Path(config.option.basetemp).parent / "host-network.lock"
    import tempfile

    return Path(tempfile.gettempdir()) / f"mi300x-cert-tests-{config.workerinput['testrunuid']}.lock"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = _run_lock(item.config)
    if path is None:
        return (yield)
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if item.get_closest_marker("host_network") else fcntl.LOCK_SH)
        try:
            return (yield)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- state of their own ------------------------------------------------------------------------
_OURS: set[str] = set()  # the state dirs these fixtures made (a dir the user exported is kept)


def _isolate(mp, tmp_path_factory) -> None:
    for var, prefix in (("MI300X_CERT_STATE_DIR", "cert-state"), ("MI300X_CERT_HISTORY_DIR", "cert-history")):
        now = os.environ.get(var)
        if now is None or now in _OURS:
            d = str(tmp_path_factory.mktemp(prefix))
            _OURS.add(d)
            mp.setenv(var, d)


@pytest.fixture(autouse=True, scope="module")
def _isolated_module_state(tmp_path_factory):
    """Module fixtures (set up before any test's own) get a private state dir too: no run they make
    writes the user's state or takes the user's host lock (shared with other workers)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory)
        yield


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """No test writes into the user's own state (history index, alerts, outcomes): each test gets a
    private state dir unless the user exported one or the test sets one itself."""
    _isolate(monkeypatch, tmp_path_factory)


# ---- certificate bundles and S3 ---------------------------------------------------------------

@pytest.fixture
def signing_env(tmp_path, monkeypatch):
    """No configured keys; the development key lives under a per-test home dir."""
    for var in ("MI300X_CERT_SIGNING_KEY", "MI300X_CERT_VERIFY_KEY"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "cert-home"
    monkeypatch.setenv("MI300X_CERT_HOME_DIR", str(home))
    return home


@pytest.fixture
def make_complete_run(tmp_path, signing_env):
    """Factory: a tiny complete run directory (run.json, profile, inventory, a result CSV, verdicts)."""
    import itertools

    from mi300x_cert.rundir import RunDir

    counter = itertools.count()

    def make(*, verdicts=True, success=True, complete=True, host="gpu-node-07"):
        rd = RunDir.create(tmp_path / f"run{next(counter)}", host=host, profile_name="smoke", sku="mi300x",
                           profile_yaml="name: smoke\nsku: mi300x\n")
        rd.write_json("inventory.json", {"host": host, "cards": [
            {"index": 0, "name": "AMD Instinct MI300X", "serial": "SN-0", "bus_id": "0000:05:00.0", "domain": 0},
            {"index": 1, "name": "AMD Instinct MI300X", "serial": "SN-1", "bus_id": "0000:15:00.0", "domain": 0},
        ], "versions": {"torch": "2.13.0", "rocm": "7.0"}})
        rd.write_text("results/sd-throughput/rows.csv", "case_id,batch_size,latency_s\nc0,1,2.05\nc0,1,2.07\n")
        rd.write_json("conditions.json", {"sd-throughput": {"model": "synthetic:sd-v1-4", "dtype": "fp32"}})
        if verdicts:
            rd.write_json("validation/verdicts.json", {"success": success, "suites": {
                "latency": {"suite": "latency", "success": True, "failures": [], "evaluated": 3, "declared": 3},
                "thermal": {"suite": "thermal", "success": success, "evaluated": 2, "declared": 2,
                            "failures": [] if success else [{"expectation_type": "expect_column_max_to_be_between",
                                                              "column": "junction_c"}]},
            }})
        if complete:
            rd.mark_complete()
        return rd

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP (moto) on a free loopback port, for the whole session."""
    from mi300x_cert import s3local

    srv = s3local.start(port=0)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_store(s3_server):
    """A store dict for a fresh bucket on the session's S3 server (fast retries)."""
    import uuid

    return s3_server.store(f"test-{uuid.uuid4().hex[:12]}", backoff_s=0.01, attempts=3, connect_timeout=1)


# ---- Airflow -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def airflow_standalone(tmp_path_factory, s3_server):
    """One real ``airflow standalone`` per test session (temp AIRFLOW_HOME, free loopback port,
    bundles to the session's S3 server). Shared by the Airflow integration and browser tests;
    its whole process group is stopped at the end."""
    from mi300x_cert.airflow_local import start_standalone

    home = tmp_path_factory.mktemp("airflow-home")
    sa = start_standalone(home, extra_env={
        "MI300X_CERT_S3_ENDPOINT": s3_server.endpoint, "MI300X_CERT_S3_BUCKET": "airflow-standalone",
        "MI300X_CERT_S3_CREATE_BUCKET": "true", "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
        # a read-only user too (the console refuses it acknowledging alerts)
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
    })
    try:
        sa.wait_ready(timeout=420)
        yield sa
    finally:
        sa.stop()
