"""The in-toto Statement of a run and its DSSE envelope (securesystemslib; no hand-written crypto).

The statement is one in-toto Statement v1 whose predicate is an in-toto ``test-result/v0.1``
predicate (``result``, ``configuration``, ``passedTests``/``warnedTests``/``failedTests``) extended
with two blocks of this project:

``certification``  (``"_type": "https://mi300x-cert.dev/certification/v1"``) host, run id, profile,
                   sku, cards and serials, verdict summary, conditions, versions, start/finish times
``bundle``         sha256 of ``manifest.json`` and ``SHA256SUMS`` and the signer block (keyid, scheme,
                   development_key) so every file of a bundle is covered by the one signature
"""

from __future__ import annotations

import base64
import json
from typing import Any

from ..errors import VerifyError

__all__ = [
    "STATEMENT_TYPE",
    "PREDICATE_TYPE",
    "CERTIFICATION_TYPE",
    "PAYLOAD_TYPE",
    "summarize_verdicts",
    "build_statement",
    "sign_payload",
    "envelope_from_bytes",
    "verify_envelope",
    "pae",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://in-toto.io/attestation/test-result/v0.1"
CERTIFICATION_TYPE = "https://mi300x-cert.dev/certification/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


def _failure_label(suite: str, f: Any) -> str:
    if isinstance(f, dict):
        what = f.get("expectation") or f.get("expectation_type") or f.get("type") or f.get("name") or "expectation"
        col = f.get("column")
        return f"{suite}/{what}" + (f"[{col}]" if col else "")
    return f"{suite}/{f}"


def summarize_verdicts(verdicts: Any | None, state: str | None = "complete",
                       required: tuple[list[str], str] | None = None) -> dict:
    """The test-result fields and a verdict summary from ``validation/verdicts.json`` (or None).

    Returns {"result", "passedTests", "warnedTests", "failedTests", "summary"}. ``result`` is PASSED
    exactly when :func:`mi300x_cert.outcome.decide` certifies the verdicts over a run in ``state``
    (bundles are built over complete runs only); the summary's ``reasons`` say why not.
    ``required``: ``(suites, why)`` from :func:`mi300x_cert.fleet.required_suites` (the host's fleet
    profile), suites that must have passed whatever the run's own profile skipped.
    """
    from ..outcome import decide, suite_verdicts

    decision = decide(state=state, verdicts=verdicts, required=required[0] if required else None,
                      required_by=required[1] if required else None)
    if verdicts is None:
        return {"result": "FAILED", "passedTests": [], "warnedTests": [], "failedTests": [],
                "summary": {"present": False, "success": None, "reasons": decision.reasons,
                            "note": "validation/verdicts.json is missing: no expectation was evaluated"}}
    suites, not_validated = suite_verdicts(verdicts)
    failed: list[str] = []
    details: dict[str, dict] = {}
    for name in sorted(suites):
        v = suites[name] or {}
        failures = v.get("failures") or []
        if name in decision.failed_suites:
            failed.append(name)
            for label in (_failure_label(name, f) for f in (failures if isinstance(failures, list) else [])):
                if label not in failed:
                    failed.append(label)
        details[name] = {k: v.get(k) for k in ("success", "status", "reason", "evaluated", "declared") if k in v}
        details[name]["failures"] = len(failures) if isinstance(failures, list) else failures
    failed.extend(f"{n} (not validated)" for n in decision.missing_suites if f"{n} (not validated)" not in failed)
    result = "PASSED" if decision.certified else "FAILED"
    summary: dict[str, Any] = {"present": True, "success": decision.certified, "suites": details,
                               "skipped": list(decision.skipped_suites), "reasons": decision.reasons}
    if required:
        summary["required"] = {"suites": list(required[0]), "by": required[1]}
    if isinstance(verdicts, dict):
        for k in ("thresholds", "profile", "sku", "not_validated", "network_evidence"):
            if k in verdicts:
                summary[k] = verdicts[k]
    if not suites or not (decision.passed_suites or decision.failed_suites):
        summary["note"] = "validation/verdicts.json holds no evaluated suite"
    return {"result": result, "passedTests": list(decision.passed_suites), "warnedTests": [], "failedTests": failed,
            "summary": summary}


def build_statement(*, subjects: list[dict], meta: dict, inventory: dict | None, conditions: Any | None,
                    verdicts: Any | None, profile_digest: str | None, bundle_digests: dict[str, str],
                    signer_block: dict, versions: dict, notes: list[str], utilization: list | None = None,
                    required: tuple[list[str], str] | None = None) -> dict:
    """The in-toto Statement v1 of one run. ``subjects``: [{name, sha256}] sorted by name.
    ``required``: the suites the host's fleet profile requires (see :func:`summarize_verdicts`)."""
    tr = summarize_verdicts(verdicts, meta.get("state"), required)
    inv = inventory if isinstance(inventory, dict) else {}
    cards = inv.get("cards") if isinstance(inv.get("cards"), list) else []
    card_keys = ("index", "name", "serial", "bus_id", "domain", "vendor")
    cards_out = [{k: c.get(k) for k in card_keys if k in c} if isinstance(c, dict) else c for c in cards]
    serials = [c.get("serial") for c in cards if isinstance(c, dict)]
    configuration = [{
        "name": "profile.yaml",
        "uri": f"mi300x-cert:profile/{meta.get('profile')}",
        "annotations": {"profile": meta.get("profile"), "sku": meta.get("sku")},
    }]
    if profile_digest:
        configuration[0]["digest"] = {"sha256": profile_digest}
    certification = {
        "_type": CERTIFICATION_TYPE,
        "run_id": meta.get("run_id"),
        "host": meta.get("host") or inv.get("host"),
        "profile": meta.get("profile"),
        "sku": meta.get("sku"),
        "state": meta.get("state"),
        "started": meta.get("started"),
        "finished": meta.get("finished"),
        "experiments": meta.get("experiments") or {},
        "cards": cards_out,
        "serials": serials,
        "inventory_present": inventory is not None,
        "verdict": tr["summary"],
        "certified": tr["result"] == "PASSED",
        "reasons": tr["summary"].get("reasons") or [],
        "conditions": conditions,
        "conditions_present": conditions is not None,
        "versions": versions,
        "notes": notes,
        # each workload's achieved rate / the run's measured ceiling (stats/utilization.json)
        "utilization": utilization,
    }
    predicate = {
        "result": tr["result"],
        "configuration": configuration,
        "passedTests": tr["passedTests"],
        "warnedTests": tr["warnedTests"],
        "failedTests": tr["failedTests"],
        "certification": certification,
        "bundle": {"files": {k: {"sha256": v} for k, v in sorted(bundle_digests.items())},
                   "signer": signer_block},
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": s["name"], "digest": {"sha256": s["sha256"]}} for s in subjects],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding (the bytes the signature covers), via securesystemslib."""
    from securesystemslib.dsse import Envelope

    return Envelope(payload=payload, payload_type=payload_type, signatures={}).pae()


def sign_payload(payload: bytes, signer: Any) -> dict:
    """A DSSE envelope dict (``payload`` base64, ``payloadType``, ``signatures``) signed by ``signer``."""
    from securesystemslib.dsse import Envelope

    env = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    env.sign(signer)
    return env.to_dict()


def envelope_from_bytes(data: bytes, origin: str = "envelope.dsse.json"):
    """Parse an envelope file into a securesystemslib Envelope; malformed → VerifyError naming it."""
    from securesystemslib.dsse import Envelope

    try:
        d = json.loads(data)
        if not isinstance(d, dict) or set(d) != {"payload", "payloadType", "signatures"}:
            raise ValueError("expected exactly the keys payload, payloadType, signatures")
        base64.b64decode(d["payload"], validate=True)
        return Envelope.from_dict(d)
    except VerifyError:
        raise
    except Exception as e:  # json, base64, KeyError, securesystemslib format errors
        raise VerifyError(f"{origin} is not a valid DSSE envelope: {e}") from e


def verify_envelope(envelope: Any, public_key: Any, origin: str = "envelope.dsse.json") -> str:
    """Check the envelope's signature with ``public_key`` (SSlibKey); returns the keyid that signed."""
    from securesystemslib.exceptions import VerificationError

    if envelope.payload_type != PAYLOAD_TYPE:
        raise VerifyError(f"{origin}: payloadType is {envelope.payload_type!r}, expected {PAYLOAD_TYPE!r}")
    try:
        accepted = envelope.verify([public_key], 1)
    except VerificationError as e:
        raise VerifyError(f"{origin}: signature does not verify with key {public_key.keyid[:16]}…: {e}") from e
    except Exception as e:
        raise VerifyError(f"{origin}: signature cannot be checked: {e}") from e
    if public_key.keyid not in accepted:
        raise VerifyError(f"{origin}: not signed by key {public_key.keyid[:16]}…")
    return public_key.keyid
