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

    ``certified`` is :func:`mi300x_cert.outcome.decide`'s answer, reached through
    :func:`mi300x_cert.register.conclude` exactly as the DAG's ``register`` task reaches it: complete
    measurements, every suite passed, a signed bundle (read back from S3 when published), a signer
    enrolled for the host. A run that could not complete is validated and reported (the failed cases
    fail the latency suite) but not signed: a certificate is only issued over complete measurements.
    Either way the registry gets the certification record and its alerts.

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
    from .validation import format_verdict

    print(format_verdict(verdicts))
    report = pipeline.report(run_dir)
    _say(f"report: {report}")
    from .validation.gx_runner import DATA_DOCS_REL

    data_docs = Path(run_dir) / DATA_DOCS_REL
    if data_docs.exists():
        _say(f"data docs: {data_docs}")

    from .register import conclude, ensure_local_key_enrolled
    from .rundir import RunDir

    meta = RunDir(run_dir).meta
    outcome = {"certified": False, "run_dir": run_dir, "verdicts": verdicts, "report": report,
               "bundle": None, "uri": None, "state": result.get("state")}
    target = None
    if result.get("state") != "complete":
        _say("measurements incomplete: no certificate is signed (see run.json for the failed cases)")
    else:
        bundle = pipeline.sign(run_dir)
        outcome["bundle"] = target = bundle
        _say(f"signed bundle: {bundle}")
        if publish:
            uri = pipeline.publish(bundle, store)
            outcome["uri"] = target = uri
            _say(f"published: {uri}")
    # the same conclusion as the DAG's register task: verify against the enrolled key, decide, record
    ensure_local_key_enrolled(meta.get("host"))
    concluded = conclude(bundle=target, host=meta.get("host"), run_id=meta.get("run_id"), state=meta.get("state"),
                         error=meta.get("error"), verdicts=verdicts, source="certify", store=store)
    outcome.update(certified=concluded["certified"], reasons=concluded["reasons"], alerts=concluded["alerts"],
                   registered=concluded.get("certification"))
    for a in concluded["alerts"]:
        _say(f"alert {a.get('id')}: {a.get('kind')} {a.get('suite')}")
    _say("CERTIFIED" if outcome["certified"] else f"NOT CERTIFIED: {'; '.join(concluded['reasons'])}")
    return outcome
