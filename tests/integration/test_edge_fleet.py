"""GPU servers as Airflow Edge workers, on one machine, services on loopback only.

A real PostgreSQL (started here from Debian's ``postgresql`` binaries, temp data dir, free port),
the Airflow control plane as separate processes (api-server, scheduler, dag-processor) with
``executor = LocalExecutor,EdgeExecutor``, and two ``airflow edge worker`` processes standing for
two GPU servers (``host-a`` on queue ``gpu-host-a``, ``host-b`` on ``gpu-host-b``).

Checks:
* each host's tasks ran only on its own worker (task instance ``queue`` and ``hostname`` from the
  REST API, and the Edge job table);
* killing a worker in the middle of a mapped sweep and starting it again finishes the run without
  running a completed case twice and without losing a result.

The probe DAG below has the same shape as the recertification DAG (a per-host queue, an idempotent
mapped case task that writes one status file per case), so it proves the fleet plumbing on its own.
When the DAG factory (``dags/recertify.py``) and a fleet file are present, a second test runs the
real recertification DAG of host A against a tiny profile.

Needs: ``apt-get install -y postgresql`` (skipped with that hint when the binaries are absent).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
JWT_SECRET = "edge-fleet-integration-test-only-" + "0123456789abcdef" * 4  # ≥64 bytes, test only
ADMIN_PASSWORD = "edge-fleet-test"


# --------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path | None:
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for c in reversed(cands):
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _airflow_bin() -> str:
    cand = Path(sys.executable).parent / "airflow"
    return str(cand) if cand.exists() else (shutil.which("airflow") or "airflow")


def _wait(pred, timeout: float, what: str, interval: float = 1.0, diag=None) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - polling a service that may not be up yet
            last_exc = e
        time.sleep(interval)
    extra = diag() if diag else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})\n{extra}")


class Postgres:
    """A throw-away PostgreSQL cluster: temp data dir, loopback TCP on a free port, socket in the temp dir."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "pgdata"
        self.sock = base / "pgsock"
        self.log = base / "postgres.log"
        self.port = _free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            # postgres refuses to run as root: run it as the packaged 'postgres' user (or nobody)
            user = "postgres"
            try:
                import pwd

                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            self._prefix = ["runuser", "-u", user, "--"]
            self.user = user
        else:
            self.user = None

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._prefix + argv, check=True, capture_output=True, text=True, timeout=120, **kw)

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.user:
            import pwd

            pw = pwd.getpwnam(self.user)
            os.chmod(self.base, 0o755)
            for p in (self.sock,):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.data.mkdir(exist_ok=True)
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            self.log.touch()
            os.chown(self.log, pw.pw_uid, pw.pw_gid)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "airflow", "-E", "UTF8", "--no-sync"])
        opts = f"-p {self.port} -k {self.sock} -h 127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"])
        self._run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", "airflow"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def stop(self) -> None:
        try:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        except Exception:  # noqa: BLE001 - teardown best effort
            pass


