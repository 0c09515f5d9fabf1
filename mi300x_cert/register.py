"""Concluding a certification on the control plane: verify → decide → registry rows, alerts, notifications.

:func:`conclude` is the one function every path ends in — the DAG's ``register`` task (which runs on
the control plane, never on ``gpu-<host>``), ``mi300x-cert certify`` and ``mi300x-cert register``.
It reads nothing from a GPU host's disk: a published bundle is fetched from S3 (or read from a local
bundle directory given on the command line), verified, and its signed artifacts are the evidence.

A bundle is **refused** — recorded as NOT CERTIFIED with an alert that says why — when it does not
verify (digest, signature, canonical form), lies somewhere other than the S3 location its statement
names (a replay), names another host than the one being concluded, or was signed by a key that is not
enrolled for its host (or was revoked). Registering the same bundle again changes nothing; a
different bundle for a run already registered is refused as a conflict and the registered record is
kept.

A run that produced no bundle (measurements incomplete, signing skipped) is concluded from what the
caller knows (run state, suite verdicts) and is always NOT CERTIFIED.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import CertError, StorageError, VerifyError
from .outcome import Decision, decide, suite_verdicts

__all__ = ["conclude", "location_of", "failed_expectations", "notify_alerts", "ensure_local_key_enrolled",
           "is_embedded"]

log = logging.getLogger(__name__)


def _fleet():
    """The fleet file (alert recipients, valid days, the drift rule, required suites), or None where
    there is none: read once per conclusion."""
    from .fleet import fleet_or_none

    return fleet_or_none()


def location_of(uri: str) -> tuple[str | None, str | None, str | None]:
    """(host, date, run id) that an ``s3://…/<host>/<date>/<run id>`` location names."""
    parts = str(uri).rstrip("/").split("/")
    if len(parts) < 6 or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[-2]):
        return None, None, None
    return parts[-3], parts[-2], parts[-1]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def failed_expectations(verdicts: Any) -> list[dict]:
    """Every failed expectation of a verdicts document, one dict each (suite, expectation, column,
    card, observed, expected, reason)."""
    suites, _ = suite_verdicts(verdicts)
    out: list[dict] = []
    for name, v in sorted(suites.items()):
        for f in (v or {}).get("failures") or []:
            if not isinstance(f, dict):
                f = {"reason": str(f)}
            out.append({"suite": name, "expectation": f.get("expectation") or f.get("expectation_type") or f.get("type"),
                        "column": f.get("column"), "card": f.get("card"), "observed": f.get("observed"),
                        "expected": f.get("expected"), "reason": f.get("reason") or f.get("message")})
    for p in (verdicts or {}).get("run_problems") or [] if isinstance(verdicts, dict) else []:
        if isinstance(p, dict):
            out.append({"suite": "run", "expectation": p.get("expectation"), "column": None, "card": None,
                        "observed": p.get("observed"), "expected": p.get("expected"), "reason": p.get("reason")})
    return out


def _suite_failures(verdicts: Any) -> dict[str, list[dict]]:
    suites, _ = suite_verdicts(verdicts)
    return {n: list((v or {}).get("failures") or []) for n, v in suites.items()}


def _server(fleet: Any, host: str | None):
    """The fleet entry of ``host`` (alert recipients, sku, valid days), or None."""
    if fleet is None or not host:
        return None
    return next((s for s in fleet.servers if s.name == host), None)


def notify_alerts(alerts_created: list[dict], server: Any, context: dict | None) -> None:
    if not alerts_created or server is None:
        return
    from .alerts import notify

    for a in alerts_created:
        try:
            a["notified"] = notify(a, recipients=list(server.alerts.email), smtp_conn_id=server.alerts.smtp_conn_id,
                                   slack_conn_id=server.alerts.slack_conn_id, context=context)
        except Exception as e:  # a notifier never hides the record
            log.warning("notification of alert %s failed: %s", a.get("id"), e)


