"""The one set of functions that the CLI and the Airflow DAGs both call.

Each step takes and returns plain values (paths, dicts) so a DAG task body is one call and XCom
carries only paths/URIs. Heavy libraries are imported inside the modules that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "prepare_run",
    "plan_cases",
    "run_case",
    "finalize_experiment",
    "refinalize_run",
    "run_experiment",
    "finish_run",
    "validate",
    "report",
    "sign",
    "publish",
    "verify",
]


def prepare_run(profile: str | Path, out: str | Path, overrides: dict | None = None, run_id: str | None = None, *,
                require_thresholds: bool = True) -> str:
    """Validate the profile (cards, model sources, its thresholds set unless ``require_thresholds``
    is False — a reference run made to calibrate one), create the run directory, write inventory.

    Bad input raises before anything is created. Returns the run directory path.
    """
    from .experiments import prepare_run as _prepare

    return str(_prepare(profile, out, overrides=overrides, run_id=run_id, require_thresholds=require_thresholds))


def plan_cases(run_dir: str | Path, experiment: str) -> list[dict]:
    """Small JSON-able case dicts of one experiment (e.g. one per process count × batch config × repetition)."""
    from .experiments import get_experiment
    from .rundir import RunDir

    rd = RunDir(run_dir)
    return get_experiment(experiment).plan(rd, rd.load_profile())


def run_case(run_dir: str | Path, experiment: str, case: dict, raise_on_failure: bool = False) -> dict:
    """Run one case (idempotent: a case already done is skipped). Returns its status dict
    (``status`` ok | failed); with ``raise_on_failure`` a failed case raises WorkerError after its
    status is written."""
    from .experiments import run_case as _run_case

    return _run_case(run_dir, experiment, case, raise_on_failure=raise_on_failure)


def finalize_experiment(run_dir: str | Path, experiment: str) -> dict:
    """Concatenate case rows, compute statistics tables and conditions. Returns a summary."""
    from .experiments import finalize_experiment as _fin

    return _fin(run_dir, experiment)


def refinalize_run(run_dir: str | Path, names: list[str] | None = None) -> dict:
    """Finalize a finished run's experiments again (no measuring): today's ``stats/`` tables."""
    from .experiments import refinalize_run as _refin

    return _refin(run_dir, names)


def run_experiment(run_dir: str | Path, experiment: str, progress: bool = False, raise_on_failure: bool = False) -> dict:
    """plan → run every case → finalize (the CLI path; the DAG maps run_case over plan_cases).
    Returns the finalize summary (``state`` finalized | incomplete, ``failed_cases``); with
    ``raise_on_failure`` the first failed case raises WorkerError."""
    from .experiments import run_experiment as _run

    return _run(run_dir, experiment, progress=progress, raise_on_failure=raise_on_failure)


def finish_run(run_dir: str | Path) -> str:
    """Mark the run complete when every enabled experiment is finalized, else failed with the reason."""
    from .experiments import finish_run as _finish

    return _finish(run_dir)


def validate(run_dir: str | Path, suite: str | None = None) -> dict:
    """Run one GX suite (or all) on a complete run directory. Returns the verdict dict
    ``{"suite", "success", "failures": [...], "evaluated", "declared", "data_docs"}`` (or
    ``{"success", "suites": {...}}`` for all). Never raises for a failed expectation."""
    from .validation import validate as _validate

    return _validate(run_dir, suite)


def report(run_dir: str | Path) -> str:
    """Figures 1–7, Appendix tables and verdicts as one self-contained HTML page. Returns its path."""
    from .report import build_report

    return str(build_report(run_dir))


def sign(run_dir: str | Path, key: str | None = None) -> str:
    """Build the bundle (manifest + in-toto Statement in a DSSE envelope). Returns the bundle dir."""
    from .bundle import build_bundle

    return str(build_bundle(run_dir, key=key))


def publish(bundle_dir: str | Path, store: dict | None = None) -> str:
    """Upload the bundle to S3 (checksummed, idempotent). Returns the s3:// URI of its prefix."""
    from .storage import publish_bundle

    return publish_bundle(bundle_dir, store)


def verify(target: str | Path, key: str | None = None, store: dict | None = None, trust: bool = True) -> dict:
    """Check a bundle dir or s3:// URI: signature, every digest, its S3 location and (unless
    ``trust=False``) whether its signer is trusted; ``decision`` in the result is
    :func:`mi300x_cert.outcome.decide`'s. Raises VerifyError for a tampered or replayed bundle."""
    from .bundle import verify_bundle

    return verify_bundle(target, key=key, store=store, trust=trust)
