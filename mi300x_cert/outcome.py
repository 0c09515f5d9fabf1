"""The one decision — is this run certified? — and the one conclusion that records it.

:func:`decide` is the only place that turns evidence into CERTIFIED / NOT CERTIFIED. A run is
certified when **all** of these hold, and each one that does not is a reason:

1. its measurements are complete (``run.json`` state ``complete``);
2. every suite that its experiments require was evaluated and passed (a suite whose experiments the
   profile disabled is *skipped* and not required; a suite that was not evaluated, or whose verdict is
   unreadable, fails closed);
3. a signed bundle exists (when the caller asks about it: ``signed``);
4. its signer is trusted (when the caller asks: ``trusted`` — a key the control plane enrolled for
   the host the statement names, not revoked, found at the location the statement names).

``sign`` asks 1–2 (the statement's own claim), ``verify`` and ``register`` ask 1–4 from the signed
artifacts, ``certify`` and the DAG reach the answer through :func:`mi300x_cert.register.conclude`,
which calls :func:`decide` and writes the registry rows, alerts and notifications.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Decision", "decide", "suite_verdicts", "CERTIFIED", "NOT_CERTIFIED"]

CERTIFIED = "CERTIFIED"
NOT_CERTIFIED = "NOT CERTIFIED"


@dataclass
class Decision:
    certified: bool
    reasons: list[str] = field(default_factory=list)
    passed_suites: list[str] = field(default_factory=list)
    failed_suites: list[str] = field(default_factory=list)
    missing_suites: list[str] = field(default_factory=list)
    skipped_suites: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return CERTIFIED if self.certified else NOT_CERTIFIED

    def as_dict(self) -> dict:
        return {"certified": self.certified, "result": self.result, **asdict(self)}

    def summary(self) -> str:
        return self.result if self.certified else f"{self.result}: {'; '.join(self.reasons)}"


def suite_verdicts(verdicts: Any) -> tuple[dict[str, dict | None], list[str]]:
    """``({suite: verdict dict or None}, not_validated)`` from any shape validation produces:
    ``validation/verdicts.json`` (``{"success", "suites": {...}, "not_validated": [...]}``), one suite's
    verdict (``{"suite": name, ...}``), a mapping ``{suite: verdict or None}`` (the DAG's XComs), or a
    list of suite verdicts. Unknown shapes give ``({}, [])`` — which :func:`decide` fails."""
    not_validated: list[str] = []
    out: dict[str, dict | None] = {}
    if isinstance(verdicts, list):
        for i, v in enumerate(verdicts):
            if isinstance(v, dict):
                out[str(v.get("suite", f"suite-{i}"))] = v
        return out, not_validated
    if not isinstance(verdicts, dict):
        return out, not_validated
    if isinstance(verdicts.get("suites"), dict):
        nv = verdicts.get("not_validated")
        if isinstance(nv, list):
            not_validated = [str(n) for n in nv]
        for k, v in verdicts["suites"].items():
            out[str(k)] = v if isinstance(v, dict) else None
        return out, not_validated
    if "suite" in verdicts and isinstance(verdicts.get("suite"), str):
        return {verdicts["suite"]: verdicts}, not_validated
    for k, v in verdicts.items():
        out[str(k)] = v if isinstance(v, dict) else None
    return out, not_validated


def decide(*, state: str | None, verdicts: Any, error: str | None = None, required: list[str] | None = None,
           required_by: str | None = None, signed: bool | None = None, trusted: bool | None = None,
           trust_reason: str | None = None, run_problems: list[str] | None = None) -> Decision:
    """The decision over the evidence given. ``verdicts``: any shape :func:`suite_verdicts` reads
    (``None``: no validation happened). ``required``: suites that must be evaluated and pass, whatever
    the run's own profile says (a suite whose verdict says ``skipped`` — its experiment disabled, or
    the run predates it — is otherwise not required); each one that is absent or skipped is a reason
    ``required suite X missing`` naming ``required_by`` (e.g. the fleet profile of the host, see
    :func:`mi300x_cert.fleet.required_suites`). ``signed`` / ``trusted``: ``None`` leaves that
    condition out (e.g. the statement's own claim at signing time).
    """
    d = Decision(certified=False)
    reasons = d.reasons
    if state != "complete":
        reasons.append(f"measurements {state or 'not started'}" + (f": {error}" if error else "") + " (not complete)")
    for p in run_problems or []:
        reasons.append(str(p))
    suites, not_validated = suite_verdicts(verdicts)
    if verdicts is None:
        reasons.append("no verdicts: no expectation was evaluated")
    elif not suites:
        reasons.append("the verdicts hold no evaluated suite")
    for name in sorted(suites):
        v = suites[name]
        if v is None:
            d.missing_suites.append(name)
        elif v.get("status") == "skipped" and v.get("success") is not False:
            d.skipped_suites.append(name)
        elif v.get("success") is True:
            d.passed_suites.append(name)
        else:  # False, None or anything else: fails closed
            d.failed_suites.append(name)
    for name in not_validated:
        if name not in d.missing_suites and name not in d.passed_suites and name not in d.failed_suites:
            d.missing_suites.append(name)
    required_missing: list[str] = []
    for name in required or []:
        if name in d.passed_suites or name in d.failed_suites or name in required_missing:
            continue
        why = ""
        if name in d.skipped_suites:
            d.skipped_suites.remove(name)
            v = suites.get(name) or {}
            why = f" (skipped: {v.get('skipped') or v.get('reason') or 'no reason given'})"
        if name not in d.missing_suites:
            d.missing_suites.append(name)
        required_missing.append(name)
        reasons.append(f"required suite {name} missing{why}" + (f": required by {required_by}" if required_by else ""))
    if suites and not d.passed_suites and not d.failed_suites:
        reasons.append("no suite was evaluated (all skipped)")
    overall = verdicts.get("success") if isinstance(verdicts, dict) and "suites" in verdicts else None
    if overall is False and not d.failed_suites and not d.missing_suites:
        reasons.append("the overall verdict is FAIL")
    if d.failed_suites:
        reasons.append(f"failed suites: {', '.join(d.failed_suites)}")
    other_missing = [n for n in d.missing_suites if n not in required_missing]
    if other_missing:
        reasons.append(f"suites not evaluated: {', '.join(sorted(other_missing))}")
    if signed is False:
        reasons.append("no signed bundle")
    if trusted is False:
        reasons.append("signer not trusted" + (f": {trust_reason}" if trust_reason else ""))
    d.certified = not reasons
    return d
