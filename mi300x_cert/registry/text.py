"""Plain-text views of registry rows for the CLI (fleet, alerts, keys, drift). No database access."""

from __future__ import annotations

from typing import Any

__all__ = ["format_age", "format_fleet", "format_alert", "format_alerts", "format_keys", "format_drift",
           "format_status", "format_import"]


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(float(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 3600:
        return f"{sign}{int(s // 60)}m"
    if s < 86400 * 2:
        return f"{sign}{s / 3600:.1f}h"
    return f"{sign}{s / 86400:.1f}d"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head] + rows)


def _d(v: Any) -> str:
    return "-" if v in (None, "") else str(v)


def _t(v: Any) -> str:
    """A timestamp to the second, space-separated."""
    return "-" if v in (None, "") else str(v)[:19].replace("T", " ")


_STATUS = {"certified": "CERTIFIED", "not_certified": "NOT CERTIFIED", "expired": "EXPIRED",
           "never_certified": "never certified"}


def format_fleet(rows: list[dict]) -> str:
    """One line per host: status, last result and run, age, expiry, open alerts."""
    if not rows:
        return "no hosts in the registry (and no fleet file hosts)"
    head = ["host", "sku", "status", "last result", "run id", "age", "expires", "open alerts"]
    lines = []
    for r in rows:
        expires = _t(r.get("expires_at"))
        if r.get("expired"):
            expires += " (expired)"
        lines.append([str(r["host"]), _d(r.get("sku")), _STATUS.get(r.get("status"), str(r.get("status"))),
                      _d(r.get("result")), _d(r.get("run_id")), format_age(r.get("age_s")), expires,
                      str(r.get("open_alerts") or 0)])
    n_ok = sum(1 for r in rows if r.get("certified_now"))
    return _table(head, lines) + f"\n{n_ok} of {len(rows)} host(s) certified now"


def format_drift(flags: list[dict]) -> str:
    """``sd_per_image_median_s +6.0% vs previous; memory_max_c +5.2 °C vs sku_median``."""
    parts = []
    for f in flags or []:
        if str(f.get("metric", "")).endswith("_s") and f.get("reference"):
            d = f"{100.0 * (f['value'] - f['reference']) / f['reference']:+.1f}%"
        else:
            d = f"{f.get('delta', 0):+.1f} °C"
        parts.append(f"{f.get('metric')} {d} vs {f.get('against')}")
    return "; ".join(parts)


def format_alert(a: dict) -> str:
    from ..alerts import format_failure

    state = (f"ACKNOWLEDGED by {a.get('acknowledged_by')} at {_t(a.get('acknowledged_at'))}"
             if a.get("status") == "acknowledged" else "OPEN")
    lines = [f"[{state}] {a['id']}  {a.get('severity')} {a.get('kind')} host={a.get('host')}"
             + (f" suite={a['suite']}" if a.get("suite") else "") + (f" run={a['run_id']}" if a.get("run_id") else "")
             + f" created={_t(a.get('created'))}"]
    if a.get("message"):
        lines += [f"    {line}" for line in str(a["message"]).splitlines()[:1]]
    for f in (a.get("failures") or [])[:25]:
        lines.append(f"    - {format_failure(f) if isinstance(f, dict) else f}")
    for key, label in (("report", "report"), ("data_docs", "data docs"), ("bundle_uri", "bundle")):
        if a.get(key):
            lines.append(f"    {label}: {a[key]}")
    if a.get("note"):
        lines.append(f"    note: {a['note']}")
    for e in a.get("events") or []:
        if e.get("action") in ("acknowledged", "reopened"):
            lines.append(f"    {_t(e.get('at'))} {e['action']} by {e.get('by')}" + (f": {e['note']}" if e.get("note") else ""))
    return "\n".join(lines)


def format_alerts(rows: list[dict], include_acknowledged: bool) -> str:
    if not rows:
        return "no alerts" if include_acknowledged else "no open alerts"
    return "\n".join(format_alert(a) for a in rows)


def format_keys(rows: list[dict]) -> str:
    if not rows:
        return "no keys enrolled"
    head = ["keyid", "host", "scheme", "enrolled", "by", "state"]
    lines = [[r["keyid"][:16], r["host"], r["scheme"], _t(r["enrolled_at"]), r["enrolled_by"],
              f"REVOKED {_t(r['revoked_at'])} by {r['revoked_by']}" if r.get("revoked_at") else "trusted"]
             for r in rows]
    return _table(head, lines)


def format_status(st: dict) -> str:
    lines = [f"registry: {st['url']} ({st['dialect']})",
             f"schema:   revision {st['revision'] or 'none'} (head {st['head']})"
             + ("" if st["up_to_date"] else "  -> run 'mi300x-cert registry upgrade'")]
    if st.get("counts"):
        lines.append("rows:     " + ", ".join(f"{k} {v}" for k, v in st["counts"].items()))
    return "\n".join(lines)


def format_import(res: dict) -> str:
    lines = [f"imported {res['state_dir']}: {res['certifications']} certification(s) "
             f"({res['certifications_existing']} already there), {res['cards']} card row(s), "
             f"{res['alerts']} alert(s) ({res['alerts_existing']} already there), "
             f"{res['acknowledgements']} acknowledgement(s)"]
    for c in res.get("conflicts") or []:
        lines.append(f"  conflict: {c['path']}: {c['error']}")
    for p in res.get("problems") or []:
        lines.append(f"  skipped: {p['path']}: {p['error']}")
    return "\n".join(lines)
