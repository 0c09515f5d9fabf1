"""Verdicts: Great Expectations suites (``expectations/*.json``) over metric frames of a run directory.

    validate(run_dir)            -> {"success", "suites": {name: verdict}, "thresholds", "data_docs", ...}
    validate(run_dir, "thermal") -> {"suite", "success", "status", "failures", "evaluated", "declared", ...}
    format_verdict(verdict)      -> a readable multi-line summary (what the CLI prints)

Each failure is ``{suite, expectation, column, subject, card, batch_config, process_count, observed,
expected, reason, ...}`` and names what failed with its observed value.

Fail closed: a missing file, column or metric, an unreadable sensor, a missing thresholds file or
parameter, or a suite that loaded fewer expectations than it declares is a failure with its
reason — never a pass and never an exception that hides the verdict. The overall verdict also
fails when ``run.json`` does not say ``complete`` (a failed, interrupted or unfinished run). A suite whose experiment the
profile disabled is reported ``skipped: experiment disabled``, one registered after the run was
planned (:meth:`mi300x_cert.rundir.RunDir.predated_experiments`, by the run's own record) ``skipped: the
run predates …``; an enabled experiment with missing data fails. Writes ``validation/<suite>.json`` and ``validation/verdicts.json`` (all suites
validated so far, merged, so per-suite DAG tasks accumulate one verdicts file).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from .gx_runner import DATA_DOCS_REL
from ..errors import RunDirError, ValidationError

__all__ = ["validate", "format_verdict", "SUITES", "load_params", "load_profile_params", "expectations_dir"]



def _suites() -> tuple[str, ...]:
    from ..experiments import suite_names

    return tuple(suite_names())


SUITES: tuple[str, ...] = _suites()  # every experiment plugin's suites, then network

_ID_COLUMNS = ("card", "role", "batch_config", "process_count", "case_id", "interface", "phase", "pid", "process",
               "raddr", "netns", "experiment")


def expectations_dir() -> Path:
    """The repository's ``expectations/`` (``MI300X_CERT_EXPECTATIONS`` overrides it)."""
    env = os.environ.get("MI300X_CERT_EXPECTATIONS")
    if env:
        return Path(env)
    from ..config import REPO_ROOT

    return REPO_ROOT / "expectations"