def conclude(*, bundle: str | Path | None = None, host: str | None = None, run_id: str | None = None,
             state: str | None = None, error: str | None = None, verdicts: Any = None, dag_id: str | None = None,
             source: str = "register", store: dict | None = None, notify: bool = True,
             context: dict | None = None, experiments: list[str] | None = None) -> dict:
    """Conclude one run: decide, write the registry (certification, cards by serial, failed
    expectations, alerts), send notifications for alerts raised now. Returns the outcome::

        {host, run_id, certified, result, reasons, refused, bundle_uri, certification, alerts,
         created, drift}

    ``bundle``: an ``s3://`` URI of a published bundle or a local bundle directory. Without one the
    run is concluded (NOT CERTIFIED) from ``state`` / ``error`` / ``verdicts``. ``host`` / ``run_id``:
    what the caller is concluding (the DAG knows both); a bundle naming another host or run is refused.
    Where the fleet file assigns the host a profile, the suites of the experiments that profile
    enables are required (:func:`mi300x_cert.fleet.required_suites`): a run that skipped one of them
    (its own stored profile disabled it, or it predates it) is NOT CERTIFIED, "required suite X
    missing". ``experiments``: the experiments the operator chose for this run (the DAG run's conf),
    which limit that requirement; without it, the experiments the run was planned with
    (``conditions.json`` in the signed bundle), else all the profile enables.
    Raises StorageError when the store cannot be reached (nothing is recorded: retry), RegistryError
    when the registry cannot.
    """
    from .fleet import planned_experiments, required_suites
    from .registry import open_registry

    reg = open_registry()
    fleet = _fleet()
    if bundle is None:
        if not host or not run_id:
            raise CertError("concluding a run without a bundle needs its host and run id")
        req = required_suites(fleet, host, experiments)
        d = decide(state=state, verdicts=verdicts, error=error, signed=False,
                   required=req[0] if req else None, required_by=req[1] if req else None)
        return _record(reg, host=host, run_id=run_id, decision=d, verdicts=verdicts, dag_id=dag_id, source=source,
                       bundle_uri=None, digest=None, keyid=None, trusted=None, artifacts=None, statement=None,
                       notify=notify, context=context, fleet=fleet)
    target = str(bundle)
    is_s3 = target.startswith("s3://")
    loc_host, _, loc_run = location_of(target) if is_s3 else (None, None, None)
    with tempfile.TemporaryDirectory(prefix="mi300x-cert-register-") as tmpd:
        local = Path(tmpd) / "bundle" if is_s3 else Path(target)
        from .bundle import verify_bundle

        try:
            result = verify_bundle(target, store=store, keep=local if is_s3 else None, fleet=fleet)
        except VerifyError as e:
            refused_host = host or loc_host or _statement_field(local, "host")
            refused_run = run_id or loc_run or _statement_field(local, "run_id")
            if not refused_host or not refused_run:
                raise VerifyError(f"bundle {target} refused and it names no host and run to record it under: {e}") from e
            d = Decision(certified=False, reasons=[f"bundle refused: {e}"])
            return _record(reg, host=refused_host, run_id=refused_run, decision=d, verdicts=None, dag_id=dag_id,
                           source=source, bundle_uri=target, digest=_digest(local), keyid=None, trusted=False,
                           artifacts=None, statement=None, notify=notify, context=context, fleet=fleet, refused=True)
        s_host, s_run = result.get("host"), result.get("run_id")
        rec_host, rec_run = host or s_host, run_id or s_run
        problems = []
        if host and s_host != host:
            problems.append(f"the bundle's statement names host {s_host!r}, not {host!r}")
        if run_id and s_run != run_id:
            problems.append(f"the bundle's statement names run {s_run!r}, not {run_id!r}")
        if not result.get("trusted"):
            problems.append(f"signer not trusted: {result.get('trust_reason') or 'unknown key'}")
        digest = _digest(local)
        if problems:
            d = Decision(certified=False, reasons=[f"bundle refused: {p}" for p in problems])
            return _record(reg, host=rec_host, run_id=rec_run, decision=d, verdicts=None, dag_id=dag_id,
                           source=source, bundle_uri=target, digest=digest, keyid=result.get("keyid"),
                           trusted=False, artifacts=None, statement=None, notify=notify, context=context, fleet=fleet,
                           refused=True)
        arts = local / "artifacts"
        meta = _read_json(arts / "run.json") or {}
        art_verdicts = _read_json(arts / "validation" / "verdicts.json")
        req = required_suites(fleet, rec_host, experiments if experiments is not None
                              else planned_experiments(_read_json(arts / "conditions.json")))
        d = decide(state=meta.get("state"), error=meta.get("error"), verdicts=art_verdicts, signed=True, trusted=True,
                   required=req[0] if req else None, required_by=req[1] if req else None)
        if d.certified and result.get("certified") is not True:
            d.certified = False
            d.reasons.append("the signed statement itself does not claim certification")
        statement = _read_json(local / "statement.json") or {}
        return _record(reg, host=rec_host, run_id=rec_run, decision=d, verdicts=art_verdicts, dag_id=dag_id,
                       source=source, bundle_uri=target if is_s3 else str(Path(target).resolve()), digest=digest,
                       keyid=result.get("keyid"), trusted=True, artifacts=arts, statement=statement,
                       notify=notify, context=context, fleet=fleet, meta=meta)


