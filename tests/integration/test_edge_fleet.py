"""GPU servers as Airflow Edge workers, on one machine, services on loopback only.

A real PostgreSQL (started here from Debian's ``postgresql`` binaries, temp data dir, free port),
the Airflow control plane as separate processes (api-server, scheduler, dag-processor) with
``executor = LocalExecutor,EdgeExecutor``, and two ``airflow edge worker`` processes standing for
two GPU servers (``host-a`` on queue ``gpu-host-a``, ``host-b`` on ``gpu-host-b``).

**No shared disk**: the control plane (api-server, scheduler, dag-processor — the scheduler's
LocalExecutor runs the control-plane ``register`` task) and each worker get their own runs dir,
state dir and key dir. The registry is its own PostgreSQL database (``mi300x_cert``) beside Airflow's,
reachable only from the control plane; each worker's registry URL points at a closed port, so a GPU
host that tried to write the registry would fail loudly. Each worker makes its own signing key
(``mi300x-cert keys generate``); the control plane enrolls the public halves
(``mi300x-cert keys enroll``).

Checks:
* each host's tasks ran only on its own worker (task instance ``queue`` and ``hostname`` from the
  REST API, and the Edge job table); ``register`` ran on the control plane;
* killing a worker in the middle of a mapped sweep and starting it again finishes the run without
  running a completed case twice and without losing a result;
* both hosts' certifications, host-b's failed thermal suite (a hot card) as an alert, and the
  per-serial history appear through the control plane's ``mi300x-cert fleet / alerts / history``
  and the dashboard's JSON routes — read from the registry, nothing from a worker's disk;
* a forged bundle (verdict changed, re-signed with an unenrolled key, manifest and sums redone) is
  refused by ``register`` and the host shows NOT CERTIFIED with the reason;
* a replayed bundle (a valid one copied under another run's S3 prefix) is refused by ``register``
  and by ``verify s3://…``.

The DAGs are the real ``dags/recertify.py`` built from a test fleet file (``$MI300X_CERT_FLEET``)
with two hosts on ``tests/fixtures/profiles/edge-smoke.yaml`` (4 simulated cards, 6 SD cases);
the workers run the engine's debug workload (``MI300X_CERT_WORKLOAD=debug``: no model, a modelled
latency), and bundles are published to an embedded S3 server on 127.0.0.1. Both hosts' runs go at
once; worker A is killed after two SD cases succeeded and started again.

Needs: ``apt-get install -y postgresql`` (skipped with that hint when the binaries are absent).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.postgres import PG_MISSING, Postgres
from support.postgres import free_port as _free_port
from support.postgres import pg_bindir as _pg_bindir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
JWT_SECRET = "edge-fleet-integration-test-only-" + "0123456789abcdef" * 4  # ≥64 bytes, test only
ADMIN_PASSWORD = "edge-fleet-test"


# --------------------------------------------------------------------------------------------
# helpers


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

    def descendants(self) -> list:
        import psutil

        if self.popen is None:
            return []
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def crash(self) -> None:
        """Kill the process and every descendant at once, as when a host loses power or a container
        is killed (Airflow's task supervisor puts each task in its own process group, so killing the
        worker's group alone would leave the running task behind)."""
        procs = self.descendants()
        self.kill(signal.SIGKILL)
        for p in procs:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def stop(self) -> None:
        procs = self.descendants()
        if self.alive():
            self.kill(signal.SIGTERM)
        elif self.popen is not None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:  # task processes in their own process groups
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return f"--- {self.name} ---\n" + "\n".join(lines[-n:])


class Stack:
    """Postgres + Airflow control plane + Edge workers, all on 127.0.0.1."""

    def __init__(self, base: Path, dags: Path, extra_env: dict | None = None,
                 role_env: dict[str, dict] | None = None) -> None:
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
        self.role_env = role_env or {}  # "control-plane" / "<host>": that machine's own dirs
        self.registry_url: str | None = None
        self._token: str | None = None

    def env(self, role: str = "control-plane") -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MI300X_CERT_"))}
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
        e.update(self.role_env.get(role, {}))
        if role == "control-plane" and self.registry_url:
            e["MI300X_CERT_REGISTRY_URL"] = self.registry_url
        return e

    def cli(self, *args: str, role: str = "control-plane", check: bool = True) -> subprocess.CompletedProcess:
        """``mi300x-cert ARGS`` as run on one machine of the fleet (its own env and dirs)."""
        r = subprocess.run([sys.executable, "-m", "mi300x_cert.cli", *args], env=self.env(role), capture_output=True,
                           text=True, timeout=300, cwd=str(REPO))
        if check:
            assert r.returncode == 0, f"mi300x-cert {' '.join(args)} ({role}) → {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def start_postgres(self, bindir: Path) -> None:
        self.pg = Postgres(bindir, self.base / "pg")
        self.pg.start()
        # the registry: its own database on the control plane's server (the compose stack's init does the same)
        self.registry_url = self.pg.create_database("mi300x_cert")

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
        argv += ["--pid", self.pid_file(host)]
        p = Proc(f"worker-{host}", [_airflow_bin(), *argv[1:]], self.env(host), self.logs).start()
        self.procs[f"worker-{host}"] = p
        return p

    def pid_file(self, host: str) -> str:
        return str(Path(self.role_env.get(host, {}).get("AIRFLOW_HOME") or self.home) / f"edge-worker-{host}.pid")

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
# the fleet under test

HOSTS = ("host-a", "host-b")
CARDS = 4
PROFILE = REPO / "tests" / "fixtures" / "profiles" / "edge-smoke.yaml"
CONF = {"experiments": ["sd-throughput"]}
HOT_CARD = 1
# host-b runs bare metal too, with one card 40 °C hot: its thermal suite fails → an alert
CONF_B = {"experiments": ["bare-metal", "sd-throughput"],
          "overrides": {"telemetry": {"simulated": {"hot_cards": {str(HOT_CARD): 40.0}}}}}
CLOSED_REGISTRY = "postgresql+psycopg2://nobody@127.0.0.1:1/no-registry-on-gpu-hosts"
BUCKET = "edge-fleet-test"
SD_CASES = 6  # edge-smoke: process counts [1, 2] × batch configs [1x3, 2x2, 3x1]
GPU_TASKS = {"preflight", "run_sd_case"}  # tasks that hold the host's pool (all its cards)


def _fleet_yaml() -> str:
    servers = [{"name": h, "profile": str(PROFILE), "sku": "smoke", "cards": CARDS, "schedule": None,
                "alerts": {"email": []}} for h in HOSTS]
    import yaml

    return yaml.safe_dump({"servers": servers}, sort_keys=False)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(PG_MISSING)
    pytest.importorskip("airflow.providers.edge3", reason="apache-airflow-providers-edge3 is not installed")
    if not (REPO / "dags" / "recertify.py").is_file():
        pytest.skip("dags/recertify.py is missing")
    from mi300x_cert import s3local
    from mi300x_cert.deploy import pool_commands

    base = Path(tempfile.mkdtemp(prefix="edge-fleet-"))
    os.chmod(base, 0o755)
    dags = base / "dags"
    dags.mkdir()
    # only the recertification DAGs (the manual DAGs hand over to them; not needed here)
    (dags / "recertify.py").symlink_to(REPO / "dags" / "recertify.py")
    fleet = base / "fleet.yaml"
    fleet.write_text(_fleet_yaml())
    s3 = s3local.start(0, "127.0.0.1")
    # every machine its own disk: runs, state (alerts, registry file if any) and keys
    role_env = {}
    for role in ("control-plane", *HOSTS):
        d = base / role
        for sub in ("runs", "state", "keys", "airflow"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        role_env[role] = {"MI300X_CERT_RUNS_DIR": str(d / "runs"), "MI300X_CERT_STATE_DIR": str(d / "state"),
                          "MI300X_CERT_HOME_DIR": str(d / "keys")}
        if role != "control-plane":
            role_env[role].update(AIRFLOW_HOME=str(d / "airflow"), MI300X_CERT_REGISTRY_URL=CLOSED_REGISTRY)
    st = Stack(base, dags, role_env=role_env, extra_env={
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "MI300X_CERT_FLEET": str(fleet),
        "MI300X_CERT_GPU_EXECUTOR": "EdgeExecutor",
        "MI300X_CERT_WORKLOAD": "debug",
        "MI300X_CERT_DEBUG_PARAMS": json.dumps({"latency_s": 0.8}),  # a case lasts a few seconds
        "MI300X_CERT_S3_ENDPOINT": s3.endpoint,
        "MI300X_CERT_S3_BUCKET": BUCKET,
        "MI300X_CERT_S3_CREATE_BUCKET": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(base / "tmp"),
    })
    (base / "tmp").mkdir()
    try:
        st.start_postgres(bindir)
        st.migrate()
        # one pool per host, slots = cards (what airflow-init runs in the compose stack)
        for cmd in pool_commands(fleet):
            r = subprocess.run([_airflow_bin(), *cmd[1:]], env=st.env(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
        # the registry's schema, then each GPU host makes its key and the control plane enrolls it
        st.cli("registry", "upgrade")
        for h in HOSTS:
            st.cli("keys", "generate", role=h)
            pub = base / "control-plane" / f"{h}.pub.pem"
            shutil.copy(base / h / "keys" / "host-signing-key.pub.pem", pub)  # the operator carries the public half
            st.cli("keys", "enroll", h, "--public-key", str(pub), "--by", "fleet-test")
        st.s3 = s3
        st.start_control_plane()
        for h in HOSTS:
            st.start_worker(h, CARDS)  # slots = cards
        yield st
    finally:
        st.teardown()
        try:
            s3._server.stop()
        except Exception:  # noqa: BLE001 - teardown best effort
            pass
        if os.environ.get("MI300X_CERT_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(base, ignore_errors=True)


def _case_files(run_dir: Path) -> dict[str, dict]:
    cases = run_dir / "results" / "sd-throughput" / "cases"
    out = {}
    for p in sorted(cases.glob("*.json")):
        st = json.loads(p.read_text())
        out[p.stem] = {"mtime_ns": p.stat().st_mtime_ns, "status": st.get("status"), "at": st.get("at"),
                       "rows": st.get("rows"), "attempt": st.get("attempt")}
    return out


@pytest.fixture(scope="module")
def fleet_runs(stack: Stack) -> dict:
    """Both hosts recertified at once; worker A killed mid SD matrix and started again."""
    dag_ids = {h: f"recertify_{h}" for h in HOSTS}
    for d in dag_ids.values():
        stack.wait_dag(d)
    runs = {h: stack.trigger(dag_ids[h], CONF_B if h == "host-b" else CONF) for h in HOSTS}
    host, dag_id = "host-a", dag_ids["host-a"]

    def run_dir_of(h: str) -> Path | None:
        found = [p.parent for p in (stack.base / h / "runs" / h).glob("*/run.json")]
        assert len(found) <= 1, found
        return found[0] if found else None

    def mid_case() -> tuple[Path, str] | None:
        """(run dir, case id) once two cases are ok and a third has started writing rows"""
        rd = run_dir_of(host)
        if rd is None:
            return None
        cases = rd / "results" / "sd-throughput" / "cases"
        ok = {p.stem for p in cases.glob("*.json") if json.loads(p.read_text()).get("status") == "ok"}
        started = [p.name[: -len(".rows.csv")] for p in cases.glob("*.rows.csv")]
        running = [c for c in started if c not in ok]
        return (rd, running[0]) if len(ok) >= 2 and running else None

    run_dir_a, killed_case = _wait(mid_case, 300, "host-a to be inside its third SD case",
                                   interval=0.1, diag=stack.diag)
    stack.procs[f"worker-{host}"].crash()  # the worker and its running case, all at once
    done_before = {k: v for k, v in _case_files(run_dir_a).items() if v["status"] == "ok"}
    worker = stack.restart_worker_after_crash(host, CARDS)
    states = {h: stack.wait_run(dag_ids[h], runs[h], 600) for h in HOSTS}
    return {"dag_ids": dag_ids, "runs": runs, "states": states, "run_dir_a": run_dir_a,
            "done_before": done_before, "worker_a": worker, "killed_case": killed_case}


def test_each_host_runs_only_on_its_worker(stack: Stack, fleet_runs: dict) -> None:
    jobs = stack.edge_jobs()
    for h in HOSTS:
        dag_id, run_id = fleet_runs["dag_ids"][h], fleet_runs["runs"][h]
        tis = stack.task_instances(dag_id, run_id)
        by_task = {}
        for t in tis:
            by_task.setdefault(t["task_id"], []).append(t)
        # the measurement chain succeeded (the run's final verdict depends on the smoke thresholds)
        for task_id in ("preflight", "plan_sd", "finalize_sd", "finish_run"):
            assert [t["state"] for t in by_task[task_id]] == ["success"], (h, task_id, by_task.get(task_id))
        cases = by_task["run_sd_case"]
        assert len(cases) == SD_CASES and all(t["state"] == "success" for t in cases), [(t["map_index"], t["state"]) for t in cases]
        ran = [t for t in tis if t["state"] in ("success", "failed") and t["task_id"] != "register"]
        assert ran
        # the conclusion is the control plane's: register ran there (LocalExecutor), not on the worker
        reg = by_task["register"]
        assert len(reg) == 1 and reg[0]["hostname"] not in HOSTS and reg[0]["queue"] != f"gpu-{h}", reg
        for t in ran:
            assert t["queue"] == f"gpu-{h}", t
            assert t["hostname"] == h, f"{dag_id}.{t['task_id']}[{t['map_index']}] ran on {t['hostname']!r}, not on worker {h!r}"
        gpu = [t for t in ran if t["task_id"] in GPU_TASKS]
        assert all(t["pool"] == f"gpu-{h}" and t["pool_slots"] == CARDS for t in gpu), gpu
        mine = [j for j in jobs if j["dag_id"] == dag_id and j["run_id"] == run_id]
        assert mine, f"no Edge jobs recorded for {dag_id}"
        assert {j["edge_worker"] for j in mine} == {h} and {j["queue"] for j in mine} == {f"gpu-{h}"}, mine
        assert fleet_runs["states"][h] in ("success", "failed")


def test_worker_healthcheck_command(stack: Stack, fleet_runs: dict) -> None:
    """The images' HEALTHCHECK (`airflow edge status`) answers 0 for a live worker, 1 without one."""
    for h in HOSTS:
        r = subprocess.run([_airflow_bin(), "edge", "status", "--pid", stack.pid_file(h)],
                           env=stack.env(h), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert json.loads(r.stdout[r.stdout.index("{"):])["state"] in ("running", "idle"), r.stdout
    r = subprocess.run([_airflow_bin(), "edge", "status", "--pid", str(stack.home / "no-worker.pid")],
                       env=stack.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def test_worker_restart_mid_sweep_loses_nothing(stack: Stack, fleet_runs: dict) -> None:
    run_dir = fleet_runs["run_dir_a"]
    before = fleet_runs["done_before"]
    assert 2 <= len(before) < SD_CASES, f"the worker was not killed mid matrix: {sorted(before)} done"
    assert fleet_runs["worker_a"].alive(), stack.diag()
    after = _case_files(run_dir)
    # no result lost: every case finished ok
    assert len(after) == SD_CASES and all(v["status"] == "ok" for v in after.values()), after
    # nothing done twice: cases completed before the kill were skipped, their files untouched
    for case_id, st in before.items():
        assert after[case_id]["mtime_ns"] == st["mtime_ns"] and after[case_id]["at"] == st["at"], \
            f"case {case_id} ran again after the restart"
    # each case's rows appear once in the experiment's rows (finalize concatenated the case files)
    import csv

    with open(run_dir / "results" / "sd-throughput" / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    measured = [r for r in rows if str(r.get("warmup", "")).lower() not in ("true", "1")]
    per_case: dict[str, int] = {}
    keys = set()
    for r in measured:
        per_case[r["case_id"]] = per_case.get(r["case_id"], 0) + 1
        key = (r["case_id"], r["repetition"], r["proc"], r["batch_index"])
        assert key not in keys, f"row {key} appears twice"
        keys.add(key)
    assert set(per_case) == set(after)
    for case_id, st in after.items():
        assert per_case[case_id] == st["rows"], (case_id, per_case[case_id], st["rows"])
    # the interrupted task was retried, on worker A (the only worker of its queue)
    tis = {t["map_index"]: t for t in stack.task_instances(fleet_runs["dag_ids"]["host-a"], fleet_runs["runs"]["host-a"])
           if t["task_id"] == "run_sd_case"}
    assert all(t["hostname"] == "host-a" for t in tis.values())
    killed_case = fleet_runs["killed_case"]
    assert killed_case not in before
    assert after[killed_case]["attempt"] == 2, after[killed_case]  # the interrupted attempt was set aside
    by_case = {t.get("rendered_map_index"): t for t in tis.values()}
    assert set(by_case) == set(after), sorted(map(str, by_case))
    killed = by_case[killed_case]
    assert killed["try_number"] >= 2 and killed["state"] == "success", killed
    # the cases that had finished were never handed to a worker again
    for case_id in before:
        assert by_case[case_id]["try_number"] == 1, by_case[case_id]


# --------------------------------------------------------------------------------------------
# the control plane's view: registry only, no worker disk


def _cli_json(stack: Stack, *args: str) -> Any:
    return json.loads(stack.cli(*args, "--json").stdout)


def _plugin(stack: Stack, path: str) -> Any:
    return stack.api("GET", f"/mi300x-cert{path}")


def test_control_plane_sees_both_hosts_alerts_and_history(stack: Stack, fleet_runs: dict) -> None:
    fleet = {r["host"]: r for r in _cli_json(stack, "fleet")}
    assert set(fleet) >= set(HOSTS), fleet
    assert fleet["host-a"]["result"] == "CERTIFIED", (fleet["host-a"]["reasons"], fleet["host-a"])
    assert fleet["host-b"]["result"] == "NOT CERTIFIED", (fleet["host-b"]["reasons"], fleet["host-b"])
    assert fleet_runs["states"]["host-a"] == "success", stack.diag()
    assert fleet_runs["states"]["host-b"] == "failed"  # its register task failed the run: NOT certified
    for h in HOSTS:
        assert fleet[h]["run_id"] and fleet[h]["expires_at" if h == "host-a" else "run_id"]
    # host-b's failed thermal suite: an alert on the control plane, naming the hot card
    alerts = _cli_json(stack, "alerts", "--all")
    thermal = [a for a in alerts if a["host"] == "host-b" and a["suite"] == "thermal"]
    assert len(thermal) == 1 and thermal[0]["status"] == "open", alerts
    assert any(str(f.get("card")) == str(HOT_CARD) for f in thermal[0]["failures"]), thermal[0]["failures"]
    assert thermal[0]["bundle_uri"].startswith(f"s3://{BUCKET}/"), thermal[0]
    assert not [a for a in alerts if a["host"] == "host-a" and a["kind"] == "expectation"], alerts
    # history by GPU serial: the same simulated serials exist on both hosts
    hist = _cli_json(stack, "history", f"SIM-MI300X-{HOT_CARD:04d}")
    assert {r["host"] for r in hist} == set(HOSTS), hist
    hot = [r for r in hist if r["host"] == "host-b"][0]
    assert hot["card_ok"] is False and hot["active_junction_p95_c"] is not None, hot
    # the dashboard's JSON routes read the same registry
    api_fleet = {r["host"]: r for r in _plugin(stack, "/api/fleet")}
    assert api_fleet["host-a"]["result"] == "CERTIFIED" and api_fleet["host-b"]["result"] == "NOT CERTIFIED"
    assert any(a["suite"] == "thermal" and a["host"] == "host-b" for a in _plugin(stack, "/api/alerts"))
    assert {r["host"] for r in _plugin(stack, f"/api/history/SIM-MI300X-{HOT_CARD:04d}")} == set(HOSTS)
    # nothing was recorded on a GPU host's disk
    for h in HOSTS:
        state = stack.base / h / "state"
        assert not list(state.rglob("registry.db*")) and not list(state.rglob("alerts/*.json")), sorted(state.rglob("*"))


def _published_prefix(stack: Stack, host: str) -> str:
    rec = [c for c in _cli_json(stack, "fleet") if c["host"] == host][0]
    assert rec.get("bundle_uri"), rec
    return rec["bundle_uri"]


def test_forged_bundle_is_refused(stack: Stack, fleet_runs: dict, tmp_path: Path) -> None:
    """The attacker has host-b's disk: edits the failed verdict to a pass, re-signs with a fresh key
    (manifest and sums redone by the real bundle builder) and publishes it under its own run id."""
    from mi300x_cert.bundle import build_bundle
    from mi300x_cert.bundle.keys import generate_key_file
    from mi300x_cert.rundir import RunDir
    from mi300x_cert.storage import publish_bundle

    [src] = [p.parent for p in (stack.base / "host-b" / "runs" / "host-b").glob("*/run.json")]
    forged = tmp_path / "forged"
    shutil.copytree(src, forged, ignore=shutil.ignore_patterns("bundle", ".bundle*"))
    vpath = forged / "validation" / "verdicts.json"
    v = json.loads(vpath.read_text())
    v["success"] = True
    v["failures"] = []
    for suite in v["suites"].values():
        suite.update(success=True, status="passed", failures=[])
    vpath.write_text(json.dumps(v))
    meta = json.loads((forged / "run.json").read_text())
    meta["run_id"] = "forged-1"
    (forged / "run.json").write_text(json.dumps(meta))
    key = generate_key_file(tmp_path / "attacker.pem")
    bundle = build_bundle(RunDir(forged).root, key=key)
    store = {"endpoint": stack.s3.endpoint, "bucket": BUCKET, "access_key": "test", "secret_key": "test"}
    uri = publish_bundle(bundle, store)
    r = stack.cli("register", uri, check=False)
    assert r.returncode == 1 and "refused" in r.stdout and "not enrolled" in r.stdout, r.stdout + r.stderr
    host_b = [c for c in _cli_json(stack, "fleet") if c["host"] == "host-b"][0]
    assert host_b["result"] == "NOT CERTIFIED" and host_b["run_id"] == "forged-1", host_b
    assert any("not enrolled" in reason for reason in host_b.get("reasons") or []), host_b
    refused = [a for a in _cli_json(stack, "alerts") if a["host"] == "host-b" and a["kind"] == "refused"]
    assert refused and "not enrolled" in refused[0]["message"], refused
    # verify agrees: intact, but the signer is not trusted → non-zero
    assert stack.cli("verify", uri, check=False).returncode == 2


def test_replayed_bundle_is_refused(stack: Stack, fleet_runs: dict, tmp_path: Path) -> None:
    """host-a's valid, trusted bundle copied byte for byte under another run's prefix."""
    import base64
    import hashlib

    from mi300x_cert.storage import fetch_bundle, load_store_config, make_client

    store = {"endpoint": stack.s3.endpoint, "bucket": BUCKET, "access_key": "test", "secret_key": "test"}
    uri = _published_prefix(stack, "host-a")
    assert stack.cli("verify", uri, check=False).returncode == 0  # the original is fine
    local = fetch_bundle(uri, tmp_path / "b", store)
    parts = uri.split("/")
    replay = "/".join(parts[:-1] + ["replayed-run"])
    client = make_client(load_store_config(store))
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        data = f.read_bytes()
        key = "/".join(replay.split("/")[3:]) + "/" + f.relative_to(local).as_posix()
        client.put_object(Bucket=BUCKET, Key=key, Body=data,
                          ChecksumAlgorithm="SHA256", Metadata={"sha256": hashlib.sha256(data).hexdigest()},
                          ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())
    v = stack.cli("verify", replay, check=False)
    assert v.returncode == 2 and "replay" in v.stderr, v.stdout + v.stderr
    r = stack.cli("register", replay, check=False)
    assert r.returncode == 1 and "refused" in r.stdout and "replay" in r.stdout, r.stdout + r.stderr
    rec = _cli_json(stack, "fleet")
    host_a = [c for c in rec if c["host"] == "host-a"][0]
    assert host_a["result"] == "NOT CERTIFIED" and host_a["run_id"] == "replayed-run", host_a
    # registering the original again changes nothing
    again = stack.cli("register", uri, "--json", check=False)
    assert json.loads(again.stdout)["created"] is False