def load_params(thresholds_set: str, directory: Path | None = None) -> dict[str, dict]:
    """``expectations/params/<set>.yaml`` → {suite: {name: value}} (raises ValidationError)."""
    import yaml

    p = (directory or expectations_dir()) / "params" / f"{thresholds_set}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in p.parent.glob("*.yaml")) if p.parent.is_dir() else []
        raise ValidationError(f"thresholds set {thresholds_set!r} has no file params/{thresholds_set}.yaml (known: {known})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValidationError(f"params/{p.name} is not valid YAML: {e}") from None
    suites = data.get("suites") if isinstance(data, dict) else None
    if not isinstance(suites, dict):
        raise ValidationError(f"params/{p.name}: needs a 'suites' mapping of suite → parameters")
    return {str(k): dict(v or {}) for k, v in suites.items()}


def load_profile_params(profile: Any, directory: Path | None = None) -> dict[str, dict]:
    """The thresholds of ``profile`` (its SKU and workload path, or its explicit ``thresholds``);
    a missing set raises ValidationError naming the SKU and the path — never a fallback."""
    try:
        return load_params(profile.thresholds_set, directory)
    except ValidationError as e:
        if profile.thresholds or "has no file" not in str(e):
            raise
        known = sorted(x.stem for x in ((directory or expectations_dir()) / "params").glob("*.yaml"))
        raise ValidationError(
            f"profile {profile.name!r}: no thresholds set for SKU {profile.sku!r} on workload path {profile.path!r} "
            f"(expected params/{profile.thresholds_set}.yaml; known sets: {known}). Calibrate one with "
            f"`mi300x-cert baseline RUN_DIR… --out expectations/params/{profile.thresholds_set}.yaml`") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _enabled(profile: Any, experiment: str | None) -> bool:
    from ..experiments import all_experiments, get_experiment

    if experiment is None:
        return any(e.enabled(profile) for e in all_experiments())
    return get_experiment(experiment).enabled(profile)


def _num(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        try:
            return _num(v.item())
        except Exception:
            return str(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _temp_formatter(unit: str | None):
    from ..units import format_c, format_dc

    fmt = {"°C": format_c, "Δ°C": format_dc}.get(unit or "")
    return (lambda v: fmt(v, missing=str(v))) if fmt else None


def _expected(kind: str, kw: dict, unit: str | None) -> str:
    lo, hi = kw.get("min_value"), kw.get("max_value")
    f = _temp_formatter(unit) or (lambda x: f"{_fmt(x)}" + (f" {unit}" if unit else ""))
    if kind.endswith("_to_be_between"):
        if lo is not None and hi is not None:
            return f"between {f(lo)} and {f(hi)}"
        if lo is not None:
            return f"≥ {f(lo)}"
        if hi is not None:
            return f"≤ {f(hi)}"
        return "any value"
    if kind == "expect_column_values_to_be_in_set":
        return f"in {kw.get('value_set')}"
    if kind == "expect_column_distinct_values_to_contain_set":
        return f"contains {kw.get('value_set')}"
    if kind == "expect_column_values_to_not_be_null":
        return "a value (not missing)"
    if kind == "expect_column_to_exist":
        return f"column {kw.get('column')!r} present"
    if kind == "expect_column_pair_values_a_to_be_greater_than_b":
        return f"{kw.get('column_B')} {'≤' if kw.get('or_equal') else '<'} {kw.get('column_A')}"
    if kind == "expect_column_pair_values_to_be_equal":
        return f"{kw.get('column_A')} == {kw.get('column_B')}"
    return json.dumps({k: v for k, v in kw.items() if k not in ("batch_id", "row_condition")}, default=str)


def _failures(suite: str, results: list[dict], df: Any) -> tuple[list[dict], int]:
    """Failed expectation results → failure dicts naming the row (via ``subject``) and observed value."""
    from ..units import c_to_f, dc_to_df
    from .gx_runner import MAX_ROW_FAILURES, exception_message

    by_subject: dict[str, dict] = {}
    if df is not None and "subject" in df.columns:
        by_subject = {str(r["subject"]): r for r in df.to_dict("records")}
    failures: list[dict] = []
    for res in results:
        if res.get("success"):
            continue
        cfg = res.get("expectation_config") or {}
        kind = cfg.get("type", "?")
        kw = cfg.get("kwargs") or {}
        meta = cfg.get("meta") or {}
        unit = meta.get("unit")
        column = kw.get("column") or (f"{kw.get('column_A')}, {kw.get('column_B')}" if kw.get("column_A") else None)
        base = {"suite": suite, "expectation": meta.get("id") or kind, "type": kind, "column": column,
                "expected": _expected(kind, kw, unit), "unit": unit, "description": meta.get("description")}
        exc = exception_message(res)
        result = res.get("result") or {}
        rows = result.get("unexpected_index_list") or []
        if exc:
            failures.append({**base, "subject": None, "observed": None,
                             "reason": f"could not be evaluated (fails closed): {exc}"})
        elif rows and isinstance(rows[0], dict):
            for row in rows[:MAX_ROW_FAILURES]:
                subject = str(row.get("subject"))
                frow = by_subject.get(subject, {})
                if kind.startswith("expect_column_pair"):
                    observed = {k: _num(v) for k, v in row.items() if k != "subject"}
                else:
                    observed = _num(row.get(kw.get("column"), frow.get(kw.get("column"))))
                f = {**base, "subject": subject, "observed": observed}
                for col in _ID_COLUMNS:
                    if col in frow and _num(frow[col]) is not None:
                        f[col] = _num(frow[col])
                if isinstance(f.get("card"), float):
                    f["card"] = int(f["card"])
                if isinstance(f.get("process_count"), float):
                    f["process_count"] = int(f["process_count"])
                if unit in ("°C", "Δ°C") and isinstance(observed, (int, float)):
                    f["observed_f"] = round(c_to_f(observed) if unit == "°C" else dc_to_df(observed), 2)
                case_reason = frow.get("reason")
                if not isinstance(case_reason, str) or not case_reason:  # NaN in frames without reasons
                    case_reason = None
                if case_reason:
                    f["case_reason"] = case_reason
                fmt = _temp_formatter(unit)
                obs = fmt(observed) if fmt else (f"{_fmt(observed)}" + (f" {unit}" if unit and not isinstance(observed, dict) else ""))
                if observed is None:
                    obs = "missing"
                prefix = "unreadable sensor: " if f["expectation"].endswith("sensor_readable") else ""
                f["reason"] = f"{prefix}{subject}: {column} = {obs}, expected {base['expected']}" + (
                    f" ({case_reason})" if case_reason else "")
                failures.append(f)
            extra = int(result.get("unexpected_count") or len(rows)) - min(len(rows), MAX_ROW_FAILURES)
            if extra > 0:
                failures.append({**base, "subject": f"{extra} more rows", "observed": None,
                                 "reason": f"{extra} more unexpected rows (see Data Docs)"})
        else:
            observed = _num(result.get("observed_value"))
            if kind == "expect_column_to_exist":
                reason = f"missing column {kw.get('column')!r} in the {suite} frame (fails closed)"
            else:
                reason = f"{column or 'table'}: observed {observed}, expected {base['expected']}"
            failures.append({**base, "subject": None, "observed": observed, "reason": reason})
    evaluated = len(results)
    return failures, evaluated


def _problem(suite: str, expectation: str, reason: str, **extra: Any) -> dict:
    return {"suite": suite, "expectation": expectation, "type": "fail_closed", "column": extra.pop("column", None),
            "subject": extra.pop("subject", None), "observed": extra.pop("observed", None),
            "expected": extra.pop("expected", None), "reason": reason, **extra}


def _rundir(run_dir: Path) -> Any:
    from ..rundir import RunDir

    return RunDir(run_dir)


def _run_suite(name: str, run_dir: Path, profile: Any, params_all: dict | None, params_error: str | None,
               exp_dir: Path, runner_box: list) -> dict:
    from .frames import build_frame, suite_experiment

    t0 = time.perf_counter()
    experiment = suite_experiment(name)
    verdict: dict[str, Any] = {"suite": name, "experiment": experiment, "success": False, "status": "failed",
                               "failures": [], "evaluated": 0, "declared": None, "loaded": None,
                               "data_docs": None, "thresholds": profile.thresholds_set, "params": {}}
    if not _enabled(profile, experiment):
        verdict.update(success=True, status="skipped", reason="skipped: experiment disabled",
                       skipped="experiment disabled" if experiment else "every experiment disabled")
        if experiment and experiment in _rundir(run_dir).predated_experiments():
            verdict.update(reason=f"skipped: the run predates the {experiment} experiment (registered after the run "
                                  "was planned, by run.json's experiments_registered or, for a run without that "
                                  "record, the documented list; no section of it in its profile.yaml)",
                           skipped="run predates the experiment")
        return verdict
    failures = verdict["failures"]
    suite_path = exp_dir / f"{name}.json"
    params = (params_all or {}).get(name)
    if params_error:
        failures.append(_problem(name, "thresholds", params_error))
    elif params is None:
        failures.append(_problem(name, "thresholds", f"params/{profile.thresholds_set}.yaml has no section for suite {name!r}"))
    params = params or {}
    verdict["params"] = {k: v for k, v in params.items()}
    frame = build_frame(name, run_dir, profile, params)
    if frame.notes.get("evidence") is not None:  # which evidence decided (network): in the verdict and the certificate
        verdict["evidence"] = frame.notes["evidence"]
    for p in frame.problems:
        failures.append(_problem(name, "input_present", f"{p} (fails closed)"))
    frames_dir = run_dir / "validation" / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    frame.df.to_csv(frames_dir / f"{name}.csv", index=False)
    verdict["frame"] = f"validation/frames/{name}.csv"
    verdict["frame_rows"] = int(len(frame.df))
    try:
        from .gx_runner import GXRunner, load_suite_file, suite_parameters

        data = load_suite_file(suite_path)
    except ValidationError as e:
        failures.append(_problem(name, "suite_loaded", str(e)))
        return _finish(verdict, t0)
    missing = sorted(suite_parameters(data) - set(params))
    if missing:
        failures.append(_problem(name, "thresholds", f"params/{profile.thresholds_set}.yaml lacks {missing} for suite {name!r}"))
    if not runner_box:
        runner_box.append(GXRunner(run_dir))
    runner = runner_box[0]
    suite, info = runner.load_suite(name, suite_path)
    verdict["declared"], verdict["loaded"] = info["declared"], info["loaded"]
    for p in info["problems"]:
        failures.append(_problem(name, "declared_count", p, observed=info["loaded"], expected=info["declared"]))
    if suite is None or missing:
        return _finish(verdict, t0)
    gx_params = {k: v for k, v in params.items() if k in suite_parameters(data)}
    results = runner.run(name, suite, frame.df, gx_params)
    fails, evaluated = _failures(name, results, frame.df)
    failures.extend(fails)
    verdict["evaluated"] = evaluated
    verdict["results"] = [{"expectation": (r.get("expectation_config") or {}).get("meta", {}).get("id"),
                           "type": (r.get("expectation_config") or {}).get("type"), "success": r.get("success"),
                           "observed": (r.get("result") or {}).get("observed_value"),
                           "unexpected_count": (r.get("result") or {}).get("unexpected_count")} for r in results]
    verdict["data_docs"] = DATA_DOCS_REL
    if verdict["declared"] is not None and evaluated != verdict["declared"] and not info["problems"]:
        failures.append(_problem(name, "declared_count", f"suite {name} declares {verdict['declared']} expectations but {evaluated} were evaluated",
                                 observed=evaluated, expected=verdict["declared"]))
    return _finish(verdict, t0)


def _finish(verdict: dict, t0: float) -> dict:
    verdict["success"] = not verdict["failures"]
    verdict["status"] = "passed" if verdict["success"] else "failed"
    verdict["seconds"] = round(time.perf_counter() - t0, 3)
    return verdict


def validate(run_dir: str | Path, suite: str | None = None, *, expectations: str | Path | None = None) -> dict:
    """Run one suite (or all) on a run directory and write the verdict files. Never raises for a
    failed expectation; raises RunDirError when ``run_dir`` is not a run directory and
    ValidationError for an unknown suite name."""
    from ..rundir import RunDir, atomic_write_json

    t0 = time.perf_counter()
    rd = RunDir(run_dir)
    root = rd.root
    if suite is not None and suite not in SUITES:
        raise ValidationError(f"unknown suite {suite!r} (known: {', '.join(SUITES)})")
    try:
        profile = rd.load_profile()
    except RunDirError:
        raise
    except Exception as e:
        raise RunDirError(f"{root}/profile.yaml cannot be read: {e}") from e
    exp_dir = Path(expectations) if expectations else expectations_dir()
    params_all, params_error = None, None
    try:
        params_all = load_profile_params(profile, exp_dir)
    except ValidationError as e:
        params_error = str(e)
    names = [suite] if suite else list(SUITES)
    vdir = root / "validation"
    runner_box: list = []
    with _locked(vdir / ".lock"):
        verdicts = {}
        for name in names:
            v = _run_suite(name, root, profile, params_all, params_error, exp_dir, runner_box)
            atomic_write_json(vdir / f"{name}.json", v)
            verdicts[name] = v
        all_path = vdir / "verdicts.json"
        merged: dict[str, Any] = {}
        if all_path.is_file():
            try:
                merged = json.loads(all_path.read_text()).get("suites", {})
            except (OSError, json.JSONDecodeError, AttributeError):
                merged = {}
        merged.update(verdicts)
        overall = _overall(rd, profile, merged, time.perf_counter() - t0)
        atomic_write_json(all_path, overall)
    if suite:
        return verdicts[suite]
    return {**overall, "suites": {n: merged[n] for n in SUITES if n in merged}}


def _overall(rd: Any, profile: Any, suites: dict, seconds: float) -> dict:
    failures = [f for n in SUITES if n in suites for f in suites[n]["failures"]]
    missing = [n for n in SUITES if n not in suites]
    meta = {}
    try:
        meta = rd.meta
    except RunDirError:
        pass
    run_problems = []
    if meta.get("state") != "complete":  # a failed, interrupted or unfinished run certifies nothing
        run_problems.append(_problem("run", "run_complete", f"run state is {meta.get('state')!r}, not 'complete'"
                                     + (f": {meta.get('error')}" if meta.get("error") else "") + " (fails closed)",
                                     observed=meta.get("state"), expected="complete"))
    failures = run_problems + failures
    from ..outcome import decide

    decision = decide(state=meta.get("state"), error=meta.get("error"),
                      verdicts={"suites": suites, "not_validated": missing})
    return {
        "success": decision.certified and not failures,
        "reasons": decision.reasons,
        "run_problems": run_problems,
        "run_id": meta.get("run_id"),
        "run_state": meta.get("state"),
        "profile": profile.name,
        "sku": profile.sku,
        "thresholds": profile.thresholds_set,
        "validated": sorted(suites),
        "network_evidence": (suites.get("network") or {}).get("evidence"),
        "not_validated": missing,
        "failures": failures,
        "data_docs": DATA_DOCS_REL,
        "seconds": round(seconds, 3),
        "suites": suites,
    }


def format_verdict(verdict: dict) -> str:
    """A readable summary: one line per suite, one indented line per failure."""
    suites = verdict.get("suites") if "suites" in verdict else {verdict.get("suite", "?"): verdict}
    lines = []
    if "suites" in verdict:
        head = "PASS" if verdict.get("success") else "FAIL"
        lines.append(f"{head}  run {verdict.get('run_id')}  profile {verdict.get('profile')}  thresholds {verdict.get('thresholds')}")
        for f in verdict.get("run_problems") or []:
            lines.append(f"  FAIL     {'run':<9} {f.get('reason')}")
        for n in verdict.get("not_validated") or []:
            lines.append(f"  FAIL     {n:<9} not validated")
    for name, v in suites.items():
        if v.get("status") == "skipped":
            lines.append(f"  SKIPPED  {name:<9} {v.get('reason', 'skipped')}")
            continue
        status = "PASS" if v.get("success") else "FAIL"
        lines.append(f"  {status:<8} {name:<9} {v.get('evaluated', 0)}/{v.get('declared')} expectations evaluated, "
                     f"{len(v.get('failures') or [])} failure(s)")
        for f in (v.get("failures") or [])[:25]:
            lines.append(f"      - [{f.get('expectation')}] {f.get('reason')}")
        if len(v.get("failures") or []) > 25:
            lines.append(f"      … {len(v['failures']) - 25} more in validation/{name}.json")
    docs = verdict.get("data_docs")
    if docs:
        lines.append(f"  Data Docs: {docs}")
    return "\n".join(lines)
