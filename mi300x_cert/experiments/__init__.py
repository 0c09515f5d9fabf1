"""Experiments: a lazy registry, and the functions that prepare a run, run cases and finalize.

    prepare_run(profile, out) -> Path          validate everything, then create the run directory
    get_experiment(name).plan(rd, profile)     the cases (small JSON-able dicts with a stable case_id)
    run_case(run_dir, name, case) -> dict      one case: telemetry + network + workers → rows (idempotent)
    finalize_experiment(run_dir, name) -> dict rows.csv, statistics tables, conditions.json
    run_experiment(run_dir, name) -> dict      plan → every case → finalize (the CLI path)
    run_all(run_dir, names) -> dict            the enabled ones among names, then finish_run
    resume_run(run_dir) -> dict                finish an interrupted run: only what is missing, then finish_run
    refinalize_run(run_dir) -> dict            finalize every enabled experiment again (no measuring): today's tables
    finish_run(run_dir) -> state               complete only if every enabled experiment is finalized, all cases ok

Everything that measures holds the host's lock (:func:`mi300x_cert.hostlock.host_lock`): ``run_case``
and ``run_experiment`` (the Airflow tasks), ``run_all`` and ``resume_run`` (the command line).

Experiments register with ``@register("sd-throughput")`` in their own module; the registry maps
names to modules and imports one only when it is asked for, and no experiment module imports torch
(only worker processes do). See docs/experiments.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CertError, WorkerError
from .base import Experiment

__all__ = [
    "EXPERIMENTS",
    "PREDATED_WITHOUT_RECORD",
    "Experiment",
    "register",
    "get_experiment",
    "experiment_names",
    "all_experiments",
    "section_models",
    "suite_names",
    "suite_owner",
    "prepare_run",
    "run_case",
    "finalize_experiment",
    "run_experiment",
    "run_all",
    "resume_run",
    "prepare_and_run",
    "finish_run",
    "refinalize_run",
    "measuring",
]

# The one place that lists the experiment plugins (name → module under mi300x_cert.experiments), in
# the order a full run measures them. Everything else iterates the registry.
_MODULES = {"bare-metal": "bare_metal", "sd-throughput": "sd_throughput", "whisper": "whisper_tokens",
            "resnet50": "resnet50", "hardware-ceilings": "hardware_ceilings"}
EXPERIMENTS: tuple[str, ...] = tuple(_MODULES)
# Experiments registered after the last version whose runs did not record the experiments registered
# when they were planned (run.json ``experiments_registered``): the only ones such an older run may
# predate (:meth:`mi300x_cert.rundir.RunDir.predated_experiments`). Runs record the list since, so a
# newly registered experiment is never added here.
PREDATED_WITHOUT_RECORD: frozenset[str] = frozenset({"hardware-ceilings"})
_REGISTRY: dict[str, type[Experiment]] = {}


def register(name: str) -> Callable[[type[Experiment]], type[Experiment]]:
    """Class decorator: ``@register("sd-throughput") class SDThroughput(Experiment): ...``."""

    def deco(cls: type[Experiment]) -> type[Experiment]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def experiment_names() -> list[str]:
    return list(EXPERIMENTS)


def all_experiments() -> list[Experiment]:
    """Every registered experiment, in run order (imports each plugin module; none imports torch)."""
    return [get_experiment(n) for n in EXPERIMENTS]


def section_models() -> list[tuple[str, str, Any]]:
    """(name, profile attribute, section model) of every experiment: the profile's ``experiments:``."""
    return [(e.name, e.spec_attr, e.spec_model) for e in all_experiments()]


def suite_names() -> list[str]:
    """Every Great Expectations suite: each experiment's own, in run order, then ``network`` (which
    judges the evidence of every experiment)."""
    out: list[str] = []
    for e in all_experiments():
        out += [s for s in e.suites if s not in out]
    return out + ["network"]