class Proc:
    """One service in its own process group (so teardown kills its children too)."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = logdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=self.env.get("AIRFLOW_HOME"))
        log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
        elif self.popen is not None:
            # the leader is gone but children (task processes) may remain in the group
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return f"--- {self.name} ---\n" + "\n".join(lines[-n:])


class Stack:
    """Postgres + Airflow control plane + Edge workers, all on 127.0.0.1."""

    def __init__(self, base: Path, dags: Path, extra_env: dict | None = None) -> None:
        self.base = base
        self.home = base / "airflow"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = base / "logs"
        self.logs.mkdir(exist_ok=True)
        self.dags = dags
        self.pg: Postgres | None = None
        self.procs: dict[str, Proc] = {}
        self.api_port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.extra_env = extra_env or {}
        self._token: str | None = None

    def env(self) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        pw_file = self.home / "passwords.json"
        e.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg.url if self.pg else "",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor,airflow.providers.edge3.executors.EdgeExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "AIRFLOW__EDGE__API_ENABLED": "True",
            "AIRFLOW__EDGE__API_URL": f"{self.base_url}/edge_worker/v1/rpcapi",
            "AIRFLOW__EDGE__JOB_POLL_INTERVAL": "1",
            "AIRFLOW__EDGE__HEARTBEAT_INTERVAL": "3",
            "AIRFLOW__EDGE__JOB_SUCCESS_PURGE": "60",
            "AIRFLOW__EDGE__PUSH_LOGS": "False",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "*",
            "no_proxy": "*",
        })
        e.update(self.extra_env)
        return e

    def start_postgres(self, bindir: Path) -> None:
        self.pg = Postgres(bindir, self.base / "pg")
        self.pg.start()

    def migrate(self) -> None:
        (self.home / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        r = subprocess.run([_airflow_bin(), "db", "migrate"], env=self.env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"airflow db migrate failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    def start(self, name: str, *args: str) -> Proc:
        p = Proc(name, [_airflow_bin(), *args], self.env(), self.logs).start()
        self.procs[name] = p
        return p

    def start_control_plane(self) -> None:
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
        self.start("scheduler", "scheduler")
        self.start("dag-processor", "dag-processor")
        _wait(lambda: self._get_noauth("/api/v2/monitor/health").get("metadatabase", {}).get("status") == "healthy",
              180, "the api-server health endpoint", diag=self.diag)

    def start_worker(self, host: str, slots: int = 2) -> Proc:
        # the same command the docs, the compose file and the systemd unit use (see mi300x_cert.deploy)
        argv = worker_argv(host, slots)
        # two workers on one machine need their own PID files (one per host in production)
        argv += ["--pid", str(self.home / f"edge-worker-{host}.pid")]
        p = Proc(f"worker-{host}", [_airflow_bin(), *argv[1:]], self.env(), self.logs).start()
        self.procs[f"worker-{host}"] = p
        return p

    def diag(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())

    # -- REST ------------------------------------------------------------------------------
    def _get_noauth(self, path: str) -> dict:
        import requests

        r = requests.get(self.base_url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def token(self) -> str:
        import requests

        if self._token is None:
            r = requests.post(self.base_url + "/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=20)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kw) -> Any:
        import requests

        r = requests.request(method, self.base_url + path, headers={"Authorization": f"Bearer {self.token()}"}, timeout=30, **kw)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path} → {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    def wait_dag(self, dag_id: str, timeout: float = 180) -> None:
        _wait(lambda: self.api("GET", f"/api/v2/dags/{dag_id}"), timeout, f"DAG {dag_id} to be parsed",
              interval=2, diag=self.diag)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out: list[dict] = []
        offset = 0
        while True:
            page = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                            params={"limit": 100, "offset": offset})
            out.extend(page["task_instances"])
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return out

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        def done():
            s = self.run_state(dag_id, run_id)
            return s if s in ("success", "failed") else None

        def diag():
            tis = self.task_instances(dag_id, run_id)
            states = sorted({(t["task_id"], t.get("map_index"), t["state"]) for t in tis}, key=str)
            return f"task states: {states}\n" + self.diag()

        return _wait(done, timeout, f"run {run_id} of {dag_id} to finish", interval=2, diag=diag)

    def edge_jobs(self) -> list[dict]:
        import sqlalchemy as sa

        eng = sa.create_engine(self.pg.url)
        try:
            with eng.connect() as c:
                rows = c.execute(sa.text("select dag_id, task_id, run_id, map_index, try_number, state, queue, edge_worker from edge_job"))
                return [dict(r._mapping) for r in rows]
        finally:
            eng.dispose()

    def worker_state(self, host: str) -> str | None:
        import sqlalchemy as sa

        eng = sa.create_engine(self.pg.url)
        try:
            with eng.connect() as c:
                return c.execute(sa.text("select state from edge_worker where worker_name = :n"), {"n": host}).scalar()
        finally:
            eng.dispose()

    def restart_worker_after_crash(self, host: str, slots: int) -> Proc:
        """A killed worker may register again once the control plane stops counting it as active
        (its liveness check: 5 × [edge] heartbeat_interval without a heartbeat)."""
        _wait(lambda: self.worker_state(host) in ("unknown", "offline", "offline maintenance"), 120,
              f"the control plane to mark worker {host} as gone", interval=1, diag=self.diag)
        return self.start_worker(host, slots)

    def teardown(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()
        for p in self.procs.values():
            if p.popen is not None:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.pg:
            self.pg.stop()


def worker_argv(host: str, slots: int) -> list[str]:
    try:
        from mi300x_cert.deploy import worker_command
    except ImportError:  # pragma: no cover - the deploy module ships with the package
        return ["airflow", "edge", "worker", "-q", f"gpu-{host}", "-c", str(slots), "-H", host]
    return worker_command(host, slots)


# --------------------------------------------------------------------------------------------
# the probe DAG: same shape as the recertification DAG (per-host queue, idempotent mapped cases)

PROBE_DAG = '''
"""Fleet probe: per-host queue, idempotent mapped cases (test only)."""
import json, os, socket, time
from pathlib import Path
from airflow.sdk import dag, task

OUT = Path(os.environ["EDGE_PROBE_OUT"])
N_CASES = int(os.environ.get("EDGE_PROBE_CASES", "6"))
CASE_S = float(os.environ.get("EDGE_PROBE_CASE_S", "3"))

def make(host):
    @dag(dag_id=f"probe_{host.replace('-', '_')}", schedule=None, catchup=False, tags=["test"],
         default_args={"retries": 2, "retry_delay": 1})
    def probe():
        @task(queue=f"gpu-{host}", executor="EdgeExecutor")
        def plan():
            return [{"case_id": f"c{i:02d}"} for i in range(N_CASES)]

        @task(queue=f"gpu-{host}", executor="EdgeExecutor", max_active_tis_per_dagrun=1)
        def run_case(case):
            d = OUT / host
            d.mkdir(parents=True, exist_ok=True)
            status = d / f"{case['case_id']}.json"
            if status.exists() and json.loads(status.read_text())["status"] == "ok":
                return {"case_id": case["case_id"], "skipped": True}
            with open(d / "rows.csv", "a") as f:
                f.write(f"{case['case_id']},{os.environ.get('HOSTNAME')},start\\n")
            time.sleep(CASE_S)
            with open(d / "rows.csv", "a") as f:
                f.write(f"{case['case_id']},{os.environ.get('HOSTNAME')},row\\n")
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps({"status": "ok", "worker": os.environ.get("HOSTNAME")}))
            os.replace(tmp, status)
            return {"case_id": case["case_id"], "skipped": False}

        @task  # control plane (LocalExecutor)
        def summarize(results):
            return len(list(results))

        summarize(run_case.expand(case=plan()))
    return probe()

for _h in ("host-a", "host-b"):
    globals()[f"probe_{_h.replace('-', '_')}"] = make(_h)
'''


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install -y postgresql")
    pytest.importorskip("airflow.providers.edge3", reason="apache-airflow-providers-edge3 is not installed")
    base = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
    os.chmod(base, 0o755)
    dags = base / "dags"
    dags.mkdir()
    (dags / "fleet_probe.py").write_text(textwrap.dedent(PROBE_DAG))
    out = base / "out"
    out.mkdir()
    st = Stack(base, dags, extra_env={
        "EDGE_PROBE_OUT": str(out),
        "EDGE_PROBE_CASES": "6",
        "EDGE_PROBE_CASE_S": "3",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    st.out = out  # type: ignore[attr-defined]
    try:
        st.start_postgres(bindir)
        st.migrate()
        st.start_control_plane()
        st.start_worker("host-a", 2)
        st.start_worker("host-b", 2)
        yield st
    finally:
        st.teardown()
        if os.environ.get("MI300X_CERT_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(base, ignore_errors=True)


def _gpu_tis(tis: list[dict]) -> list[dict]:
    return [t for t in tis if t["task_id"] in ("plan", "run_case")]


def test_each_host_runs_only_on_its_worker(stack: Stack) -> None:
    stack.wait_dag("probe_host_a")
    stack.wait_dag("probe_host_b")
    run_a = stack.trigger("probe_host_a")
    run_b = stack.trigger("probe_host_b")
    assert stack.wait_run("probe_host_a", run_a, 300) == "success"
    assert stack.wait_run("probe_host_b", run_b, 300) == "success"
    for dag_id, run_id, host in (("probe_host_a", run_a, "host-a"), ("probe_host_b", run_b, "host-b")):
        tis = _gpu_tis(stack.task_instances(dag_id, run_id))
        assert len(tis) == 1 + 6, [(t["task_id"], t["map_index"]) for t in tis]
        for t in tis:
            assert t["state"] == "success"
            assert t["queue"] == f"gpu-{host}", t
            assert t["hostname"] == host, f"{t['task_id']}[{t['map_index']}] ran on {t['hostname']!r}, not {host!r}"
        jobs = [j for j in stack.edge_jobs() if j["dag_id"] == dag_id and j["run_id"] == run_id]
        assert jobs and all(j["edge_worker"] == host and j["queue"] == f"gpu-{host}" for j in jobs), jobs


def test_worker_restart_mid_sweep_loses_nothing(stack: Stack) -> None:
    host, dag_id = "host-a", "probe_host_a"
    d = stack.out / host  # type: ignore[attr-defined]
    shutil.rmtree(d, ignore_errors=True)
    run_id = stack.trigger(dag_id)

    def some_done():
        tis = [t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == "run_case"]
        return sum(t["state"] == "success" for t in tis) >= 2

    _wait(some_done, 240, "two cases of the sweep to succeed", interval=1, diag=stack.diag)
    stack.procs[f"worker-{host}"].kill(signal.SIGKILL)
    done_before = {p.stem: p.stat().st_mtime_ns for p in d.glob("c*.json")}
    assert 2 <= len(done_before) < 6, done_before
    worker = stack.restart_worker_after_crash(host, 2)
    assert stack.wait_run(dag_id, run_id, 420) == "success"
    assert worker.alive(), stack.diag()

    # nothing lost, nothing done twice
    status = {p.stem: p.stat().st_mtime_ns for p in d.glob("c*.json")}
    assert sorted(status) == [f"c{i:02d}" for i in range(6)]
    for case_id, mtime in done_before.items():
        assert status[case_id] == mtime, f"case {case_id} was run again after the restart"
    rows = [ln.split(",") for ln in (d / "rows.csv").read_text().splitlines()]
    finished = [r[0] for r in rows if r[2] == "row"]
    assert sorted(finished) == sorted(set(finished)) == sorted(status), rows
    tis = [t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == "run_case"]
    assert all(t["state"] == "success" and t["hostname"] == host and t["queue"] == f"gpu-{host}" for t in tis), tis
