"""Import a state directory of the file-based records into the registry.

Reads what :mod:`mi300x_cert.alerts` and :mod:`mi300x_cert.history` write:

* ``<state>/outcomes/*.json`` — one certification outcome per run (host, run_id, certified, reasons,
  verdicts, links): each becomes a certification (``source='import'``) whose card rows are the
  history lines of the same (host, run id) and whose failed expectations are the failures of the
  run's alerts;
* ``<state>/history/*.jsonl`` — card rows per serial; a run with card rows but no outcome record
  becomes a certification too (result from the rows' ``certified``; unknown counts as NOT
  CERTIFIED — fail closed — with a reason saying so);
* ``<state>/alerts/*.json`` — alerts keep their id, creation time and acknowledgement, which
  becomes an ``acknowledged`` event.

Idempotent: importing the same directory twice adds nothing. Unreadable files and records that
contradict what the registry already holds are reported in the result, never fatal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import RegistryConflict, RegistryError

__all__ = ["import_state_dir"]

log = logging.getLogger(__name__)


def _read_json(path: Path, problems: list[dict]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append({"path": str(path), "error": f"unreadable: {e}"})
        return None


def _resolved(path: object) -> str | None:
    if not path:
        return None
    try:
        return str(Path(str(path)).resolve())
    except (OSError, RuntimeError):
        return str(path)


def _history_rows(root: Path, problems: list[dict]) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    d = root / "history"
    for p in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            problems.append({"path": str(p), "error": f"unreadable: {e}"})
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append({"path": f"{p}:{n}", "error": f"unreadable line: {e}"})
                continue
            if not isinstance(row, dict) or not row.get("host") or not row.get("run_id"):
                problems.append({"path": f"{p}:{n}", "error": "history line without host or run_id: not imported"})
                continue
            runs.setdefault((str(row["host"]), str(row["run_id"])), []).append(row)
    return runs


def _alert_failures(alerts: list[dict]) -> list[dict]:
    out = []
    for a in alerts:
        for f in a.get("failures") or []:
            if isinstance(f, dict):
                out.append({"suite": f.get("suite") or a.get("suite"), **{k: v for k, v in f.items() if k != "suite"}})
    return out


def import_state_dir(reg, path: str | Path) -> dict:
    """Import ``path`` (a state directory) into ``reg``. Returns counts and the problems found."""
    from ..alerts import summary_text
    from .core import ts

    root = Path(path)
    if not root.is_dir():
        raise RegistryError(f"state directory {root} not found")
    problems: list[dict] = []
    conflicts: list[dict] = []
    counts = {"certifications": 0, "certifications_existing": 0, "cards": 0, "alerts": 0, "alerts_existing": 0,
              "acknowledgements": 0}

    # alerts first read (their failures are the failed expectations of the imported runs)
    alert_docs: list[tuple[Path, dict]] = []
    adir = root / "alerts"
    for p in sorted(adir.glob("*.json")) if adir.is_dir() else []:
        a = _read_json(p, problems)
        if a is None:
            continue
        if not isinstance(a, dict) or not a.get("id"):
            problems.append({"path": str(p), "error": "not an alert record (no 'id')"})
            continue
        alert_docs.append((p, a))
    by_run: dict[tuple[str, str], list[dict]] = {}
    for _, a in alert_docs:
        if a.get("host") and a.get("run_id"):
            by_run.setdefault((str(a["host"]), str(a["run_id"])), []).append(a)

    history = _history_rows(root, problems)
    # a run directory's run.json names the run by its directory-safe id (manual__2026-…T07_26_08…),
    # the DAG's outcome and alerts by Airflow's run id (manual__2026-…T07:26:08…): match by run_dir
    by_dir: dict[str, tuple[str, str]] = {}
    for key, rows in history.items():
        d = _resolved(rows[0].get("run_dir"))
        if d:
            by_dir.setdefault(d, key)

    # certifications: outcome records, then history-only runs; oldest first so drift compares in order
    todo: list[tuple[str, dict, list[dict], list[dict]]] = []
    odir = root / "outcomes"
    seen: set[tuple[str, str]] = set()
    for p in sorted(odir.glob("*.json")) if odir.is_dir() else []:
        o = _read_json(p, problems)
        if o is None:
            continue
        if not isinstance(o, dict) or not o.get("host") or not o.get("run_id"):
            problems.append({"path": str(p), "error": "outcome record without host or run_id: not imported"})
            continue
        key = (str(o["host"]), str(o["run_id"]))
        hkey = key if key in history else by_dir.get(_resolved(o.get("run_dir")) or "", key)
        rows = history.get(hkey, [])
        seen.add(hkey)
        certified = o.get("certified") is True
        verdicts = o.get("verdicts") if isinstance(o.get("verdicts"), dict) else {}
        cert = {
            "host": key[0], "run_id": key[1], "profile": o.get("profile"), "sku": o.get("sku"),
            "started": min((r.get("date") for r in rows if r.get("date")), default=None),
            "finished": next((r.get("finished") for r in rows if r.get("finished")), None),
            "registered_at": o.get("recorded"), "result": "CERTIFIED" if certified else "NOT CERTIFIED",
            "certified": certified, "reasons": list(o.get("reasons") or []),
            "verdicts": {str(k): (v if isinstance(v, bool) or v is None else bool(v)) for k, v in verdicts.items()},
            "bundle_uri": o.get("bundle_uri"), "report": o.get("report"), "data_docs": o.get("data_docs"),
            "dag_id": o.get("dag_id"), "source": "import", "trusted": False,
        }
        todo.append((str(p), cert, rows, _alert_failures(by_run.get(key, []))))
        seen.add(key)
    for key, rows in history.items():
        if key in seen:
            continue
        flags = {r.get("certified") for r in rows}
        certified = flags == {True}
        reasons = [] if certified else (
            ["imported from the per-serial history without an outcome record; result unknown"]
            if None in flags else ["imported from the per-serial history without an outcome record"])
        first = rows[0]
        cert = {"host": key[0], "run_id": key[1], "profile": first.get("profile"), "sku": first.get("sku"),
                "started": min((r.get("date") for r in rows if r.get("date")), default=None),
                "finished": next((r.get("finished") for r in rows if r.get("finished")), None),
                "registered_at": min((r.get("recorded") for r in rows if r.get("recorded")), default=None),
                "result": "CERTIFIED" if certified else "NOT CERTIFIED", "certified": certified,
                "reasons": reasons, "verdicts": {}, "source": "import", "trusted": False}
        todo.append((f"history {key[0]}/{key[1]}", cert, rows, _alert_failures(by_run.get(key, []))))

    def order(item):
        c = item[1]
        return str(c.get("started") or c.get("registered_at") or ""), c["host"], c["run_id"]

    for origin, cert, rows, failed in sorted(todo, key=order):
        try:
            rec, created = reg.record_certification(cert, rows, failed)
        except RegistryConflict as e:
            conflicts.append({"path": origin, "error": str(e)})
            continue
        except RegistryError as e:
            problems.append({"path": origin, "error": str(e)})
            continue
        if created:
            counts["certifications"] += 1
            counts["cards"] += len(rec["cards"])
        else:
            counts["certifications_existing"] += 1

    # alerts, with their ids, times and acknowledgements
    for p, a in alert_docs:
        try:
            created, acked = _import_alert(reg, a, summary_text, ts)
        except RegistryError as e:
            problems.append({"path": str(p), "error": str(e)})
            continue
        counts["alerts" if created else "alerts_existing"] += 1
        counts["acknowledgements"] += acked
    return {"state_dir": str(root), **counts, "conflicts": conflicts, "problems": problems}


def _import_alert(reg, a: dict, summary_text, ts) -> tuple[bool, int]:
    from sqlalchemy import select

    from .core import _name
    from .schema import alert_events, alerts, certifications

    aid = _name(a.get("id"), "alert.id", max_len=250)
    host = _name(a.get("host") or "local", "alert.host")
    run_id = _name(a.get("run_id"), "alert.run_id", required=False, max_len=250) or ""
    suite = _name(a.get("suite"), "alert.suite", required=False, max_len=100) or ""
    failures = [f for f in (a.get("failures") or []) if isinstance(f, dict)]
    created = ts(a.get("created"), "alert.created") or ts(None) or _now_ts()
    acked = bool(a.get("acknowledged"))
    ack_at = ts(a.get("acknowledged_at"), "alert.acknowledged_at") if acked else None

    def tx(conn):
        dup = conn.execute(select(alerts.c.id).where(
            (alerts.c.id == aid) | ((alerts.c.host == host) & (alerts.c.run_id == run_id) & (alerts.c.suite == suite)
                                    & (alerts.c.kind == "expectation")))).first()
        if dup:
            return False, 0
        cert_id = conn.execute(select(certifications.c.id).where(certifications.c.host == host,
                                                                 certifications.c.run_id == run_id)).scalar()
        conn.execute(alerts.insert().values(
            id=aid, host=host, run_id=run_id, dag_id=a.get("dag_id"), suite=suite, kind="expectation",
            severity="error", created=created, message=summary_text(suite or "?", failures, host=host),
            failures=failures, report=a.get("report"), data_docs=a.get("data_docs"), bundle_uri=a.get("bundle_uri"),
            certification_id=cert_id, status="acknowledged" if acked else "open",
            acknowledged_by=a.get("acknowledged_by") if acked else None, acknowledged_at=ack_at,
            note=a.get("note") or ""))
        conn.execute(alert_events.insert().values(alert_id=aid, action="raised", by=None, at=created,
                                                  note="imported from the alerts directory"))
        if acked:
            conn.execute(alert_events.insert().values(alert_id=aid, action="acknowledged",
                                                      by=a.get("acknowledged_by"), at=ack_at or created,
                                                      note=a.get("note") or ""))
        return True, int(acked)

    return reg._write(tx)


def _now_ts() -> str:
    from .core import _now

    return _now()