def suite_owner(suite: str) -> Experiment | None:
    """The experiment that owns ``suite`` (None for ``network``, which judges them all)."""
    for e in all_experiments():
        if suite in e.suites:
            return e
    return None


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name`` (its module is imported on first use)."""
    if name not in _REGISTRY:
        mod = _MODULES.get(name)
        if mod is None:
            raise CertError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
        importlib.import_module(f"{__name__}.{mod}")
    return _REGISTRY[name]()


# ---- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(rd: Any) -> Iterator[None]:
    """Serialize read-modify-write of run.json / conditions.json between processes (parallel DAG tasks)."""
    with open(rd.root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measuring(rd: Any, profile: Any, wait_s: float | None = None) -> Any:
    """The host lock of a run directory's host (its profile's ``host.name``): one measurement per
    host at a time. Re-entrant in one process for the same run directory."""
    from ..hostlock import host_lock

    return host_lock(profile.host.name, rd.root, wait_s)


def _open_backend(profile: Any, rd: Any = None) -> Any:
    """The profile's telemetry backend; within a run the simulated box keeps its thermal state
    across cases and tasks (``telemetry/.simulated-state.json``)."""
    from ..telemetry import open_backend

    state = rd.root / "telemetry" / ".simulated-state.json" if rd is not None else None
    return open_backend(profile.telemetry, cards=None, host_cards=profile.host.card_ids,
                        domains=profile.host.xgmi_domains, state_path=state)


def _vendor(profile: Any) -> str:
    return {"amdsmi": "amd", "nvml": "nvidia"}.get(profile.telemetry.backend, "virtual")


def _profile_yaml(profile: Any) -> str:
    import yaml

    data = profile.model_dump(mode="json", by_alias=True, exclude={"source_file"})
    return yaml.safe_dump(data, sort_keys=False)


# ---- prepare ------------------------------------------------------------------------------------
def prepare_run(profile: str | Path, out: str | Path, overrides: dict | None = None, run_id: str | None = None, *,
                require_thresholds: bool = True) -> Path:
    """Validate the profile, every enabled experiment's model source and card sets, the telemetry
    backend and the network mode — all before anything is written — then create the run directory
    with ``profile.yaml``, ``inventory.json`` and a ``conditions.json`` skeleton. Returns its path.

    Raises ProfileError, CardError, ModelSourceError, TelemetryError, NetworkIsolationError or
    RunDirError; on any of them no directory is created. A profile whose SKU and workload path have
    no thresholds set is a ProfileError naming both, unless ``require_thresholds`` is False (a
    measurement-only run, e.g. a reference run for ``mi300x-cert baseline``).
    """
    from ..config import load_profile
    from ..errors import ProfileError, RunDirError, TelemetryError
    from ..network import isolation_prefix
    from ..rundir import RunDir, atomic_write_json, discard_new_run

    prof = load_profile(profile, overrides=overrides)
    enabled = []
    for name in EXPERIMENTS:
        exp = get_experiment(name)
        if exp.enabled(prof):
            exp.check(prof)
            enabled.append(name)
    _, net_mode = isolation_prefix(prof.network.mode)
    from ..validation import load_profile_params

    if require_thresholds:  # a run that no thresholds set can judge is refused before anything is measured
        try:
            load_profile_params(prof)
        except CertError as e:
            raise ProfileError(f"{prof.source_file}: {e}") from None
    try:
        with _open_backend(prof) as backend:
            devices = backend.devices()
            backend.sample()
    except CertError:
        raise
    except Exception as e:  # a vendor library failing in an unexpected way
        raise TelemetryError(f"telemetry backend {prof.telemetry.backend!r} failed its check: {type(e).__name__}: {e}") from e
    out = Path(out)
    if (out / "run.json").is_file():
        raise RunDirError(f"{out} already holds a run; choose a new --out, or finish that run with "
                          f"`mi300x-cert run --resume {out}` (or `mi300x-cert certify --resume {out}`)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} exists and is not empty; choose a new --out")
    try:
        from ..inventory import collect_inventory
    except ModuleNotFoundError as e:  # pragma: no cover - inventory ships with the package
        raise CertError(f"inventory module missing: {e}") from e
    inventory = collect_inventory(prof)
    existed = out.is_dir()
    rd = RunDir.create(out, host=prof.host.name, profile_name=prof.name, sku=prof.sku,
                       profile_yaml=_profile_yaml(prof), run_id=run_id)
    try:
        atomic_write_json(rd.root / "inventory.json", inventory)
        atomic_write_json(rd.root / "conditions.json", {
            "run_id": rd.run_id, "profile": prof.name, "sku": prof.sku, "profile_file": Path(prof.source_file or "").name,
            "telemetry_backend": prof.telemetry.backend, "network_mode_requested": prof.network.mode,
            "network_mode": net_mode, "device": prof.device, "dtype": prof.dtype, "path": prof.path,
            "enabled_experiments": enabled, "cards_seen": len(devices), "experiments": {},
        })
    except BaseException as e:  # disk full, interrupted: no half-made run directory is left
        discard_new_run(rd.root, keep_dir=existed)
        if isinstance(e, OSError):
            raise RunDirError(f"cannot write run directory {rd.root}: {e.strerror or e}") from e
        raise
    return rd.root


def _interrupt_name(e: BaseException) -> str:
    """``SIGTERM``/``SIGINT`` for the CLI's KeyboardInterrupt, else the exception's type."""
    return str(e) if isinstance(e, KeyboardInterrupt) and str(e) else type(e).__name__


# ---- one case -----------------------------------------------------------------------------------
def _retire_attempt(rd: Any, experiment: str, case_id: str) -> int:
    """Move the files of an earlier, unfinished attempt of a case under ``attempts/`` folders.

    Returns the attempt number of the run about to start (1 for a first run).
    """
    stem = f"{experiment}-{case_id}"
    cases_dir = rd.experiment_dir(experiment) / "cases"
    candidates = [cases_dir / f"{case_id}.rows.csv", cases_dir / f"{case_id}.json"]
    candidates += [rd.root / k / f"{stem}.csv" for k in ("telemetry", "events", "network", "sockets", "netns")]
    logs = cases_dir / case_id
    prev = rd.case_status(experiment, case_id) or {}
    attempt = int(prev.get("attempt", 0)) + 1 if prev else 1
    existing = [p for p in candidates if p.exists()] + ([logs] if logs.exists() else [])
    if existing and not prev:
        attempt = 2  # a crash left files but no status
    if existing:
        n = attempt - 1
        for p in existing:
            dest_dir = p.parent / "attempts"
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / f"{p.name}.attempt{n}"
            if dest.exists():
                if dest.is_dir():
                    shutil.rmtree(dest)
                else:
                    dest.unlink()
            p.rename(dest)
    return attempt


def _condition_fields(conds: dict, profile: Any, exp: Experiment) -> dict:
    from .base import CONDITION_COLUMNS

    out = {c: conds.get(c) for c in CONDITION_COLUMNS}
    if out["model"] is None:
        out["model"] = exp.model_source(profile)
    if out["synthetic"] is None:
        out["synthetic"] = exp.model_source(profile).startswith("synthetic:")
    return out


def run_case(run_dir: str | Path, experiment: str, case: dict, *, raise_on_failure: bool = False,
             progress: bool = False) -> dict:
    """Run one case and return its status dict (``status`` ok | failed, ``reason``, …).

    Idempotent: a case whose status file says ``ok`` is returned as stored (``skipped: True``)
    without running; a failed or interrupted attempt's files are moved under ``attempts/`` and the
    case runs again from scratch. A failed case returns its status; with ``raise_on_failure`` it
    raises WorkerError after the status is written (the Airflow task path, so the task fails and
    its retry reruns only this case).
    """
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    case_id = str(case["case_id"])
    if rd.case_done(experiment, case_id):
        st = dict(rd.case_status(experiment, case_id) or {})
        st["skipped"] = True
        return st
    profile = rd.load_profile()
    with measuring(rd, profile):
        return _run_case_locked(rd, profile, experiment, case, raise_on_failure=raise_on_failure, progress=progress)


def _run_case_locked(rd: Any, profile: Any, experiment: str, case: dict, *, raise_on_failure: bool,
                     progress: bool) -> dict:
    from ..network import NETNS_COLUMNS, NETWORK_COLUMNS, SOCKET_COLUMNS, NetworkMonitor, isolation_prefix
    from ..rundir import CsvStream, utcnow
    from ..telemetry import EVENT_COLUMNS, TELEMETRY_COLUMNS, Sampler
    from ..launcher import launch

    exp = get_experiment(experiment)
    case_id = str(case["case_id"])
    if rd.case_done(experiment, case_id):  # finished by another process while we waited for the lock
        st = dict(rd.case_status(experiment, case_id) or {})
        st["skipped"] = True
        return st
    run_id = rd.run_id
    attempt = _retire_attempt(rd, experiment, case_id)
    stem = f"{experiment}-{case_id}"
    case_dir = rd.experiment_dir(experiment) / "cases"
    t_started = time.time()
    status: dict[str, Any] = {"case": case, "attempt": attempt, "started": utcnow(),
                              "telemetry_file": f"telemetry/{stem}.csv", "events_file": f"events/{stem}.csv",
                              "network_file": f"network/{stem}.csv", "sockets_file": f"sockets/{stem}.csv",
                              "netns_file": f"netns/{stem}.csv",
                              "rows_file": f"results/{experiment}/cases/{case_id}.rows.csv"}
    reason: str | None = None
    interrupted: BaseException | None = None
    streams: list[CsvStream] = []
    sampler = monitor = None
    bar = None
    try:
        argv_prefix, net_mode = isolation_prefix(profile.network.mode)
        status["network_mode"] = net_mode
        specs = exp.worker_specs(profile, case)
        rows_stream = CsvStream(rd.case_rows_path(experiment, case_id), exp.columns)
        tel = rd.stream("telemetry", stem, TELEMETRY_COLUMNS)
        ev = rd.stream("events", stem, EVENT_COLUMNS)
        net = rd.stream("network", stem, NETWORK_COLUMNS)
        sock = rd.stream("sockets", stem, SOCKET_COLUMNS)
        nsx = rd.stream("netns", stem, NETNS_COLUMNS)
        streams = [rows_stream, tel, ev, net, sock, nsx]
        conds_by_proc: dict[int, dict] = {}
        cards = [s["card"] for s in specs]
        spec_by_proc = {s["proc"]: s for s in specs}
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=exp.total_batches(profile, case), desc=f"  {case_id}", unit="batch", leave=False,
                       file=sys.stderr, dynamic_ncols=True)

        with _open_backend(profile, rd) as backend:
            sampler = Sampler(backend, tel, ev, rate_hz=profile.telemetry.rate_hz)
            monitor = NetworkMonitor(net, sock, rate_hz=profile.network.rate_hz,
                                     exclude_interfaces=profile.network.exclude_interfaces, mode=net_mode,
                                     netns_stream=nsx)
            sampler.start()
            monitor.start()
            bm = exp.spec(profile) if exp.phased else None

            def phase(name: str, on_cards: list[int] | None = None) -> None:
                sampler.phase(name, cards=on_cards)
                monitor.phase(name)

            if bm is not None:
                phase("idle", [])
                time.sleep(float(bm.idle_s))
            phase("load", cards)

            def on_message(wspec: dict, msg: dict) -> None:
                proc = int(wspec["proc"])
                kind = msg.get("type")
                if kind == "loaded":
                    conds_by_proc[proc] = dict(msg.get("conditions") or {})
                    return
                if kind == "batch_start":
                    sampler.batch("start", card=wspec["card"], proc=proc, case_id=case_id,
                                  batch_index=msg.get("batch_index"), batch_size=msg.get("batch_size"))
                    return
                if kind != "row":
                    return
                warm = bool(msg.get("warmup"))
                if not warm:
                    sampler.batch("end", card=wspec["card"], proc=proc, case_id=case_id,
                                  batch_index=msg.get("batch_index"), batch_size=msg.get("batch_size"))
                rows_stream.write(_row(exp, profile, case, wspec, msg, conds_by_proc.get(proc, {}), run_id, net_mode))
                if bar is not None and not warm:
                    bar.update(1)

            def on_go() -> None:
                phase("active", cards)

            res = launch(specs, argv_prefix, timeout_s=exp.timeout_s(profile, case), on_message=on_message,
                         load_timeout_s=float(exp.spec(profile).timeout_s), log_dir=case_dir / case_id,
                         vendor=_vendor(profile), on_go=on_go, on_spawn=lambda pid, s: monitor.watch(pid),
                         on_preloader=lambda pid: monitor.watch(pid, worker=False))
            sampler.reset_busy(cards)
            if bm is not None:
                phase("cooldown", cards)
                time.sleep(float(bm.cooldown_s))
            phase("done", [])
            sampler.stop()
            monitor.stop()
        status["workers"] = [w.to_dict() for w in res.workers]
        status["t_go"] = res.t_go
        status["t_end"] = res.t_end
        status["rows"] = sum(w.rows for w in res.workers)
        status["warmup_rows"] = sum(w.warmup_rows for w in res.workers)
        first = next((w for w in res.workers if w.conditions), None)
        status["conditions"] = first.conditions if first else {}
        status["device"] = first.device if first else None
        status["telemetry"] = {"samples": sampler.samples, "errors": sampler.errors, "last_error": sampler.last_error}
        summ = monitor.summary()
        summ.pop("connections", None)
        status["network"] = summ
        if not res.ok:
            reason = res.reason or "a worker failed"
    except CertError as e:
        reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # infrastructure failure: record it on the case
        reason = f"{type(e).__name__}: {e}"
    except BaseException as e:  # KeyboardInterrupt (SIGINT/SIGTERM in the CLI), a task runner's stop
        interrupted = e
        reason = f"interrupted ({_interrupt_name(e)}): workers killed"
    finally:
        for obj in (sampler, monitor):
            try:
                if obj is not None:
                    obj.stop()
            except Exception:
                pass
        for s in streams:
            s.close()
        if bar is not None:
            bar.close()
    status["duration_s"] = round(time.time() - t_started, 3)
    outcome = "ok" if reason is None else "failed"
    rd.write_case_status(experiment, case_id, outcome, reason=reason, **status)
    if interrupted is not None:  # the case is recorded failed; the interruption goes on up
        raise interrupted
    st = dict(rd.case_status(experiment, case_id) or {})
    if outcome != "ok" and raise_on_failure:
        raise WorkerError(f"{experiment} case {case_id} failed: {reason}")
    return st


def _row(exp: Experiment, profile: Any, case: dict, wspec: dict, msg: dict, conds: dict, run_id: str,
         net_mode: str) -> dict:
    bs = int(msg.get("batch_size") or case.get("batch_size") or 1)
    items = msg.get("items")
    items = int(items) if items is not None else bs
    lat = msg.get("latency_s")
    lat_o = msg.get("latency_overhead_s", lat)
    row = {
        "experiment": exp.name, "case_id": case["case_id"], "run_id": run_id,
        "repetition": case.get("repetition", 1), "process_count": len(case["cards"]), "proc": wspec["proc"],
        "card": wspec["card"], "shared_card": bool(wspec.get("shared_card", False)),
        "batch_config": case.get("batch_config") or f"{bs}x{case.get('n_batches') or ''}".rstrip("x"),
        "batch_size": bs, "batch_index": msg.get("batch_index"), "t_start": msg.get("t_start"),
        "t_end": msg.get("t_end"), "latency_s": lat, "latency_overhead_s": lat_o,
        "per_image_s": (float(lat) / items) if lat is not None and items else None,
        "per_image_overhead_s": (float(lat_o) / items) if lat_o is not None and items else None,
        "items": items, "tokens": msg.get("tokens"), "status": "ok",
    }
    row.update(_condition_fields(conds, profile, exp))
    row["warmup"] = bool(msg.get("warmup"))
    row["network_mode"] = net_mode
    row.update(exp.extra_row(case, msg))
    return {c: row.get(c) for c in exp.columns}


# ---- finalize -----------------------------------------------------------------------------------
def _accelerator(rd: Any, cards: list[int]) -> str:
    try:
        inv = rd.read_json("inventory.json")
    except CertError:
        return "unknown"
    by_index = {int(c.get("index", -1)): c for c in inv.get("cards", []) if isinstance(c, dict)}
    for c in cards:
        name = (by_index.get(int(c)) or {}).get("name")
        if name:
            return str(name)
    names = [c.get("name") for c in by_index.values() if c.get("name")]
    return str(names[0]) if names else "unknown"


def finalize_experiment(run_dir: str | Path, experiment: str) -> dict:
    """Concatenate the case rows into ``results/<exp>/rows.csv`` (measured rows only; warm-up rows go
    to ``warmup_rows.csv``), write the experiment's statistics under ``stats/`` and its entry in
    ``conditions.json``, and record the experiment state in ``run.json``: ``finalized`` when every
    planned case is ok, else ``incomplete`` with the failed/missing cases. Returns a summary dict."""
    import pandas as pd

    from ..rundir import RunDir, atomic_write_json, atomic_write_text

    rd = RunDir(run_dir)
    exp = get_experiment(experiment)
    profile = rd.load_profile()
    cases = exp.plan(rd, profile)
    frames = []
    failed: dict[str, str] = {}
    statuses = []
    for case in cases:
        cid = case["case_id"]
        st = rd.case_status(experiment, cid)
        if st is None:
            failed[cid] = "not run"
        elif st.get("status") != "ok":
            failed[cid] = str(st.get("reason"))
        if st is not None:
            statuses.append(st)
        p = rd.case_rows_path(experiment, cid)
        if p.exists() and p.stat().st_size > 0:
            frames.append(pd.read_csv(p))
    cols = exp.columns
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    for col in ("repetition", "process_count", "proc", "card", "batch_size", "batch_index", "items", "tokens",
                "image_size"):
        if col in df.columns:  # integers stay integers in rows.csv even where some cells are empty
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    warm_mask = df["warmup"].astype(str).str.lower().isin(["true", "1"]) if len(df) else pd.Series([], dtype=bool)
    measured, warm = df[~warm_mask], df[warm_mask]
    edir = rd.experiment_dir(experiment)
    atomic_write_text(edir / "rows.csv", measured.to_csv(index=False))
    atomic_write_text(edir / "warmup_rows.csv", warm.to_csv(index=False))
    all_cards = sorted({int(c) for case in cases for c in case["cards"]})
    accelerator = _accelerator(rd, all_cards)
    summary = exp.summarize(rd, profile, measured, accelerator)
    state = "finalized" if not failed else "incomplete"
    net_modes = sorted({str(s.get("network_mode")) for s in statuses if s.get("network_mode")})
    workload_conds = next((s.get("conditions") for s in statuses if s.get("status") == "ok" and s.get("conditions")), {})
    entry = {**exp.conditions(profile), "workload": workload_conds, "telemetry_backend": profile.telemetry.backend,
             "telemetry_rate_hz": profile.telemetry.rate_hz, "network_mode": net_modes[0] if len(net_modes) == 1 else net_modes,
             "cases": len(cases), "cases_ok": len(cases) - len(failed), "accelerator": accelerator,
             "overhead": "latency_overhead_s = latency_s + host-side input preparation and output post-processing",
             "warmup": "warm-up batches excluded from rows.csv and every statistic (see warmup_rows.csv)"}
    with _locked(rd):
        cpath = rd.root / "conditions.json"
        conds = rd.read_json("conditions.json") if cpath.exists() else {"experiments": {}}
        conds.setdefault("experiments", {})[experiment] = entry
        atomic_write_json(cpath, conds)
        rd.set_experiment_state(experiment, state, cases=len(cases), failed_cases=failed, rows=int(len(measured)))
    return {"experiment": experiment, "state": state, "cases": len(cases), "failed_cases": failed,
            "rows": int(len(measured)), "accelerator": accelerator, **summary}


# ---- whole experiments and runs -----------------------------------------------------------------
def run_experiment(run_dir: str | Path, experiment: str, progress: bool = False, *,
                   raise_on_failure: bool = False) -> dict:
    """plan → run every case (failed cases are recorded, the rest still run) → finalize."""
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    exp = get_experiment(experiment)
    profile = rd.load_profile()
    if not exp.enabled(profile):
        return {"experiment": experiment, "state": "disabled"}
    cases = exp.plan(rd, profile)
    bar = None
    from ..preload import preloading

    # the whole experiment: no other run slips in between its cases, whose workers fork from one
    # preloaded process (mi300x_cert.preload) when there is more than one worker in all to fork
    workers = sum(len(c.get("cards") or []) for c in cases)
    with measuring(rd, profile), (preloading() if workers > 1 else contextlib.nullcontext()):
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), desc=experiment, unit="case", file=sys.stderr, dynamic_ncols=True)
        try:
            for case in cases:
                st = run_case(rd.root, experiment, case, raise_on_failure=raise_on_failure, progress=progress)
                if bar is not None:
                    bar.set_postfix_str(f"{case['case_id']}: {st.get('status')}{' (done earlier)' if st.get('skipped') else ''}")
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return finalize_experiment(rd.root, experiment)


def run_all(run_dir: str | Path, names: list[str] | tuple[str, ...] = EXPERIMENTS, progress: bool = False, *,
            wait_s: float | None = None) -> dict:
    """Run the enabled experiments among ``names`` in order, then :func:`finish_run`, holding the
    host lock throughout (``wait_s``: how long to wait for it; HostBusyError names the holder).
    Cases already done are skipped, so this also finishes an interrupted run."""
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    profile = rd.load_profile()
    with measuring(rd, profile, wait_s):
        return _run_all_locked(rd, profile, names, progress)


def prepare_and_run(profile: str | Path, out: str | Path, names: list[str] | tuple[str, ...] = EXPERIMENTS, *,
                    overrides: dict | None = None, run_id: str | None = None, progress: bool = False,
                    wait_s: float | None = None, require_thresholds: bool = True) -> dict:
    """:func:`prepare_run` then :func:`run_all`, both under the host lock (the command line's
    ``run`` and ``certify``): a busy host is refused before a run directory is created.
    ``require_thresholds``: see :func:`prepare_run` (False for a measurement-only ``run``)."""
    from ..config import load_profile
    from ..hostlock import host_lock

    prof = load_profile(profile, overrides=overrides)
    with host_lock(prof.host.name, out, wait_s):
        run_dir = prepare_run(profile, out, overrides=overrides, run_id=run_id, require_thresholds=require_thresholds)
        print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
        return run_all(run_dir, names, progress=progress, wait_s=wait_s)


def resume_run(run_dir: str | Path, names: list[str] | tuple[str, ...] = EXPERIMENTS, progress: bool = False, *,
               wait_s: float | None = None) -> dict:
    """Finish an interrupted or failed run in place (``mi300x-cert run --resume DIR``): cases with
    status ok are kept, the interrupted or failed ones run again (their earlier files move under
    ``attempts/``), then the experiments are finalized and the run is marked complete or failed.

    A run that is still measuring holds the host lock: resuming it waits for it / refuses naming it.
    A complete run is returned as it is. Raises RunDirError when ``run_dir`` is not a run directory.
    """
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    profile = rd.load_profile()
    with measuring(rd, profile, wait_s):
        if rd.state == "complete":
            return {"state": "complete", "run_dir": str(rd.root), "error": None, "experiments": {},
                    "resumed": False}
        with _locked(rd):
            rd.reopen()
        result = _run_all_locked(rd, profile, names, progress)
        result["resumed"] = True
        return result


def refinalize_run(run_dir: str | Path, names: list[str] | tuple[str, ...] | None = None) -> dict:
    """Finalize the experiments among ``names`` (default: every one the run finalized) of a finished run again,
    measuring nothing (``mi300x-cert finalize DIR``): their ``stats/`` tables are computed anew from
    the run's rows and streams, so a run finalized by an earlier version (an archived reference run)
    gets the tables today's verdicts and report read. The run's own state is left as it is.
    Raises RunDirError for a run that is still measuring (finish it with ``run --resume``) and
    CertError for an unknown or disabled experiment."""
    from ..errors import RunDirError
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    profile = rd.load_profile()
    if rd.state == "running":
        raise RunDirError(f"run {rd.root} is still running (or was interrupted): finish it with "
                          f"`mi300x-cert run --resume {rd.root}`, which finalizes every experiment")
    done = [n for n in EXPERIMENTS if n in (rd.meta.get("experiments") or {})]  # finalized before, in run order
    chosen = list(names) if names else done
    for name in chosen:
        get_experiment(name)  # an unknown name is one clear error
        if name not in done:
            raise CertError(f"experiment {name!r} was never finalized in run {rd.root} (finalized: "
                            f"{', '.join(done) or 'none'}): nothing to compute its tables from")
    out = {}
    for name in chosen:
        summary = finalize_experiment(rd.root, name)
        out[name] = {"state": summary["state"], "tables": summary.get("tables", []),
                     "failed_cases": summary.get("failed_cases", {})}
    return {"run_dir": str(rd.root), "state": rd.state, "experiments": out}


def _run_all_locked(rd: Any, profile: Any, names: list[str] | tuple[str, ...], progress: bool) -> dict:
    results: dict[str, Any] = {}
    current = None
    try:
        for name in names:
            current = name
            exp = get_experiment(name)
            if not exp.enabled(profile):
                results[name] = {"experiment": name, "state": "disabled"}
                continue
            results[name] = run_experiment(rd.root, name, progress=progress)
    except BaseException as e:  # interrupted or broken: never leave the run "running" forever
        why = f"{type(e).__name__}: {e}" if isinstance(e, Exception) else f"interrupted ({_interrupt_name(e)})"
        with _locked(rd):
            rd.mark_failed(f"{why} during {current}")
        raise
    state = finish_run(rd.root)
    return {"state": state, "run_dir": str(rd.root), "error": rd.meta.get("error"), "experiments": results}


def finish_run(run_dir: str | Path) -> str:
    """``complete`` when every enabled experiment is finalized with all cases ok; else the run is
    marked failed with the list of failed cases (or experiments not finalized). Returns the state."""
    from ..rundir import RunDir

    rd = RunDir(run_dir)
    profile = rd.load_profile()
    meta = rd.meta.get("experiments", {})
    problems: list[str] = []
    for name in EXPERIMENTS:
        exp = get_experiment(name)
        if not exp.enabled(profile):
            continue
        info = meta.get(name)
        if not info:
            problems.append(f"{name}: not finalized")
            continue
        for cid, why in (info.get("failed_cases") or {}).items():
            problems.append(f"{name}/{cid}: {why}")
        if info.get("state") != "finalized" and not info.get("failed_cases"):
            problems.append(f"{name}: state {info.get('state')}")
    try:  # utilization against this run's ceilings: reported (report, statement, history), not judged
        from ..utilization import write_utilization

        write_utilization(rd.root)
    except Exception as e:  # never fails a run; the report says the table is missing
        print(f"utilization table not written: {type(e).__name__}: {e}", file=sys.stderr)
    with _locked(rd):
        if problems:
            rd.mark_failed("failed cases: " + "; ".join(problems))
        else:
            rd.mark_complete()
    return rd.state
