"""Builds the Airflow DAGs from ``include/fleet.yaml``: the one place that decides queues, pools and executors.

* ``recertify_<host>`` — one per fleet server, on the server's cron schedule. Task chain::

    preflight → one task per registered experiment, in registry order (an experiment whose
      ``fanout`` is ``mapped`` gets plan_<x> → run_<x>_case (mapped over small case dicts) →
      finalize_<x>) → finish_run → validate_<suite> for every suite → report → sign → publish → register

  GPU tasks run on queue ``gpu-<host>`` in pool ``gpu-<host>`` (one slot per card; a GPU task takes
  every slot, so measurements on one host never overlap) with the executor named by
  ``$MI300X_CERT_GPU_EXECUTOR`` (unset: the default executor). A failed validation fails its task
  with a readable summary; report/sign/publish still run (``all_done``) so the evidence is published.
  ``register`` runs on the **control plane** (default queue and executor, never ``gpu-<host>``): it
  fetches the published bundle from S3, verifies it against the key enrolled for the host, decides,
  writes the registry (certification, per-serial rows, alerts) and sends the notifications
  (:func:`mi300x_cert.register.conclude`); it fails the run when the host is NOT certified. Nothing on
  the control plane reads a GPU host's disk: XCom carries only the bundle URI, the run state and the
  suite verdicts (used only when no bundle was published).

* ``fleet_audit`` — daily on the control plane: alerts on fleet hosts whose certificate expired or
  never existed (:meth:`mi300x_cert.registry.Registry.audit_expiry`).

* ``manual_certify`` and ``manual_<experiment>`` — schedule None, a typed trigger form (Params). The
  first task cross-validates the form against the host's profile (``config.load_profile(overrides=…)``),
  then the run is handed to ``recertify_<host>`` (so it runs on that host's queue and pool) and
  awaited.

Every task body is one call into :mod:`mi300x_cert.pipeline` (or :mod:`mi300x_cert.alerts`).
This module imports Airflow's SDK, PyYAML and pydantic only; torch, Great Expectations and boto3
are imported inside the pipeline functions at run time.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, TaskGroup, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from .errors import ProfileError
from .fleet import Fleet, Server, load_fleet

__all__ = [
    "EXPERIMENTS",
    "SUITES",
    "SUITE_EXPERIMENTS",
    "MANUAL_EXPERIMENTS",
    "GPU_EXECUTOR_ENV",
    "gpu_task_kwargs",
    "pool_specs",
    "runs_root",
    "conf_to_request",
    "check_request",
    "manual_params",
    "build_recertify_dag",
    "build_recertify_dags",
    "RECERTIFY_SHARDS",
    "recertify_shard",
    "recertify_shard_file",
    "recertify_shard_of_file",
    "build_manual_dag",
    "build_fleet_audit_dag",
    "register_body",
    "safe_run_id",
    "host_dag_problem",
]

log = logging.getLogger(__name__)

from .experiments import EXPERIMENTS as _REGISTERED  # noqa: E402  (no torch: plugin modules are light)
from .experiments import all_experiments, get_experiment, suite_names, suite_owner  # noqa: E402

# Everything below iterates the experiment registry (mi300x_cert.experiments): adding an experiment
# adds its task, its suites' validation tasks, its manual DAG and its trigger-form choices.
EXPERIMENTS = list(_REGISTERED)
SUITES = suite_names()
# A suite is evaluated when its experiment ran (network: whenever anything ran).
SUITE_EXPERIMENTS: dict[str, list[str]] = {
    s: ([suite_owner(s).name] if suite_owner(s) is not None else list(EXPERIMENTS)) for s in SUITES  # type: ignore[union-attr]
}
# manual DAG name → experiments it runs
MANUAL_EXPERIMENTS: dict[str, list[str]] = {"certify": list(EXPERIMENTS),
                                            **{e.spec_attr: [e.name] for e in all_experiments()}}
GPU_EXECUTOR_ENV = "MI300X_CERT_GPU_EXECUTOR"
RUNS_DIR_ENV = "MI300X_CERT_RUNS_DIR"
BATCH_CONFIG_CHOICES = ["1x512", "2x256", "4x128", "8x64", "16x32", "32x16", "64x8", "128x4",
                        "1x1", "1x2", "2x1", "2x2", "4x1"]
PROCESS_COUNT_CHOICES = [1, 2, 4, 8, 16]
DTYPES = ["float32", "float16", "bfloat16"]
def _threshold_sets() -> list[str]:
    """The shipped thresholds sets (``expectations/params/*.yaml``), read once at parse time."""
    from .config import REPO_ROOT

    d = REPO_ROOT / "expectations" / "params"
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else ["smoke"]


THRESHOLD_SETS = _threshold_sets()
PROFILE_DEFAULT = "profile"
CUSTOM = "custom"
# only the characters a card list may hold: the schema's error quotes the pattern, so it stays readable;
# the list itself (syntax, cards of the chosen host) is checked by check_conf with a plain message
CUSTOM_CARDS_PATTERN = r"^[0-9 ,\[\]-]*$"
MODEL_SOURCE_PATTERN = r"^(|synthetic:[A-Za-z0-9._-]+|[^:\s][^:]*)$"
BATCH_CONFIG_PATTERN = r"^\d+x\d+$"

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "gpu-fleet",
    "retries": 1,
    "retry_delay": _dt.timedelta(minutes=1),
}


# ---- queue / pool / executor: the one place ------------------------------------------------------
def gpu_task_kwargs(server: Server) -> dict[str, Any]:
    """Operator arguments of a task that uses the host's GPUs: its queue, its pool (all slots: a
    measurement owns the host) and the executor from ``$MI300X_CERT_GPU_EXECUTOR`` if set."""
    kw: dict[str, Any] = {"queue": server.queue, "pool": server.pool, "pool_slots": server.cards}
    executor = os.environ.get(GPU_EXECUTOR_ENV) or None
    if executor:
        kw["executor"] = executor
    return kw


def host_task_kwargs(server: Server) -> dict[str, Any]:
    """Light tasks that still read the host's run directory (validation, report, sign, publish):
    same queue and executor, no pool slots."""
    kw: dict[str, Any] = {"queue": server.queue}
    executor = os.environ.get(GPU_EXECUTOR_ENV) or None
    if executor:
        kw["executor"] = executor
    return kw


def pool_specs(fleet: Fleet | None = None) -> list[dict[str, Any]]:
    """``[{"name", "slots", "description"}]`` — one pool per fleet host, sized to its card count."""
    fleet = fleet or load_fleet()
    return [{"name": s.pool, "slots": s.cards, "description": f"GPU cards of {s.name} ({s.cards})"}
            for s in fleet.servers]


def runs_root() -> Path:
    if os.environ.get(RUNS_DIR_ENV):
        return Path(os.environ[RUNS_DIR_ENV])
    from .alerts import state_dir

    return state_dir() / "runs"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def safe_run_id(airflow_run_id: str) -> str:
    """The run id the registry and the run directory use for an Airflow run id (the console's extra
    links resolve an Airflow run to its certification through this)."""
    return _safe(airflow_run_id)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- task bodies (plain functions; each is one pipeline call plus bookkeeping) -------------------
def _experiment_enabled(run_dir: str, experiment: str) -> bool:
    from .rundir import RunDir

    prof = RunDir(run_dir).load_profile()
    return bool(getattr(prof.experiments, experiment.replace("-", "_")).enabled)


def _run_overrides(params: dict) -> dict:
    """Profile overrides of one recertification run: the conf's ``overrides`` plus the experiment selection."""
    overrides = dict(params.get("overrides") or {})
    selected = params.get("experiments") or list(EXPERIMENTS)
    unknown = [e for e in selected if e not in EXPERIMENTS]
    if unknown:
        raise AirflowFailException(f"conf field 'experiments': unknown experiment(s) {unknown} (known: {EXPERIMENTS})")
    enable = {e: {"enabled": e in selected} for e in EXPERIMENTS}
    return _deep_merge({"experiments": enable}, overrides)


def _chosen_experiments(params: dict | None) -> list[str] | None:
    """The experiments the trigger chose for a recertification run (its conf: ``experiments`` and any
    ``overrides`` that enable or disable one); None when it cannot be told (the fleet profile's
    suites are then all required)."""
    if params is None:
        return None
    try:
        sections = _run_overrides(dict(params)).get("experiments") or {}
    except Exception:  # a conf preflight refused: nothing ran; require everything
        return None
    return [e for e in EXPERIMENTS if isinstance(sections.get(e), dict) and sections[e].get("enabled", True)]


def preflight_body(server: Server, params: dict, run_id: str) -> str:
    """Validate profile + overrides (cards, model sources), create the run directory, write the inventory."""
    from . import pipeline
    from .errors import CertError

    out = runs_root() / server.name / _safe(run_id)
    if (out / "run.json").is_file():  # a retried preflight: the run directory already exists
        return str(out)
    # the run (and so its signed statement and S3 location) names the host as the fleet names it
    overrides = _deep_merge(_run_overrides(params), {"host": {"name": server.name}})
    try:
        return pipeline.prepare_run(server.profile, out, overrides=overrides, run_id=_safe(run_id))
    except CertError as e:  # bad input does not get better on retry
        raise AirflowFailException(f"preflight on {server.name}: {e}") from e


def validation_body(server: Server, suite: str, run_dir: str, dag_id: str, run_id: str, context: dict) -> dict:
    """Run one GX suite; a failed expectation fails the task with a readable summary. The alert is
    raised by ``register`` on the control plane, from the signed verdicts (a GPU host has no access
    to the registry)."""
    from . import alerts, pipeline

    ran = [e for e in SUITE_EXPERIMENTS[suite] if _experiment_enabled(run_dir, e)]
    verdict = pipeline.validate(run_dir, suite)  # a suite of a disabled experiment records itself as skipped
    if not ran:
        raise AirflowSkipException(f"suite {suite}: none of its experiments ({SUITE_EXPERIMENTS[suite]}) ran")
    slim = {k: verdict.get(k) for k in ("suite", "success", "status", "evaluated", "declared")}
    slim["failures"] = list(verdict.get("failures") or [])[:200]
    context["ti"].xcom_push(key="verdict", value=slim)
    if verdict.get("success"):
        return slim
    summary = alerts.summary_text(suite, list(verdict.get("failures") or []), host=server.name)
    raise AirflowFailException(f"{summary}\n(the control plane's register task raises the alert)")


def register_body(server: Server, dag_id: str, run_id: str, bundle_uri: str | None, state: str | None,
                  verdicts: dict[str, dict | None], enabled: list[str] | None, context: dict | None = None) -> dict:
    """The control-plane end of a run: :func:`mi300x_cert.register.conclude` on the published bundle
    (or, without one, on the run state and the suite verdicts the GPU tasks reported). The suites of
    the experiments the trigger chose, as far as the host's fleet profile enables them, are required
    whatever the GPU host reports as enabled."""
    from .register import conclude

    if enabled is not None:  # a suite none of whose experiments ran is not required
        verdicts = {s: v for s, v in verdicts.items()
                    if v is not None or any(e in enabled for e in SUITE_EXPERIMENTS[s])}
    outcome = conclude(bundle=bundle_uri, host=server.name, run_id=_safe(run_id),
                       state=state if bundle_uri is None else None, verdicts=verdicts if bundle_uri is None else None,
                       error=None if state == "complete" else "see the run's finish_run task",
                       dag_id=dag_id, source="register", context=context,
                       experiments=_chosen_experiments((context or {}).get("params")))
    log.info("registered %s run %s: %s (%s); bundle %s; report %s; data docs %s; alerts %s",
             server.name, _safe(run_id), outcome["result"], "; ".join(outcome["reasons"]) or "all conditions met",
             outcome.get("bundle_uri"), outcome.get("report"), outcome.get("data_docs"),
             [a.get("id") for a in outcome.get("alerts") or []])
    log.info("console: /mi300x-cert/run/%s/%s (report, Data Docs and bundle files checked against the registered "
             "digests; also the extra links of this task)", server.name, _safe(run_id))
    return outcome


# ---- the recertification DAG --------------------------------------------------------------------
RECERTIFY_DOC = """\
### Recertify `{name}`

Measures the host with profile **{profile}** (thresholds **{sku}**), validates the results with the
Great Expectations suites, builds the report, signs the bundle and publishes it to S3.

* queue `{queue}`, pool `{pool}` ({cards} slots; every GPU task takes all of them)
* schedule: `{schedule}` (UTC)
* a failed suite fails its `validate_<suite>` task with the failed expectations, writes an alert
  (console: *Certification* in the nav bar; CLI: `mi300x-cert alerts`) and notifies {recipients};
  report, sign and publish still run; `register` (on the control plane) verifies the published
  bundle against the key enrolled for this host, records the certification and alerts, and marks
  the run **NOT certified** when any condition fails.

Trigger with conf `{{"overrides": {{...profile overrides...}}, "experiments": [...]}}` to change a run
(e.g. `{{"overrides": {{"telemetry": {{"simulated": {{"hot_cards": {{"3": 40}}}}}}}}}}`).
"""


class _SharedSchema(dict):
    """A Param's JSON schema that every recertification DAG and task shares: read-only, so never copied.

    Airflow deep-copies a DAG's Params into every operator (once per class of its hierarchy: four times
    for a ``@task``); only a Param's value may change per task, never its schema.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for k, v in dict.items(self):  # nested schemas are shared too, so read-only as well
            if isinstance(v, dict) and not isinstance(v, _SharedSchema):
                dict.__setitem__(self, k, _SharedSchema(v))

    def __deepcopy__(self, memo: dict) -> "_SharedSchema":
        return self

    def __copy__(self) -> "_SharedSchema":
        return self

    def __reduce__(self) -> tuple:
        return (_SharedSchema, (dict(self),))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a recertification Param schema is shared by every DAG and is read-only")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


# Airflow validates a Param with jsonschema.validate(), which first checks the schema itself against
# its draft's meta-schema; it does so on every DAG and twice per task while serializing it (about 70
# checks per recertification DAG). Against the default draft (2020-12, resolved through $dynamicRef)
# that check costs 3x more CPU than against draft 7, in which the keywords used here mean the same.
# The schemas are built once (see _SharedSchema).
PARAM_SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"
_EXPERIMENTS_SCHEMA = _SharedSchema({
    "$schema": PARAM_SCHEMA_DRAFT, "type": "array", "title": "Experiments",
    "items": {"type": "string", "enum": list(EXPERIMENTS)}, "examples": list(EXPERIMENTS),
    "minItems": 1, "uniqueItems": True,
})
_OVERRIDES_SCHEMA = _SharedSchema({"$schema": PARAM_SCHEMA_DRAFT, "type": "object", "title": "Profile overrides"})


def _recertify_params() -> dict[str, Param]:
    """The run conf form of ``recertify_<host>``: fresh Params (their values are per DAG) on shared schemas."""
    return {
        "experiments": Param(list(EXPERIMENTS), description="experiments to run (default: all)",
                             schema=_EXPERIMENTS_SCHEMA),
        "overrides": Param({}, description="nested profile fields, merged over the host profile (advanced)",
                           schema=_OVERRIDES_SCHEMA),
    }


def build_recertify_dag(server: Server, *, schedule: Any = "fleet", dag_id: str | None = None) -> DAG:
    """The recertification DAG of one fleet server."""
    from . import alerts as _alerts  # noqa: F401  (light; fail at parse if the package is broken)

    dag_id = dag_id or server.dag_id
    if schedule == "fleet":
        schedule = server.schedule
    if isinstance(schedule, str):
        from airflow.sdk import CronTriggerTimetable

        schedule = CronTriggerTimetable(schedule, timezone="UTC")
    gpu = gpu_task_kwargs(server)
    light = host_task_kwargs(server)
    recipients = ", ".join(server.alerts.email) or "nobody (record only)"

    with DAG(
        dag_id=dag_id,
        schedule=schedule,
        catchup=False,
        max_active_runs=1,
        description=(f"Recertify {server.name} ({server.sku}, {server.cards} card{'s' if server.cards != 1 else ''}): "
                     "measure, validate, report, sign, publish to S3, register"),
        tags=["mi300x-cert", "recertify", f"host:{server.name}", f"sku:{server.sku}", *server.tags],
        default_args=dict(DEFAULT_ARGS),
        doc_md=RECERTIFY_DOC.format(name=server.name, profile=server.profile, sku=server.sku, queue=server.queue,
                                    pool=server.pool, cards=server.cards, schedule=server.schedule or "manual only",
                                    recipients=recipients),
        params=_recertify_params(),
        dagrun_timeout=_dt.timedelta(hours=12),
    ) as dag:

        @task(task_id="preflight", **gpu)
        def preflight() -> str:
            ctx = get_current_context()
            run_dir = preflight_body(server, dict(ctx["params"]), ctx["run_id"])
            ctx["ti"].xcom_push(key="enabled", value=[e for e in EXPERIMENTS if _experiment_enabled(run_dir, e)])
            return run_dir

        def make_serial(name: str, task_id: str):
            @task(task_id=task_id, **gpu)
            def run_whole(run_dir: str, _after: Any = None) -> dict:
                from . import pipeline

                if not _experiment_enabled(run_dir, name):
                    return {"experiment": name, "state": "disabled"}
                return pipeline.run_experiment(run_dir, name)

            return run_whole

        def make_mapped(name: str, tid: str):
            @task(task_id=f"plan_{tid}", **light)
            def plan(run_dir: str, _after: Any = None) -> list[dict]:
                from . import pipeline

                if not _experiment_enabled(run_dir, name):
                    return []
                return pipeline.plan_cases(run_dir, name)

            @task(task_id=f"run_{tid}_case", map_index_template="{{ case_label }}", **gpu)
            def run_case(run_dir: str, case: dict) -> dict:
                from . import pipeline

                ctx = get_current_context()
                ctx["case_label"] = str(case.get("case_id") or case)  # type: ignore[index]
                status = pipeline.run_case(run_dir, name, case)
                if str(status.get("status", "ok")) not in ("ok", "skipped", "done"):
                    raise RuntimeError(f"case {case.get('case_id')}: {status.get('reason') or status}")
                return status

            @task(task_id=f"finalize_{tid}", trigger_rule="none_failed", **light)
            def finalize(run_dir: str) -> dict:
                from . import pipeline

                if not _experiment_enabled(run_dir, name):
                    return {"experiment": name, "state": "disabled"}
                return pipeline.finalize_experiment(run_dir, name)

            return plan, run_case, finalize

        @task(task_id="finish_run", trigger_rule="all_done", retries=0, **light)
        def finish_run() -> str:
            from . import pipeline

            run_dir = _pull("preflight")
            if not run_dir:
                raise AirflowFailException("no run directory: preflight did not succeed")
            state = pipeline.finish_run(run_dir)
            get_current_context()["ti"].xcom_push(key="state", value=state)
            if state != "complete":
                from .rundir import RunDir

                raise AirflowFailException(f"run {run_dir} is {state}: {RunDir(run_dir).meta.get('error')}")
            return state

        def make_validate(suite: str):
            @task(task_id=f"validate_{suite}", **light)
            def validate_suite(run_dir: str) -> dict:
                ctx = get_current_context()
                return validation_body(server, suite, run_dir, dag_id, ctx["run_id"], ctx)  # type: ignore[arg-type]

            return validate_suite

        @task(task_id="report", trigger_rule="all_done", **light)
        def report() -> str:
            from . import pipeline

            run_dir = _pull("preflight")
            if not run_dir:
                raise AirflowSkipException("no run directory: nothing to report")
            path = pipeline.report(run_dir)
            from .validation.gx_runner import DATA_DOCS_REL

            docs = Path(run_dir) / DATA_DOCS_REL
            log.info("report written: %s (published inside the bundle as artifacts/report/index.html)", path)
            log.info("Data Docs: %s (published as artifacts/%s)", docs if docs.is_file() else "none (no suite ran)",
                     DATA_DOCS_REL)
            return path

        @task(task_id="sign", trigger_rule="all_done", **light)
        def sign() -> str:
            from . import pipeline
            from .rundir import RunDir

            run_dir = _pull("preflight")
            if not run_dir or RunDir(run_dir).state != "complete":
                raise AirflowSkipException("measurements incomplete: a certificate is only signed over complete runs")
            bundle = pipeline.sign(run_dir)
            log.info("signed bundle: %s", bundle)
            return bundle

        @task(task_id="publish", trigger_rule="all_done", **light)
        def publish() -> str:
            from . import pipeline

            bundle = _pull("sign")
            if not bundle:
                raise AirflowSkipException("no signed bundle to publish")
            uri = pipeline.publish(bundle)
            log.info("published: %s", uri)
            return uri

        @task(task_id="register", trigger_rule="all_done", retries=2,
              retry_delay=_dt.timedelta(seconds=30))
        def register() -> dict:
            # the control plane: default queue and executor (no gpu-<host> kwargs), registry access
            ctx = get_current_context()
            verdicts = {s: _pull(f"validate_{s}", key="verdict") for s in SUITES}
            outcome = register_body(server, dag_id, ctx["run_id"], _pull("publish"), _pull("finish_run", key="state"),
                                    verdicts, _pull("preflight", key="enabled"), context=ctx)
            if not outcome["certified"]:
                alerts_ = ", ".join(a.get("id", "?") for a in outcome.get("alerts") or [])
                raise AirflowFailException(f"{server.name} NOT certified: {'; '.join(outcome['reasons'])}"
                                           + (f" (alerts {alerts_})" if alerts_ else ""))
            return {k: outcome.get(k) for k in ("host", "run_id", "certified", "result", "reasons", "bundle_uri",
                                                "report", "data_docs")}

        run_dir = preflight()
        last: Any = None
        for exp in all_experiments():  # one task (or plan → mapped cases → finalize) per experiment
            if exp.fanout == "mapped":
                plan, run_case, finalize = make_mapped(exp.name, exp.dag_task_id)
                mapped = run_case.partial(run_dir=run_dir).expand(case=plan(run_dir, last))
                fin = finalize(run_dir)
                mapped >> fin
                last = fin
            else:
                t = make_serial(exp.name, exp.dag_task_id)(run_dir, last)
                last = t
        done = finish_run()
        last >> done
        with TaskGroup("validation", tooltip="one Great Expectations suite per task") as validation:
            vals = [make_validate(s)(run_dir) for s in SUITES]
        done >> validation
        rep, sg, pub, rec = report(), sign(), publish(), register()
        for v in vals:
            v >> rep
        done >> rep >> sg >> pub >> rec
    return dag


def _pull(task_id: str, key: str = "return_value") -> Any:
    ti = get_current_context()["ti"]
    for tid in (task_id, f"validation.{task_id}"):
        try:
            value = ti.xcom_pull(task_ids=tid, key=key)
        except Exception:  # no value: the task failed or was skipped
            value = None
        if value is not None:
            return value
    return None


FLEET_AUDIT_DOC = """\
### Fleet audit

Daily on the control plane: every host of `include/fleet.yaml` whose last certificate expired
(`valid_days` after it finished) or that was never certified gets an alert in the registry (one open
alert per host and certificate, notified once). Read them with `mi300x-cert alerts` or on the
*Certification* page; `mi300x-cert fleet` shows every host's last result, age and expiry.
"""


def fleet_audit_body(fleet: Fleet | None = None, context: dict | None = None) -> dict:
    """Expired / never-certified hosts → alerts (idempotent), notifications for new ones."""
    from .register import notify_alerts
    from .registry import open_registry

    fleet = fleet or load_fleet()
    hosts = fleet.registry_hosts()
    reg = open_registry()
    before = {a["id"] for a in reg.list_alerts(include_acknowledged=True)}
    raised = reg.audit_expiry(hosts)
    new = [a for a in raised if a.get("id") not in before]
    by_host = {s.name: s for s in fleet.servers}
    for a in new:
        notify_alerts([a], by_host.get(a.get("host")), context)
    log.info("fleet audit: %d host(s) with an expired or missing certificate, %d new alert(s)", len(raised), len(new))
    return {"hosts": len(hosts), "alerts": [a.get("id") for a in raised], "new": [a.get("id") for a in new]}


def build_fleet_audit_dag(fleet: Fleet | None = None, schedule: str = "30 6 * * *") -> DAG:
    """``fleet_audit``: daily expiry audit of every fleet host, on the control plane."""
    from airflow.sdk import CronTriggerTimetable

    fleet = fleet or load_fleet()
    with DAG(
        dag_id="fleet_audit",
        description="Daily: alert on fleet hosts whose certificate expired or never existed",
        schedule=CronTriggerTimetable(schedule, timezone="UTC"),
        catchup=False,
        max_active_runs=1,
        tags=["mi300x-cert", "fleet"],
        default_args=dict(DEFAULT_ARGS),
        doc_md=FLEET_AUDIT_DOC,
    ) as dag:

        @task(task_id="audit_expiry")
        def audit_expiry() -> dict:
            return fleet_audit_body(fleet, get_current_context())

        audit_expiry()
    return dag


# ---- the recertification DAG files: the fleet in shards ------------------------------------------
# dags/recertify.py is shard 0, dags/recertify_1.py … recertify_<RECERTIFY_SHARDS-1>.py the others. One
# file of a 2,000-host fleet took longer than Airflow's import timeout (30 s) on 2 cores; in 16 shards
# (≈125 hosts each) every file parses in a fraction of it, with room for a busy machine (the timeouts
# are wall-clock), and the dag-processor parses them in parallel (docs/performance.md, "DAG parse
# scale"). Changing the count means adding or removing files: tests/dags checks both agree.
RECERTIFY_SHARDS = 16
RECERTIFY_FILE_STEM = "recertify"


def recertify_shard(host: str, shards: int = RECERTIFY_SHARDS) -> int:
    """The shard (DAG file) of a host: a stable hash of its name, so adding or removing hosts never
    moves another host's DAG to a different file."""
    return zlib.crc32(host.encode()) % shards


def recertify_shard_file(shard: int) -> str:
    """File name of a shard in ``dags/``."""
    return f"{RECERTIFY_FILE_STEM}.py" if shard == 0 else f"{RECERTIFY_FILE_STEM}_{shard}.py"


def recertify_shard_of_file(path: str | Path) -> int:
    """Shard number of a recertification DAG file from its name (``recertify.py`` → 0, ``recertify_3.py`` → 3)."""
    stem = Path(path).stem
    if stem == RECERTIFY_FILE_STEM:
        return 0
    head, _, num = stem.rpartition("_")
    if head != RECERTIFY_FILE_STEM or not num.isdigit() or not 0 < int(num) < RECERTIFY_SHARDS:
        raise ValueError(f"{Path(path).name}: not a recertification DAG file (recertify.py or recertify_<k>.py "
                         f"with 1 <= k < {RECERTIFY_SHARDS})")
    return int(num)


def build_recertify_dags(fleet: Fleet | None = None, *, shard: int | None = None,
                         dag_file: str | Path | None = None) -> dict[str, DAG]:
    """``recertify_<host>`` of every fleet host, or of the hosts of one shard.

    ``dag_file``: the calling DAG file; its name gives the shard. When it is shard 0 (``recertify.py``),
    the other shard files must lie beside it — a missing one would silently drop its hosts' DAGs, so
    that raises, naming the files and hosts.
    """
    fleet = fleet or load_fleet()
    if dag_file is not None:
        shard = recertify_shard_of_file(dag_file)
    if shard is None:
        servers = fleet.servers
    else:
        if not 0 <= shard < RECERTIFY_SHARDS:
            raise ValueError(f"shard {shard} out of range 0..{RECERTIFY_SHARDS - 1}")
        by_shard: dict[int, list[Server]] = {}
        for s in fleet.servers:
            by_shard.setdefault(recertify_shard(s.name), []).append(s)
        if dag_file is not None and shard == 0:
            folder = Path(dag_file).parent
            missing = {recertify_shard_file(k): [s.name for s in by_shard[k]] for k in sorted(by_shard)
                       if k and not (folder / recertify_shard_file(k)).is_file()}
            if missing:
                raise ProfileError(
                    f"{folder}: recertification DAG file(s) missing beside {recertify_shard_file(0)}: "
                    + "; ".join(f"{f} (hosts {', '.join(h[:5])}{' …' if len(h) > 5 else ''})" for f, h in missing.items())
                    + f" — deploy all {RECERTIFY_SHARDS} recertify*.py files together")
        servers = by_shard.get(shard, [])
    return {s.dag_id: build_recertify_dag(s) for s in servers}


# ---- manual DAGs with trigger forms -------------------------------------------------------------
def _card_set_choices(fleet: Fleet) -> tuple[list[str], dict[str, str]]:
    """Every named card set of the fleet, labelled with the hosts that have it (a Param's choices
    cannot depend on the chosen host; ``check_conf`` refuses a set the chosen host lacks)."""
    groups = fleet.card_groups()
    hosts = fleet.group_hosts()
    values = [PROFILE_DEFAULT, *groups.keys(), "all", CUSTOM]
    display = {PROFILE_DEFAULT: "As in the host profile", "all": "All cards of the host",
               CUSTOM: "Custom (enter the list below)"}
    everywhere = len(fleet.servers) > 1 and all(len(h) == len(fleet.servers) for h in hosts.values())
    for name, cards in groups.items():
        on = hosts.get(name, [])
        where = "every host" if everywhere or len(on) == len(fleet.servers) > 1 else ", ".join(on)
        display[name] = f"Cards {name} ({len(cards)} card{'s' if len(cards) != 1 else ''}) on {where}"
    return values, display


def _host_cards_md(fleet: Fleet) -> str:
    return "; ".join(f"`{s.name}` {_card_ranges(s.card_ids)}" for s in fleet.servers)


def _card_ranges(cards: list[int]) -> str:
    from .config import _ranges

    return _ranges(list(cards))


def manual_params(kind: str, fleet: Fleet | None = None) -> dict[str, Param]:
    """The typed trigger form of ``manual_<kind>``."""
    fleet = fleet or load_fleet()
    hosts = fleet.names
    card_values, card_display = _card_set_choices(fleet)
    p: dict[str, Param] = {
        "host": Param(hosts[0], type="string", enum=hosts, title="Host",
                      values_display={s.name: f"{s.name} ({s.profile}, {s.cards} card{'s' if s.cards != 1 else ''})"
                                      for s in fleet.servers},
                      description="fleet server to certify (include/fleet.yaml)", section="Target"),
        "card_set": Param(PROFILE_DEFAULT, type="string", enum=card_values, values_display=card_display,
                          title="Card set", section="Target",
                          description_md="A named card set of the fleet (the hosts that have it are in its label), "
                                         "all cards of the host, or *Custom*. A set the chosen host does not have is "
                                         "refused before the run starts, naming the host's cards."),
        "custom_cards": Param(None, type=["string", "null"], pattern=CUSTOM_CARDS_PATTERN, title="Custom card list",
                              description_md="Used when *Card set* is **custom**: card ids and ranges, e.g. "
                                             "`[0,2,5-7]` or `12-15` (digits, `,`, `-` and brackets only). Cards per "
                                             f"host: {_host_cards_md(fleet)}.",
                              section="Target"),
    }
    if kind in ("certify", "sd_throughput"):
        p["batch_configs"] = Param(None, type=["array", "null"], title="Batch configurations",
                                   items={"type": "string", "pattern": BATCH_CONFIG_PATTERN},
                                   examples=BATCH_CONFIG_CHOICES, uniqueItems=True,
                                   description="BxN: batches of B images, N per process (empty: the profile's)",
                                   section="Matrix")
        p["process_counts"] = Param(None, type=["array", "null"], title="Process counts",
                                    items={"enum": PROCESS_COUNT_CHOICES + [str(x) for x in PROCESS_COUNT_CHOICES]},
                                    examples=PROCESS_COUNT_CHOICES, uniqueItems=True,
                                    description="parallel processes, one per card (empty: the profile's)",
                                    section="Matrix")
    if kind in ("certify", "sd_throughput", "whisper"):
        p["repetitions"] = Param(1, type="integer", minimum=1, maximum=100, title="Repetitions",
                                 description="repetitions of every case", section="Matrix")
    p["dtype"] = Param(PROFILE_DEFAULT, type="string", enum=[PROFILE_DEFAULT, *DTYPES], title="Data type",
                       values_display={PROFILE_DEFAULT: "As in the host profile"}, section="Model")
    if kind != "certify" and not get_experiment(MANUAL_EXPERIMENTS[kind][0]).has_model:
        p["thresholds"] = Param(PROFILE_DEFAULT, type="string", enum=[PROFILE_DEFAULT, *THRESHOLD_SETS],
                                title="Thresholds set", values_display={PROFILE_DEFAULT: "The host's SKU"},
                                section="Model")
        return p
    p["model_source"] = Param(None, type=["string", "null"], pattern=MODEL_SOURCE_PATTERN, title="Model source",
                              description_md="`synthetic:<arch>` (e.g. `synthetic:sd-v1-4`) or a local weights "
                                             "directory on the host; empty: the profile's.", section="Model")
    p["thresholds"] = Param(PROFILE_DEFAULT, type="string", enum=[PROFILE_DEFAULT, *THRESHOLD_SETS],
                            title="Thresholds set", values_display={PROFILE_DEFAULT: "The host's SKU"},
                            section="Model")
    return p


def conf_to_request(kind: str, conf: dict, fleet: Fleet | None = None) -> dict:
    """Form values → ``{"host", "profile", "experiments", "overrides"}`` (no validation against the profile)."""
    from .config import parse_card_spec
    from .errors import CardError, ProfileError

    fleet = fleet or load_fleet()
    if kind not in MANUAL_EXPERIMENTS:
        raise ProfileError(f"unknown manual DAG kind {kind!r} (known: {list(MANUAL_EXPERIMENTS)})")
    host = conf.get("host") or fleet.names[0]
    try:
        server = fleet.server(host)
    except ProfileError as e:
        raise ProfileError(f"field 'host': {e}") from None
    experiments = MANUAL_EXPERIMENTS[kind]
    ov: dict[str, Any] = {}
    exps: dict[str, Any] = {}

    card_set = conf.get("card_set") or PROFILE_DEFAULT
    cards: Any = None
    host_cards = _card_ranges(server.card_ids)
    if card_set == CUSTOM:
        text = (conf.get("custom_cards") or "").strip()
        if not text:
            raise ProfileError("field 'custom_cards': card set is 'custom' but no card list was given "
                               "(e.g. [0,2,5-7] or 12-15)")
        try:
            cards = parse_card_spec(text)
        except CardError as e:
            raise ProfileError(f"field 'custom_cards': {e} (write card ids and ranges, e.g. [0,2,5-7] or 12-15)") from None
        bad = [c for c in cards if c not in server.card_ids]
        if bad:
            raise ProfileError(f"field 'custom_cards': host {server.name} has no card(s) {bad}; its cards are {host_cards}")
    elif card_set == "all":
        cards = "all"
    elif card_set != PROFILE_DEFAULT:
        groups = server.card_groups or {}
        if card_set not in groups:
            sets = ", ".join(groups) or "none"
            raise ProfileError(f"field 'card_set': host {server.name} has no card set {card_set!r} "
                               f"(its cards: {host_cards}; its card sets: {sets}; or choose 'all' or 'custom')")
        cards = list(groups[card_set])  # type: ignore[arg-type]
    if cards is not None:
        for e in all_experiments():  # the card set goes to each selected experiment that follows it
            if e.name in experiments and (e.follows_card_set or kind == e.spec_attr):
                exps.setdefault(e.name, {}).update(e.card_override(cards))

    if conf.get("batch_configs"):
        exps.setdefault("sd-throughput", {})["batch_configs"] = list(conf["batch_configs"])
    if conf.get("process_counts"):
        try:
            exps.setdefault("sd-throughput", {})["process_counts"] = [int(x) for x in conf["process_counts"]]
        except (TypeError, ValueError):
            raise ProfileError(f"field 'process_counts': {conf['process_counts']!r} are not integers") from None
    reps = conf.get("repetitions")
    if reps not in (None, "") and kind in ("certify", "sd_throughput", "whisper"):
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ProfileError(f"field 'repetitions': {reps!r} is not an integer ≥ 1")
        target = "whisper" if kind == "whisper" else "sd-throughput"
        exps.setdefault(target, {})["repetitions"] = reps
    dtype = conf.get("dtype") or PROFILE_DEFAULT
    if dtype != PROFILE_DEFAULT:
        ov["dtype"] = dtype
    src = (conf.get("model_source") or "").strip()
    if src:
        if kind in ("certify", "bare_metal", "sd_throughput"):
            ov["sd"] = {"model": src}
        else:
            exps.setdefault(experiments[0], {})["model"] = src
    thresholds = conf.get("thresholds") or PROFILE_DEFAULT
    if thresholds != PROFILE_DEFAULT:
        ov["thresholds"] = thresholds
    # only the selected experiments run
    for e in EXPERIMENTS:
        exps.setdefault(e, {})["enabled"] = e in experiments
    ov["experiments"] = exps
    return {"host": server.name, "profile": server.profile, "experiments": experiments, "overrides": ov}


_FIELD_OF = [  # profile field → form field, to name the form field in error messages
    (r"experiments\.(sd-throughput|sd_throughput)\.batch_configs", "batch_configs"),
    (r"experiments\.(sd-throughput|sd_throughput)\.process_counts", "process_counts"),
    (r"\.repetitions", "repetitions"),
    (r"experiments\.[a-z_0-9-]+\.(cards|groups)|unknown card|card id|card set|card range", "card_set"),
    (r"(^|[ :;.])dtype", "dtype"),
    (r"sd\.model|\.model|model weights|synthetic architecture", "model_source"),
    (r"thresholds", "thresholds"),
]


def _form_field(message: str) -> str | None:
    for pattern, fld in _FIELD_OF:
        if re.search(pattern, message):
            return fld
    return None


def check_request(kind: str, conf: dict, fleet: Fleet | None = None) -> dict:
    """Cross-validate a trigger form against the host's profile. Raises ProfileError naming the form
    field (and the profile field) when the profile would reject it. Returns the request."""
    from .config import load_profile, resolve_model_source
    from .errors import CertError, ProfileError

    req = conf_to_request(kind, conf, fleet)
    try:
        prof = load_profile(req["profile"], overrides=req["overrides"])
        if (conf.get("model_source") or "").strip():
            resolve_model_source(conf["model_source"].strip())
        thr = prof.thresholds_set
        from .config import REPO_ROOT

        params_dir = REPO_ROOT / "expectations" / "params"
        if params_dir.is_dir() and not (params_dir / f"{thr}.yaml").is_file():
            known = sorted(p.stem for p in params_dir.glob("*.yaml"))
            raise ProfileError(f"thresholds: set {thr!r} not found (known: {known})")
    except CertError as e:
        fld = _form_field(str(e))
        prefix = f"field '{fld}': " if fld else ""
        raise ProfileError(f"{prefix}{e}") from None
    return req


def host_dag_problem(ti: Any, dag_id: str) -> str | None:
    """Why the run cannot be handed to the host's DAG ``dag_id`` now, or None. A paused host DAG would
    leave the manual run *running* for ever (its triggered run is queued and never starts): the
    manual run fails at once instead, saying so. It does not unpause the DAG itself, because
    unpausing also starts the host's cron schedule — that is the operator's decision."""
    if ti is None or not hasattr(ti, "get_dag"):
        return None  # outside a task (unit tests of the form): nothing to ask
    try:
        info = ti.get_dag(dag_id)
    except Exception as e:  # noqa: BLE001 - the API server answered 404 or could not be asked
        return (f"host DAG {dag_id} cannot be found ({type(e).__name__}: {e}); is the host in the fleet file and the "
                "DAG parsed? Nothing was started.")
    if getattr(info, "is_paused", False):
        return (f"host DAG {dag_id} is paused, so the run would never start. Unpause it (the toggle on its page in "
                f"the Airflow UI, or 'airflow dags unpause {dag_id}') and trigger this form again. Nothing was started. "
                "(Unpausing also starts its schedule.)")
    return None


MANUAL_DOC = """\
### Manual {title}

Fill in the form (*Trigger*): host, card set, {matrix}data type, model source and thresholds set.
The form is checked twice: by its JSON schema when you submit (bad values are refused naming the
field) and by `check_conf` against the host's profile (e.g. a card the host does not have).
The run then executes as a `recertify_<host>` run on that host's queue and pool, with the form as
profile overrides; this run waits for it and fails when it fails. When `recertify_<host>` is
**paused**, `check_conf` fails at once saying so (nothing starts): unpause the host's DAG first.
"""


def build_manual_dag(kind: str, fleet: Fleet | None = None) -> DAG:
    """``manual_<kind>``: a typed form, a conf check, then the host's recertification DAG with overrides."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    fleet = fleet or load_fleet()
    if kind not in MANUAL_EXPERIMENTS:
        from .errors import ProfileError

        raise ProfileError(f"unknown manual DAG kind {kind!r} (known: {list(MANUAL_EXPERIMENTS)})")
    title = "certification (all experiments)" if kind == "certify" else get_experiment(MANUAL_EXPERIMENTS[kind][0]).title
    matrix = "batch configs, process counts, repetitions, " if kind in ("certify", "sd_throughput") else (
        "repetitions, " if kind == "whisper" else "")
    with DAG(
        dag_id=f"manual_{kind}",
        schedule=None,
        catchup=False,
        max_active_runs=4,
        description=f"Manual {title} of one fleet host from a typed form (runs as recertify_<host>)",
        tags=["mi300x-cert", "manual", f"experiment:{kind}"],
        default_args=dict(DEFAULT_ARGS),
        doc_md=MANUAL_DOC.format(title=title, matrix=matrix),
        params=manual_params(kind, fleet),
        render_template_as_native_obj=True,
    ) as dag:

        @task(task_id="check_conf", retries=0)
        def check_conf() -> dict:
            from .errors import CertError

            ctx = get_current_context()
            try:
                req = check_request(kind, dict(ctx["params"]), fleet)
            except CertError as e:
                raise AirflowFailException(f"bad trigger form: {e}") from e
            problem = host_dag_problem(ctx.get("ti"), f"recertify_{req['host']}")
            if problem:
                raise AirflowFailException(problem)
            return {"experiments": req["experiments"], "overrides": req["overrides"],
                    "requested_by": f"{ctx['dag'].dag_id}/{ctx['run_id']}"}

        conf = check_conf()
        run = TriggerDagRunOperator(
            task_id="run_on_host",
            trigger_dag_id="recertify_{{ params.host }}",
            conf=conf,
            wait_for_completion=True,
            poke_interval=5,
            allowed_states=["success"],
            failed_states=["failed"],
            retries=0,
        )
        conf >> run
    return dag
