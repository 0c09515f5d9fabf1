"""The embedded Airflow default: a local AIRFLOW_HOME (SQLite, LocalExecutor) running this project's DAGs.

* :func:`airflow_env` — the environment of such a home: ``dags_folder`` = the repository's ``dags/``,
  ``plugins_folder`` = ``plugins/``, no examples, SQLite, LocalExecutor, the execution API on the
  chosen loopback port, alerts/outcomes/runs under the home.
* :func:`init_home` — ``db migrate`` plus one pool per fleet host (sized to its cards), in a child
  process so this process never imports Airflow with another home's settings.
* :func:`smoke` — ``mi300x-cert airflow-smoke``: start the local S3 endpoint (unless
  ``MI300X_CERT_S3_ENDPOINT`` is set), run ``recertify_smoke-host`` in-process with ``dag.test`` (in a
  child process), verify the published bundle, and say where the run dir, report, Data Docs and the
  bundle are.
* :func:`start_standalone` — ``mi300x-cert airflow-standalone``: ``airflow standalone`` with the
  project's DAGs and plugins; returns a handle with the URL, the admin password file and ``stop()``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .errors import CertError

__all__ = ["airflow_env", "init_home", "smoke", "start_standalone", "Standalone", "free_port",
           "SMOKE_DAG_ID", "hot_card_overrides", "main"]

SMOKE_DAG_ID = "recertify_smoke-host"
RESULT_MARK = "MI300X_CERT_RESULT "
DEFAULT_HOME = Path(".airflow")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hot_card_overrides(card: int, extra_c: float = 40.0) -> dict:
    """Profile overrides that make one simulated card run ``extra_c`` °C hot (fails the thermal suite)."""
    return {"telemetry": {"simulated": {"hot_cards": {int(card): float(extra_c)}}}}


def airflow_env(home: str | Path, *, port: int | None = None, runs_dir: str | Path | None = None,
                base: dict | None = None) -> dict[str, str]:
    """Environment variables of a local Airflow home for this project (merged over ``base``/os.environ)."""
    home = Path(home).resolve()
    port = port or 8080
    env = dict(os.environ if base is None else base)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        "MI300X_CERT_STATE_DIR": env.get("MI300X_CERT_STATE_DIR") or str(home / "mi300x-cert"),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    env["MI300X_CERT_RUNS_DIR"] = str(Path(runs_dir).resolve()) if runs_dir else env.get("MI300X_CERT_RUNS_DIR") or str(
        Path(env["MI300X_CERT_STATE_DIR"]) / "runs")
    return env


def _s3_env(env: dict[str, str]) -> tuple[dict[str, str], Any]:
    """Point the env at an S3 endpoint: the configured one, else a fresh local one (returned to stop later)."""
    if env.get("MI300X_CERT_S3_ENDPOINT"):
        env.setdefault("MI300X_CERT_S3_BUCKET", "mi300x-cert")
        return env, None
    from . import s3local

    srv = s3local.start(port=0)
    env.update({
        "MI300X_CERT_S3_ENDPOINT": srv.endpoint,
        "MI300X_CERT_S3_BUCKET": env.get("MI300X_CERT_S3_BUCKET") or "mi300x-cert",
        "MI300X_CERT_S3_CREATE_BUCKET": "true",
        "AWS_ACCESS_KEY_ID": env.get("AWS_ACCESS_KEY_ID") or "local",
        "AWS_SECRET_ACCESS_KEY": env.get("AWS_SECRET_ACCESS_KEY") or "local",
    })
    return env, srv


def _child(args: list[str], env: dict[str, str], timeout: float, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mi300x_cert.airflow_local", *args]
    try:
        return subprocess.run(cmd, env=env, text=True, capture_output=capture, timeout=timeout, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as e:
        raise CertError(f"{' '.join(args)} did not finish in {timeout:.0f} s") from e


def _parse_result(proc: subprocess.CompletedProcess) -> dict:
    for line in reversed((proc.stdout or "").splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = ((proc.stdout or "")[-2000:] + "\n" + (proc.stderr or "")[-4000:]).strip()
    raise CertError(f"Airflow child process exited {proc.returncode} without a result:\n{tail}")


def init_home(home: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """``db migrate`` + pools for every fleet host. Returns ``{"pools": [...]}``."""
    env = env or airflow_env(home)
    Path(home).mkdir(parents=True, exist_ok=True)
    return _parse_result(_child(["_init"], env, timeout))


def _init_in_process() -> dict:
    from airflow.models.pool import Pool
    from airflow.utils import db

    from .airflow_dags import pool_specs

    db.initdb()
    pools = []
    for p in pool_specs():
        Pool.create_or_update_pool(p["name"], p["slots"], p["description"], include_deferred=False)
        pools.append(p)
    from .register import ensure_local_key_enrolled

    # this machine is its own control plane here: its key speaks for the smoke host (embedded registry only)
    ensure_local_key_enrolled(SMOKE_DAG_ID.removeprefix("recertify_"))
    return {"pools": pools}


def _dagtest_in_process(dag_id: str, conf: dict) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    init = _init_in_process()
    if dag_id != SMOKE_DAG_ID:
        from .register import ensure_local_key_enrolled

        ensure_local_key_enrolled(dag_id.removeprefix("recertify_"))
    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise CertError(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise CertError(f"DAG {dag_id!r} not found (DAGs: {sorted(bag.dag_ids)})")
    dr = dag.test(run_conf=conf)
    states: dict[str, str] = {}
    try:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == dr.run_id).all()
            for ti in tis:
                key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
                states[key] = str(ti.state.value if hasattr(ti.state, "value") else ti.state)
    except Exception as e:  # states are a convenience; the outcome record is the truth
        states["_error"] = str(e)
    from .airflow_dags import _safe, runs_root
    from .registry import open_registry
    from .validation.gx_runner import DATA_DOCS_REL

    host = dag_id.removeprefix("recertify_")
    reg = open_registry()
    record = reg.get_certification(host, _safe(dr.run_id))
    outcome = None
    if record is not None:
        run_dir = runs_root() / host / _safe(dr.run_id)
        report_file, docs_file = run_dir / "report" / "index.html", run_dir / DATA_DOCS_REL
        outcome = {**record, "run_dir": str(run_dir) if run_dir.is_dir() else None,
                   "report_file": str(report_file) if report_file.is_file() else None,
                   "data_docs_file": str(docs_file) if docs_file.is_file() else None}
    run_alerts = [a for a in reg.list_alerts(include_acknowledged=True, host=host) if a.get("run_id") == _safe(dr.run_id)]
    state = dr.state.value if hasattr(dr.state, "value") else str(dr.state)
    return {"dag_id": dag_id, "run_id": dr.run_id, "state": state, "task_states": states, "outcome": outcome,
            "alerts": run_alerts, "pools": init["pools"]}


def smoke(home: str | Path | None = None, out: str | Path | None = None, hot_card: int | None = None,
          conf: dict | None = None, dag_id: str = SMOKE_DAG_ID, timeout: float = 1800, verify: bool = True,
          echo: bool = True) -> dict:
    """Run the smoke recertification DAG with ``dag.test`` in a fresh local Airflow home.

    Returns ``{"dag_id", "run_id", "state", "task_states", "outcome", "alerts", "run_dir", "report",
    "data_docs", "bundle_uri", "s3_endpoint", "verified"}``."""
    home = Path(home or DEFAULT_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(home, runs_dir=out)
    env, srv = _s3_env(env)
    conf = dict(conf or {})
    if hot_card is not None:
        from .config import _deep_merge

        conf["overrides"] = _deep_merge(conf.get("overrides") or {}, hot_card_overrides(hot_card))
    try:
        proc = _child(["_dagtest", "--dag-id", dag_id, "--conf", json.dumps(conf)], env, timeout)
        if echo and proc.returncode != 0:
            sys.stderr.write((proc.stderr or "")[-4000:])
        result = _parse_result(proc)
        outcome = result.get("outcome") or {}
        result.update({k: outcome.get(k) for k in ("run_dir", "bundle_uri", "certified")})
        result.update(report=outcome.get("report_file"), data_docs=outcome.get("data_docs_file"),
                      report_uri=outcome.get("report"), data_docs_uri=outcome.get("data_docs"))
        result["s3_endpoint"] = env["MI300X_CERT_S3_ENDPOINT"]
        result["s3_embedded"] = srv is not None
        result["airflow_home"] = str(home)
        result["verified"] = None
        if verify and result.get("bundle_uri"):
            from . import pipeline

            store = {"endpoint": env["MI300X_CERT_S3_ENDPOINT"], "bucket": env["MI300X_CERT_S3_BUCKET"],
                     "access_key": env.get("AWS_ACCESS_KEY_ID") or "local",
                     "secret_key": env.get("AWS_SECRET_ACCESS_KEY") or "local"}
            # trust as the home's registry (this machine's control plane) sees it, not the user's own state
            saved = {k: os.environ.get(k) for k in ("MI300X_CERT_STATE_DIR", "MI300X_CERT_REGISTRY_URL")}
            os.environ["MI300X_CERT_STATE_DIR"] = env["MI300X_CERT_STATE_DIR"]
            if env.get("MI300X_CERT_REGISTRY_URL"):
                os.environ["MI300X_CERT_REGISTRY_URL"] = env["MI300X_CERT_REGISTRY_URL"]
            try:
                result["verified"] = pipeline.verify(result["bundle_uri"], store=store)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return result
    finally:
        if srv is not None:
            srv.stop()


@dataclass
class Standalone:
    """A running ``airflow standalone`` (its own process group)."""

    home: Path
    port: int
    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    s3: Any = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def password(self, user: str = "admin") -> str:
        return json.loads(self.password_file.read_text())[user]

    def token(self, user: str = "admin") -> str:
        body = json.dumps({"username": user, "password": self.password(user)}).encode()
        req = urllib.request.Request(f"{self.url}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def wait_ready(self, timeout: float = 300, dag_id: str | None = SMOKE_DAG_ID) -> None:
        """Until the API answers, the password file exists and ``dag_id`` is parsed."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CertError(f"airflow standalone exited {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}")
            try:
                if self.password_file.exists():
                    tok = self.token()
                    if dag_id is None:
                        return
                    req = urllib.request.Request(f"{self.url}/api/v2/dags/{dag_id}",
                                                 headers={"Authorization": f"Bearer {tok}"})
                    with urllib.request.urlopen(req, timeout=10) as r:
                        if r.status == 200:
                            return
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                last = str(e)
            time.sleep(2)
        raise CertError(f"airflow standalone not ready after {timeout:.0f} s ({last}); log: {self.log_path}\n{self.log_tail()}")

    def api(self, method: str, path: str, body: Any = None, token: str | None = "auto",
            timeout: float = 60) -> tuple[int, Any]:
        """One REST call. Returns ``(status, parsed JSON or text)``; HTTP errors are returned, not raised."""
        headers = {"Content-Type": "application/json"}
        if token == "auto":
            token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def unpause(self, dag_id: str) -> None:
        status, body = self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        if status != 200:
            raise CertError(f"unpausing {dag_id} failed: {status} {body}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> tuple[int, Any]:
        return self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        """Poll until the run is success or failed. Returns the run JSON."""
        from urllib.parse import quote

        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            status, body = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
            if status == 200 and body.get("state") in ("success", "failed"):
                return body
            if self.proc.poll() is not None:
                raise CertError(f"airflow standalone exited while waiting for {dag_id}/{run_id}\n{self.log_tail()}")
            time.sleep(3)
        raise CertError(f"{dag_id}/{run_id} not finished after {timeout:.0f} s (last: {body})")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        from urllib.parse import quote

        status, body = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances?limit=200")
        if status != 200:
            raise CertError(f"task instances of {dag_id}/{run_id}: {status} {body}")
        out = {}
        for ti in body.get("task_instances", []):
            key = ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
            out[key] = ti.get("state")
        return out

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:  # SIGTERM, not SIGINT: a parent started in the background may pass SIGINT on as ignored
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        # stray task processes of the group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None


def start_standalone(home: str | Path, port: int | None = None, *, runs_dir: str | Path | None = None,
                     extra_env: dict[str, str] | None = None, init_timeout: float = 300) -> Standalone:
    """Start ``airflow standalone`` for this project on a loopback port (``None``: a free one).

    The database is migrated and the fleet's pools created first. The S3 endpoint is
    ``$MI300X_CERT_S3_ENDPOINT`` (or ``extra_env``'s) when set, else a local one started here."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = airflow_env(home, port=port, runs_dir=runs_dir)
    env.update(extra_env or {})
    env, srv = _s3_env(env)
    try:
        init_home(home, env, timeout=init_timeout)
    except BaseException:
        if srv is not None:
            srv.stop()
        raise
    log_path = home / "standalone.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, cwd=str(home),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Standalone(home=home, port=port, proc=proc, env=env, log_path=log_path, s3=srv, _log=log)


def _print_smoke(result: dict) -> None:
    o = result.get("outcome") or {}
    print(f"DAG run      : {result['dag_id']} / {result['run_id']} → {result['state']}")
    print(f"certified    : {o.get('certified')}" + (f" ({'; '.join(o.get('reasons') or [])})" if o.get("reasons") else ""))
    print(f"run dir      : {o.get('run_dir')}")
    print(f"report       : {o.get('report_file')}  (published: {o.get('report')})")
    print(f"Data Docs    : {o.get('data_docs_file')}")
    print(f"registry     : {o.get('result')} recorded for {o.get('host')} run {o.get('run_id')} "
          f"(mi300x-cert fleet / history / alerts)")
    print(f"bundle (S3)  : {o.get('bundle_uri')}  (endpoint {result.get('s3_endpoint')})")
    if result.get("verified"):
        v = result["verified"]
        print(f"verified     : signature and {v.get('artifacts', '?')} artifacts, read back from S3; signer "
              + (f"trusted ({v.get('trust_source')})" if v.get("trusted") else f"NOT trusted: {v.get('trust_reason')}"))
    local = Path(o["run_dir"]) / "bundle" if o.get("run_dir") else None
    if local is not None and local.is_dir():
        print(f"bundle (local): {local}  (check it any time: mi300x-cert verify {local})")
    if result.get("s3_embedded"):
        print("note         : the embedded S3 endpoint lived for this command only; to keep published bundles, "
              "start one (python -m mi300x_cert.s3local --port 9000) or point MI300X_CERT_S3_ENDPOINT at your store")
    for a in result.get("alerts") or []:
        print(f"alert        : {a['id']} {a.get('kind')} suite={a['suite']} ({len(a.get('failures') or [])} failures)")
    print(f"airflow home : {result.get('airflow_home')}")
    failed = {k: v for k, v in (result.get("task_states") or {}).items() if v not in ("success", "skipped")}
    if failed:
        print(f"tasks not successful: {failed}")


def cli_smoke(home: str | None, out: str | None, hot_card: int | None, as_json: bool = False) -> int:
    result = smoke(home, out, hot_card)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_smoke(result)
    if (result.get("outcome") or {}).get("certified"):
        return 0
    return 1 if result.get("outcome") else 2


def cli_standalone(home: str | None, port: int | None) -> int:
    # an operator at the UI reads task logs: INFO, so `report` and `register` show what they wrote
    # (the tests' and the smoke's Airflow stay at WARNING: 2 cores)
    level = os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
    sa = start_standalone(home or DEFAULT_HOME, port or 8080, extra_env={"AIRFLOW__LOGGING__LOGGING_LEVEL": level})
    try:
        print(f"starting Airflow at {sa.url} (log: {sa.log_path}) …", flush=True)
        sa.wait_ready(timeout=600, dag_id=None)
        print(f"Airflow UI   : {sa.url}")
        print(f"user         : admin, password in {sa.password_file}")
        print(f"S3 endpoint  : {sa.env['MI300X_CERT_S3_ENDPOINT']} (bucket {sa.env['MI300X_CERT_S3_BUCKET']})")
        print(f"console      : {sa.url}/mi300x-cert/  (Ctrl-C stops everything)", flush=True)
        while sa.proc.poll() is None:
            time.sleep(1)
        return sa.proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        sa.stop()


def main(argv: list[str] | None = None) -> int:
    """Child-process entry points (``_init``, ``_dagtest``); run with the local home's environment."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mi300x_cert.airflow_local")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("_init")
    t = sub.add_parser("_dagtest")
    t.add_argument("--dag-id", default=SMOKE_DAG_ID)
    t.add_argument("--conf", default="{}")
    args = ap.parse_args(argv)
    if args.cmd == "_init":
        result = _init_in_process()
    else:
        result = _dagtest_in_process(args.dag_id, json.loads(args.conf))
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
