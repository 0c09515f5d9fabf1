"""``certify``: run → validate → report → sign → publish, in one process (the CLI path).

The Airflow DAGs run the same steps as separate tasks through :mod:`mi300x_cert.pipeline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import pipeline
from .cli import EXPERIMENTS

__all__ = ["certify"]


def _say(msg: str) -> None:
    print(f"[certify] {msg}", file=sys.stderr, flush=True)


def certify(profile: str | Path | None, out: str | Path | None, *, run_id: str | None = None, progress: bool = True,
            publish: bool = True, overrides: dict | None = None, store: dict | None = None,
            resume: str | Path | None = None, wait_s: float | None = None) -> dict:
    """Certify one host. Returns ``{"certified", "run_dir", "verdicts", "report", "bundle", "uri"}``.

    ``certified`` is True only when the run completed and every suite passed. A run that could
    not complete is validated and reported (the failed cases fail the latency suite) but not
    signed: a certificate is only issued over complete measurements.

    ``resume``: an interrupted run directory to finish instead of starting a new one (``profile``
    and ``out`` are then None); validation, report, signature and publication follow as usual.
    The measurements hold the host lock (``wait_s``: how long to wait for another run).
    """
    from .experiments import prepare_and_run, resume_run

    if resume is not None:
        if profile is not None or out is not None or run_id is not None:
            from .errors import CertError

            raise CertError("certify --resume DIR continues the run in DIR with its stored profile; "
                            "leave out --profile, --out and --run-id")
        _say(f"resuming run directory: {resume}")
        result = resume_run(resume, EXPERIMENTS, progress=progress, wait_s=wait_s)
    else:
        if profile is None or out is None:
            from .errors import CertError

            raise CertError("certify needs --profile and --out (or --resume DIR to finish an interrupted run)")
        result = prepare_and_run(profile, out, EXPERIMENTS, overrides=overrides, run_id=run_id, progress=progress,
                                 wait_s=wait_s)
    run_dir = str(result["run_dir"])
    _say(f"measurements: {result.get('state')}")

    verdicts = pipeline.validate(run_dir)
    from .history import record_run_quietly  # per-serial history; logs, never raises

    record_run_quietly(run_dir)
    from .validation import format_verdict

    print(format_verdict(verdicts))
    report = pipeline.report(run_dir)
    _say(f"report: {report}")
    data_docs = Path(run_dir) / "validation" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    if data_docs.exists():
        _say(f"data docs: {data_docs}")

    outcome = {"certified": False, "run_dir": run_dir, "verdicts": verdicts, "report": report,
               "bundle": None, "uri": None, "state": result.get("state")}
    if result.get("state") != "complete":
        _say("measurements incomplete: no certificate is signed (see run.json for the failed cases)")
        return outcome
    bundle = pipeline.sign(run_dir)
    outcome["bundle"] = bundle
    _say(f"signed bundle: {bundle}")
    if publish:
        uri = pipeline.publish(bundle, store)
        outcome["uri"] = uri
        checked = pipeline.verify(uri, store=store)
        _say(f"published and verified: {uri} ({checked.get('artifacts')} artifacts)")
    outcome["certified"] = bool(verdicts.get("success")) and result.get("state") == "complete"
    _say("CERTIFIED" if outcome["certified"] else "NOT CERTIFIED: expectations failed (see above)")
    return outcome