def _statement_field(bundle: Path, name: str) -> str | None:
    st = _read_json(bundle / "statement.json")
    try:
        return st["predicate"]["certification"].get(name)
    except (TypeError, KeyError, AttributeError):
        return None


def _digest(bundle: Path) -> str | None:
    try:
        return hashlib.sha256((bundle / "envelope.dsse.json").read_bytes()).hexdigest()
    except OSError:
        return None


def _links(bundle_uri: str | None, artifacts: Path | None) -> dict:
    if not bundle_uri or artifacts is None:
        return {"report": None, "data_docs": None}
    from .validation.gx_runner import DATA_DOCS_REL as docs

    base = bundle_uri.rstrip("/") + "/artifacts/"
    rep = "report/index.html"
    return {"report": base + rep if (artifacts / rep).is_file() else None,
            "data_docs": base + docs if (artifacts / docs).is_file() else None}


def _record(reg: Any, *, host: str, run_id: str, decision: Decision, verdicts: Any, dag_id: str | None, source: str,
            bundle_uri: str | None, digest: str | None, keyid: str | None, trusted: bool | None,
            artifacts: Path | None, statement: dict | None, notify: bool, context: dict | None,
            refused: bool = False, meta: dict | None = None, fleet: Any = None) -> dict:
    from .registry import RegistryConflict

    server = _server(fleet, host)
    meta = meta or {}
    profile_name, sku, path = meta.get("profile"), meta.get("sku"), None
    if artifacts is not None:
        try:
            import yaml

            prof = yaml.safe_load((artifacts / "profile.yaml").read_text()) or {}
            path = prof.get("path") or "stock"
        except (OSError, ValueError, AttributeError):
            path = None
    if server is not None:
        sku = sku or server.sku
        profile_name = profile_name or server.profile
    links = _links(bundle_uri, artifacts)
    cert = {
        "host": host, "run_id": run_id, "profile": profile_name, "sku": sku, "path": path,
        "started": meta.get("started"), "finished": meta.get("finished"),
        "result": decision.result, "certified": decision.certified, "reasons": list(decision.reasons),
        "verdicts": {**{n: True for n in decision.passed_suites}, **{n: False for n in decision.failed_suites},
                     **{n: None for n in decision.missing_suites}},
        "bundle_uri": bundle_uri, "bundle_digest": digest, "signer_keyid": keyid, "trusted": bool(trusted),
        "valid_days": getattr(server, "valid_days", None), "cards": getattr(server, "cards", None),
        "source": source, "dag_id": dag_id, **links,
    }
    cards: list[dict] = []
    if artifacts is not None:
        from .history import HistoryError, card_history_rows

        try:
            cards = card_history_rows(artifacts, certified=decision.certified)
        except HistoryError as e:
            log.warning("no per-card rows for %s/%s: %s", host, run_id, e)
        for c in cards:
            c["run_dir"] = None
            c["host"] = host
    failed = failed_expectations(verdicts) if verdicts is not None else []
    out: dict[str, Any] = {"host": host, "run_id": run_id, "certified": decision.certified, "result": decision.result,
                           "reasons": list(decision.reasons), "refused": refused, "bundle_uri": bundle_uri,
                           **links, "alerts": [], "created": False, "drift": []}
    new_alerts: list[dict] = []
    try:
        row, created = reg.record_certification(cert, cards, failed,
                                                drift_rule=fleet.drift_rule() if fleet is not None else None)
    except RegistryConflict as e:
        alert, made = reg.raise_alert(host=host, run_id=run_id, suite="bundle", kind="conflict",
                                      message=f"bundle {bundle_uri} conflicts with the registered certification: {e}",
                                      dag_id=dag_id, bundle_uri=bundle_uri)
        if made:
            new_alerts.append(alert)
        out.update(certified=False, result="NOT CERTIFIED", refused=True, alerts=[alert],
                   reasons=[f"refused: {e}"], certification=reg.get_certification(host, run_id))
        if notify:
            notify_alerts(new_alerts, server, context)
        return out
    out["certification"] = row
    out["created"] = created
    drift = list((row or {}).get("drift") or []) if isinstance(row, dict) else []
    out["drift"] = drift
    cert_id = (row or {}).get("id") if isinstance(row, dict) else None
    common = {"host": host, "run_id": run_id, "dag_id": dag_id, "bundle_uri": bundle_uri,
              "report": links["report"], "data_docs": links["data_docs"], "certification_id": cert_id}
    raised: list[tuple[dict, bool]] = []
    if refused:
        raised.append(reg.raise_alert(suite="bundle", kind="refused", message="; ".join(decision.reasons), **common))
    else:
        from .alerts import summary_text

        per_suite = _suite_failures(verdicts)
        for suite in decision.failed_suites:
            fails = per_suite.get(suite) or []
            raised.append(reg.raise_alert(suite=suite, kind="expectation", failures=fails,
                                          message=summary_text(suite, fails, host=host), **common))
        if not decision.certified and not decision.failed_suites:
            raised.append(reg.raise_alert(suite="certification", kind="not_certified",
                                          message="; ".join(decision.reasons), **common))
        if drift:
            lines = [f"{f.get('serial')}: {f.get('metric')} {f.get('value')} vs {f.get('against')} {f.get('reference')}"
                     for f in drift]
            raised.append(reg.raise_alert(suite="drift", kind="drift", severity="warning",
                                          message="drift against the card's own history or its SKU median:\n" + "\n".join(lines),
                                          failures=drift, **common))
    if decision.certified and created:  # a fresh certificate settles the host's expiry alerts
        for a in reg.list_alerts(host=host):
            if a.get("kind") in ("never_certified", "expired"):
                reg.acknowledge(a["id"], by="mi300x-cert", note=f"settled: host certified again by run {run_id}")
    for alert, made in raised:
        out["alerts"].append(alert)
        if made:
            new_alerts.append(alert)
    if notify:
        notify_alerts(new_alerts, server, context)
    return out


def is_embedded(reg: Any) -> bool:
    """True when ``reg`` is the embedded default: SQLite under this machine's state dir, chosen because
    neither ``$MI300X_CERT_REGISTRY_URL`` nor an Airflow connection names a registry."""
    from .alerts import state_dir
    from .registry.url import normalise_url

    default = normalise_url(f"sqlite:///{Path(state_dir()).resolve() / 'registry.db'}")
    return reg.url == default


def ensure_local_key_enrolled(host: str | None) -> dict | None:
    """Embedded mode only (the registry is this machine's own SQLite file, i.e. this machine is its
    own control plane): enroll this machine's signing key for ``host`` when the host has no key yet,
    and say so. A fleet registry (``$MI300X_CERT_REGISTRY_URL`` / an Airflow connection) is never
    changed here: keys are enrolled there by an operator (``mi300x-cert keys enroll``)."""
    from .bundle.keys import load_signer
    from .registry import open_registry

    reg = open_registry()
    if not host or not is_embedded(reg) or reg.list_keys(host=host):
        return None
    signer = load_signer()
    key = reg.enroll_key(host, signer.public_pem, by="embedded default",
                         note="this machine's own key, enrolled because the registry is embedded")
    print(f"[registry] embedded registry: enrolled this machine's signing key {signer.keyid[:16]}… for host {host} "
          f"(a fleet control plane enrolls host keys with 'mi300x-cert keys enroll')", flush=True)
    return key
