"""The operator's console: HTML pages over the fleet registry (served by the Airflow plugin).

Pure rendering — every function takes registry data (plain dicts from :mod:`mi300x_cert.registry`)
and returns one self-contained HTML page: inline CSS, inline SVG plots drawn here, a few lines of
inline JavaScript for acknowledging alerts, and no URL outside the console (no CDN, no web font).
Authentication and permissions are the plugin's (``plugins/mi300x_cert_plugin.py``); which URL
serves what is in ``docs/console.md``.

Pages: :func:`fleet_page` (one row per host: filters, sorts, paging), :func:`host_page`
(certifications over time, what changed since the previous one), :func:`serial_page` (one GPU's
temperature, power and latency trends with drift flags), :func:`run_page` (one certification and its
evidence), :func:`alerts_page` (open and acknowledged alerts, acknowledge / reopen).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from typing import Any, Iterable
from urllib.parse import quote, urlencode

from .evidence import DATA_DOCS

__all__ = ["fmt", "fmt_age", "fmt_ts", "evidence_url", "alert_fragment", "serials_page", "fleet_page", "filter_fleet", "host_page", "serial_page", "run_page", "alerts_page",
           "files_page", "error_page", "changes", "svg_trend", "PREFIX", "METRICS", "FLEET_SORTS", "card_serials"]

PREFIX = "/mi300x-cert"
# per-card metrics of the registry (card_results) with their labels and units
METRICS: dict[str, tuple[str, str]] = {
    "idle_junction_mean_c": ("idle junction (mean)", "°C"),
    "active_junction_p95_c": ("active junction (p95)", "°C"),
    "memory_max_c": ("memory temperature (max)", "°C"),
    "active_power_mean_w": ("active power (mean)", "W"),
    "sd_per_image_median_s": ("SD latency per image (median)", "s"),
}
FLEET_SORTS = ("host", "sku", "status", "age", "expires", "alerts")
STATUS_LABEL = {"certified": "CERTIFIED", "not_certified": "NOT CERTIFIED", "expired": "EXPIRED",
                "never_certified": "NEVER CERTIFIED"}


# ---- formatting ------------------------------------------------------------------------------------
def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def fmt(v: Any, unit: str = "") -> str:
    """A readable number: 85.32525000000001 → 85.33, 0.0123456 → 0.01235, 12345.6 → 12,346; None → –."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        s = f"{v:,}"
    elif isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "–"
        a = abs(v)
        if a >= 1000:
            s = f"{v:,.0f}"
        elif a >= 1 or a == 0:
            s = f"{v:.2f}".rstrip("0").rstrip(".") if a < 100 else f"{v:.1f}".rstrip("0").rstrip(".")
        else:
            s = f"{v:.4g}"
    else:
        try:
            return fmt(float(v), unit) if isinstance(v, str) and v.strip() and _is_num(v) else esc(v)
        except ValueError:
            return esc(v)
    return f"{s} {unit}".strip() if unit else s


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _txt(v: Any) -> str:
    """A number formatted like :func:`fmt`, any other value as plain text (the caller escapes)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return html.unescape(fmt(v))
    return "" if v is None else str(v)


AGAINST = {"previous": "its previous run", "sku_median": "the SKU median"}


def _against(v: Any) -> str:
    return AGAINST.get(str(v), str(v))


def fmt_age(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def fmt_ts(v: Any) -> str:
    """ISO time → ``2026-11-29 07:31 UTC`` (seconds dropped)."""
    if not v:
        return "–"
    try:
        d = _dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return esc(v)
    if d.tzinfo:
        d = d.astimezone(_dt.timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M UTC")


def _u(*parts: Any, **query: Any) -> str:
    path = PREFIX + "/" + "/".join(quote(str(p), safe="") for p in parts)
    q = {k: v for k, v in query.items() if v not in (None, "")}
    return path + ("?" + urlencode(q) if q else "")


def evidence_url(host: str, run_id: str, path: str) -> str:
    return f"{PREFIX}/evidence/{quote(host, safe='')}/{quote(run_id, safe='')}/{quote(path, safe='/')}"


def _badge(status: str | None, certified: Any = None) -> str:
    if status is None:
        status = "certified" if certified else ("not_certified" if certified is not None else "never_certified")
    cls = {"certified": "ok", "not_certified": "bad", "expired": "warn", "never_certified": "muted"}.get(status, "muted")
    return f'<span class="badge {cls}">{STATUS_LABEL.get(status, esc(status))}</span>'


CSS = """
*{box-sizing:border-box} body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#17324d;color:#fff;padding:10px 18px;display:flex;gap:22px;align-items:center;flex-wrap:wrap}
header a{color:#cfe3ff;text-decoration:none;font-weight:600} header a.cur{color:#fff;border-bottom:2px solid #fff}
header .who{margin-left:auto;font-size:12px;color:#cfe3ff}
main{padding:14px 18px;max-width:1400px} h1{font-size:22px;margin:4px 0 12px} h2{font-size:17px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%} th,td{border-bottom:1px solid #e2e6ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600;white-space:nowrap} th a{color:inherit} td.n{text-align:right;font-variant-numeric:tabular-nums}
a{color:#0b5cad} .badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:700;white-space:nowrap}
.ok{background:#dff3e3;color:#146c2e} .bad{background:#fde2e1;color:#a4161a} .warn{background:#fff1cc;color:#8a5300} .muted{background:#e9ecef;color:#555}
.card{background:#fff;border:1px solid #dde2e7;border-radius:6px;padding:10px 12px;margin:10px 0}
.alert.open{border-left:4px solid #c62828} .alert.acknowledged{border-left:4px solid #2e7d32}
.meta{color:#5b6570;font-size:12px} form.filters{display:flex;gap:10px;align-items:end;flex-wrap:wrap;margin-bottom:10px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#5b6570} select,input,button{font:inherit;padding:3px 6px}
button{background:#0b5cad;color:#fff;border:0;border-radius:4px;padding:4px 10px;cursor:pointer} button.secondary{background:#6c757d}
.pager{margin:10px 0;display:flex;gap:10px;align-items:center} .chg li{margin:2px 0} .up{color:#a4161a} .down{color:#146c2e}
.drift{color:#8a5300;font-weight:600} .err{color:#a4161a;font-weight:600} .plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0;background:#fff;border:1px solid #dde2e7;border-radius:6px;padding:6px} figcaption{font-size:12px;color:#5b6570}
code{font-size:12px;background:#eef1f4;padding:0 3px;border-radius:3px} .ev a{margin-right:10px}
td.nw{white-space:nowrap} td.drift{min-width:240px} .wide{overflow-x:auto} .wide th{white-space:normal}
"""


def layout(title: str, body: str, *, user: str, current: str = "", open_alerts: int | None = None,
           script: str = "") -> str:
    nav = [("fleet", _u(""), "Fleet"), ("serials", _u("serials"), "GPUs"),
           ("alerts", _u("alerts"), "Alerts" + (f' (<span class="open-count">{open_alerts}</span> open)'
                                                 if open_alerts is not None else ""))]
    links = "".join(f'<a href="{href}" class="{"cur" if key == current else ""}">{label}</a>'
                    for key, href, label in nav)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><b>Certification console</b>{links}<span class="who">Signed in as {esc(user)}</span></header>'
            f"<main>{body}</main>{script}</body></html>")


def error_page(title: str, message: str, *, user: str = "") -> str:
    return layout(title, f'<h1>{esc(title)}</h1><p class="err">{esc(message)}</p>', user=user)


# ---- fleet overview -------------------------------------------------------------------------------
def filter_fleet(rows: list[dict], *, sku: str | None = None, result: str | None = None, expired: str | None = None,
                 sort: str = "host", order: str = "asc") -> list[dict]:
    """The fleet rows a filter selects, sorted. ``result``: certified | not_certified | never_certified |
    expired (the status); ``expired``: yes | no."""
    out = list(rows)
    if sku:
        out = [r for r in out if (r.get("sku") or "") == sku]
    if result:
        out = [r for r in out if r.get("status") == result]
    if expired in ("yes", "no"):
        out = [r for r in out if bool(r.get("expired")) == (expired == "yes")]
    if sort not in FLEET_SORTS:
        sort = "host"
    big = float("inf")
    keys = {
        "host": lambda r: r.get("host") or "",
        "sku": lambda r: (r.get("sku") or "", r.get("host") or ""),
        "status": lambda r: (r.get("status") or "", r.get("host") or ""),
        "age": lambda r: (r["age_s"] if r.get("age_s") is not None else big, r.get("host") or ""),
        "expires": lambda r: (r.get("expires_at") or "~", r.get("host") or ""),
        "alerts": lambda r: (r.get("open_alerts") or 0, r.get("host") or ""),
    }
    out.sort(key=keys[sort], reverse=order == "desc")
    return out


def fleet_page(rows: list[dict], *, user: str, open_alerts: int, sku: str | None = None, result: str | None = None,
               expired: str | None = None, sort: str = "host", order: str = "asc", page: int = 1,
               per_page: int = 25) -> str:
    skus = sorted({r.get("sku") for r in rows if r.get("sku")})
    sel = filter_fleet(rows, sku=sku, result=result, expired=expired, sort=sort, order=order)
    per_page = max(1, min(int(per_page), 500))
    pages = max(1, math.ceil(len(sel) / per_page))
    page = max(1, min(int(page), pages))
    shown = sel[(page - 1) * per_page: page * per_page]
    q = {"sku": sku, "result": result, "expired": expired, "per_page": per_page if per_page != 25 else None}

    def head(key: str, label: str) -> str:
        nxt = "desc" if sort == key and order == "asc" else "asc"
        arrow = (" ▲" if order == "asc" else " ▼") if sort == key else ""
        return f'<th><a href="{_u("", **q, sort=key, order=nxt)}">{label}{arrow}</a></th>'

    def opt(name: str, values: Iterable[tuple[str, str]], cur: str | None) -> str:
        o = "".join(f'<option value="{esc(v)}"{" selected" if v == (cur or "") else ""}>{esc(lab)}</option>'
                    for v, lab in values)
        return f'<select name="{name}" id="f-{name}">{o}</select>'

    filters = (f'<form class="filters" method="get" action="{PREFIX}/">'
               f'<label>SKU{opt("sku", [("", "any")] + [(s, s) for s in skus], sku)}</label>'
               f'<label>Result{opt("result", [("", "any"), ("certified", "certified"), ("not_certified", "not certified"), ("expired", "expired"), ("never_certified", "never certified")], result)}</label>'
               f'<label>Expired{opt("expired", [("", "any"), ("yes", "expired"), ("no", "not expired")], expired)}</label>'
               f'<input type="hidden" name="sort" value="{esc(sort)}"><input type="hidden" name="order" value="{esc(order)}">'
               f'<button type="submit">Apply</button> <a href="{PREFIX}/">clear</a></form>')
    trs = []
    for r in shown:
        host = r["host"]
        run = (f'<a href="{_u("run", host, r["run_id"])}">{esc(r["run_id"])}</a>' if r.get("run_id") else "–")
        alerts = (f'<a href="{_u("alerts", host=host)}" class="err">{r["open_alerts"]}</a>'
                  if r.get("open_alerts") else "0")
        exp = fmt_ts(r.get("expires_at")) + (' <span class="badge warn">expired</span>' if r.get("expired") else "")
        trs.append(f'<tr data-host="{esc(host)}"><td><a href="{_u("host", host)}">{esc(host)}</a></td><td>{esc(r.get("sku") or "–")}</td>'
                   f'<td>{_badge(r.get("status"))}</td><td>{run}</td><td class="n">{fmt_age(r.get("age_s"))}</td>'
                   f'<td>{exp}</td><td class="n">{alerts}</td></tr>')
    pager = (f'<div class="pager">'
             + (f'<a href="{_u("", **q, sort=sort, order=order, page=page - 1)}">← previous</a>' if page > 1 else "")
             + f'<span>page {page} of {pages} · {len(sel)} of {len(rows)} host(s)</span>'
             + (f'<a href="{_u("", **q, sort=sort, order=order, page=page + 1)}">next →</a>' if page < pages else "")
             + "</div>")
    table = ("<table id=\"fleet\"><tr>" + head("host", "host") + head("sku", "SKU") + head("status", "last result")
             + "<th>run</th>" + head("age", "age") + head("expires", "expires") + head("alerts", "open alerts") + "</tr>"
             + ("".join(trs) or '<tr><td colspan="7">No host matches.</td></tr>') + "</table>")
    body = f"<h1>Fleet overview</h1>{filters}{table}{pager}"
    return layout("Fleet overview · certification", body, user=user, current="fleet", open_alerts=open_alerts)


# ---- host page: certifications over time and what changed ---------------------------------------
def _card_key(c: dict) -> Any:
    return c.get("card")


def changes(cur: dict, prev: dict | None) -> dict:
    """What changed from ``prev`` to ``cur`` (two full certifications of one host): ``{suites: [(suite,
    before, after)], cards: [text], metrics: [(serial, card, metric, before, after, delta)]}``."""
    out: dict[str, list] = {"suites": [], "cards": [], "metrics": []}
    if not prev:
        return out
    va, vb = prev.get("verdicts") or {}, cur.get("verdicts") or {}
    for s in sorted(set(va) | set(vb)):
        if va.get(s, "absent") != vb.get(s, "absent"):
            out["suites"].append((s, va.get(s, "absent"), vb.get(s, "absent")))
    ca = {_card_key(c): c for c in prev.get("cards") or []}
    cb = {_card_key(c): c for c in cur.get("cards") or []}
    for k in sorted(set(ca) | set(cb), key=lambda x: (x is None, x)):
        a, b = ca.get(k), cb.get(k)
        if a and not b:
            out["cards"].append(f"card {k} (serial {a.get('serial')}) not in this run")
        elif b and not a:
            out["cards"].append(f"card {k} (serial {b.get('serial')}) new in this run")
        elif a and b:
            if a.get("serial") != b.get("serial"):
                out["cards"].append(f"card {k}: serial {a.get('serial')} → {b.get('serial')} (GPU swapped)")
            if a.get("card_ok") != b.get("card_ok"):
                word = {True: "passed", False: "failed", None: "not judged"}
                out["cards"].append(f"card {k} (serial {b.get('serial')}): {word.get(a.get('card_ok'))} → "
                                    f"{word.get(b.get('card_ok'))}")
    by_serial_a = {c.get("serial"): c for c in prev.get("cards") or [] if c.get("serial")}
    for c in cur.get("cards") or []:
        a = by_serial_a.get(c.get("serial"))
        if not a:
            continue
        for m in METRICS:
            x, y = a.get(m), c.get(m)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y:
                out["metrics"].append((c.get("serial"), c.get("card"), m, x, y, y - x))
    return out


def _verdict_word(v: Any) -> str:
    return {True: "passed", False: "FAILED", None: "not evaluated", "absent": "absent"}.get(v, str(v))


def _evidence_links(cert: dict) -> str:
    host, run = cert.get("host"), cert.get("run_id")
    if not cert.get("bundle_uri") or not str(cert.get("bundle_uri")).startswith("s3://"):
        return '<span class="meta">no published bundle</span>'
    parts = []
    if cert.get("report"):
        parts.append(f'<a href="{evidence_url(host, run, "artifacts/report/index.html")}" target="_blank" class="ev-report">report</a>')
    if cert.get("data_docs"):
        parts.append(f'<a href="{evidence_url(host, run, DATA_DOCS)}" '
                     f'target="_blank" class="ev-docs">Data Docs</a>')
    parts.append(f'<a href="{evidence_url(host, run, "")}" class="ev-bundle">bundle files</a>')
    return '<span class="ev">' + "".join(parts) + "</span>"


def host_page(host: str, host_row: dict | None, certs: list[dict], older: dict | None, *, user: str, open_alerts: int,
              page: int = 1, has_more: bool = False) -> str:
    """``certs``: full certifications newest first (one page); ``older``: the one after the page (to
    compare the last row with)."""
    blocks = []
    for i, c in enumerate(certs):
        prev = certs[i + 1] if i + 1 < len(certs) else older
        ch = changes(c, prev)
        items = [f"<li>suite <b>{esc(s)}</b>: {_verdict_word(a)} → {_verdict_word(b)}</li>" for s, a, b in ch["suites"]]
        items += [f"<li>{esc(t)}</li>" for t in ch["cards"]]
        if ch["metrics"]:
            rows = "".join(
                f'<tr><td><a href="{_u("serial", s)}">{esc(s)}</a></td><td class="n">{esc(card)}</td><td>{esc(METRICS[m][0])}</td>'
                f'<td class="n">{fmt(a, METRICS[m][1])}</td><td class="n">{fmt(b, METRICS[m][1])}</td>'
                f'<td class="n {"up" if d > 0 else "down"}">{"+" if d > 0 else ""}{fmt(d, METRICS[m][1])}</td></tr>'
                for s, card, m, a, b, d in ch["metrics"])
            items.append("<li>metrics of the same GPUs:<table class=\"metrics\"><tr><th>serial</th><th>card</th><th>metric</th>"
                         f"<th>previous</th><th>this run</th><th>change</th></tr>{rows}</table></li>")
        if prev is None:
            chg = '<p class="meta">first certification of this host in the registry</p>'
        else:
            chg = (f'<p class="meta">changes since {esc(prev.get("run_id"))}:</p><ul class="chg">{"".join(items)}</ul>'
                   if items else f'<p class="meta">no change in suites, cards or metrics since {esc(prev.get("run_id"))}</p>')
        reasons = "; ".join(c.get("reasons") or [])
        drift = c.get("drift") or []
        dr = (f'<p class="drift">drift: ' + "; ".join(
            f'{esc(f.get("serial"))} {esc(METRICS.get(f.get("metric"), (f.get("metric"),))[0])} {fmt(f.get("value"))} vs '
            f'{esc(_against(f.get("against")))} {fmt(f.get("reference"))}' for f in drift) + "</p>") if drift else ""
        blocks.append(
            f'<div class="card cert" id="run-{esc(c.get("run_id"))}"><div>{_badge(None, c.get("certified"))} '
            f'<a href="{_u("run", host, c.get("run_id"))}"><b>{esc(c.get("run_id"))}</b></a> '
            f'<span class="meta">finished {fmt_ts(c.get("finished") or c.get("registered_at"))} · profile {esc(c.get("profile"))}'
            f' · {len(c.get("cards") or [])} card(s) · expires {fmt_ts(c.get("expires_at"))}</span></div>'
            f'{"<p>" + esc(reasons) + "</p>" if reasons else ""}{dr}<div>{_evidence_links(c)}</div>{chg}</div>')
    info = ""
    if host_row:
        info = (f'<p>{_badge(host_row.get("status"))} SKU {esc(host_row.get("sku") or "–")} · profile '
                f'{esc(host_row.get("profile") or "–")} · last run {fmt_age(host_row.get("age_s"))} ago · expires '
                f'{fmt_ts(host_row.get("expires_at"))} · <a href="{_u("alerts", host=host)}">{host_row.get("open_alerts", 0)} open alert(s)</a></p>')
    pager = ('<div class="pager">' + (f'<a href="{_u("host", host, page=page - 1)}">← newer</a>' if page > 1 else "")
             + f"<span>page {page}</span>" + (f'<a href="{_u("host", host, page=page + 1)}">older →</a>' if has_more else "")
             + "</div>")
    body = (f"<h1>Host {esc(host)}</h1>{info}<h2>Certifications over time</h2>"
            + ("".join(blocks) or "<p>No certification of this host in the registry.</p>") + pager)
    return layout(f"{host} · certification", body, user=user, current="fleet", open_alerts=open_alerts)


# ---- serial page: trends -----------------------------------------------------------------------
def svg_trend(points: list[tuple[str, float | None, bool, str]], *, title: str, unit: str, width: int = 560,
              height: int = 210) -> str:
    """An inline SVG line plot. ``points``: (x label, value or None, flagged, tooltip) in time order;
    flagged points are drawn red and larger (a drift flag)."""
    pl, pr, pt, pb = 56, 14, 26, 44
    vals = [v for _, v, _, _ in points if isinstance(v, (int, float))]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{esc(title)}"><text x="{pl}" y="16" font-size="13" font-weight="600">{esc(title)}</text>')
    if not vals:
        return head + f'<text x="{pl}" y="{height / 2}" font-size="12" fill="#777">no data</text></svg>'
    lo, hi = min(vals), max(vals)
    if hi == lo:
        d = abs(lo) * 0.1 or 1.0
        lo, hi = lo - d, hi + d
    pad = (hi - lo) * 0.1
    nonneg = min(vals) >= 0
    lo, hi = lo - pad, hi + pad
    if nonneg:  # temperatures, watts, seconds: the axis does not go below zero
        lo = max(lo, 0.0)
    w, h = width - pl - pr, height - pt - pb
    n = len(points)

    def x(i: int) -> float:
        return pl + (w / 2 if n == 1 else w * i / (n - 1))

    def y(v: float) -> float:
        return pt + h * (1 - (v - lo) / (hi - lo))

    parts = [head, f'<rect x="{pl}" y="{pt}" width="{w}" height="{h}" fill="#fafbfc" stroke="#d5dbe1"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{pl}" x2="{pl + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e6e9ed"/>'
                     f'<text x="{pl - 4}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end" fill="#555">{fmt(v)}</text>')
    parts.append(f'<text x="12" y="{pt + h / 2:.0f}" font-size="10" fill="#555" transform="rotate(-90 12 {pt + h / 2:.0f})" '
                 f'text-anchor="middle">{esc(unit)}</text>')
    seg: list[str] = []
    for i, (_, v, _, _) in enumerate(points):
        if isinstance(v, (int, float)):
            seg.append(f"{x(i):.1f},{y(v):.1f}")
        elif seg:
            parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="#0b5cad" stroke-width="2"/>')
            seg = []
    if seg:
        parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="#0b5cad" stroke-width="2"/>')
    step = max(1, math.ceil(n / 6))
    for i, (lab, v, flagged, tip) in enumerate(points):
        if i % step == 0 or i == n - 1:
            anchor = "start" if i == 0 and n > 1 else ("end" if i == n - 1 and n > 1 else "middle")
            parts.append(f'<text x="{x(i):.1f}" y="{pt + h + 14}" font-size="10" text-anchor="{anchor}" fill="#555">{esc(lab)}</text>')
        if isinstance(v, (int, float)):
            color, r = ("#c62828", 6) if flagged else ("#0b5cad", 3.5)
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{r}" fill="{color}" class="{"flag" if flagged else "pt"}">'
                         f"<title>{esc(tip)}: {fmt(v, unit)}{' — drift flag' if flagged else ''}</title></circle>")
    if any(f for _, _, f, _ in points):
        parts.append(f'<circle cx="{pl + 6}" cy="{height - 10}" r="5" fill="#c62828"/><text x="{pl + 15}" y="{height - 6}" '
                     f'font-size="10" fill="#555">drift flag (vs this GPU\'s previous run or its SKU median)</text>')
    parts.append("</svg>")
    return "".join(parts)


def serial_page(serial: str, rows: list[dict], *, user: str, open_alerts: int) -> str:
    """``rows``: :meth:`Registry.serial_history` (oldest first)."""
    def flagged(r: dict, metric: str) -> bool:
        return any(f.get("metric") == metric for f in r.get("drift") or [])

    def pts(metric: str) -> list:
        return [(str(r.get("date") or "")[:10], r.get(metric), flagged(r, metric),
                 f'{r.get("run_id")} on {r.get("host")} card {r.get("card")}') for r in rows]

    plots = "".join(f'<figure>{svg_trend(pts(m), title=label, unit=unit)}<figcaption>{esc(m)}</figcaption></figure>'
                    for m, (label, unit) in METRICS.items())
    trs = []
    for r in rows:
        drift = "; ".join(f'{METRICS.get(f.get("metric"), (f.get("metric"),))[0]} {_txt(f.get("value"))} vs '
                          f'{_against(f.get("against"))} {_txt(f.get("reference"))} (limit {_txt(f.get("limit"))})'
                          for f in r.get("drift") or [])
        cells = "".join(f'<td class="n{" drift" if flagged(r, m) else ""}">{fmt(r.get(m))}</td>' for m in METRICS)
        trs.append(f'<tr><td class="nw">{fmt_ts(r.get("date"))}</td><td class="nw"><a href="{_u("host", r.get("host"))}">{esc(r.get("host"))}</a></td>'
                   f'<td class="n">{esc(r.get("card"))}</td><td class="nw"><a href="{_u("run", r.get("host"), r.get("run_id"))}">{esc(r.get("run_id"))}</a></td>'
                   f'<td>{_badge(None, r.get("certified"))}</td><td>{"ok" if r.get("card_ok") else ("FAILED" if r.get("card_ok") is False else "–")}</td>'
                   f'{cells}<td class="drift">{esc(drift)}</td></tr>')
    heads = "".join(f"<th>{esc(label)} ({esc(unit)})</th>" for label, unit in METRICS.values())
    sku = next((r.get("sku") for r in reversed(rows) if r.get("sku")), None)
    body = (f'<h1>GPU {esc(serial)}</h1><p class="meta">{esc(sku or "")} · {len(rows)} certification(s) · '
            f'drift flags mark a run at least the fleet file\'s limit slower or hotter than this GPU\'s previous run or its SKU median</p>'
            f'<div class="plots">{plots}</div><h2>Every certification of this GPU</h2>'
            f'<div class="wide"><table id="history"><tr><th>date</th><th>host</th><th>card</th><th>run</th><th>result</th><th>card verdict</th>'
            f'{heads}<th>drift flags</th></tr>{"".join(trs)}</table></div>')
    return layout(f"GPU {serial} · certification", body, user=user, current="serials", open_alerts=open_alerts)


def serials_page(rows: list[dict], *, user: str, open_alerts: int) -> str:
    trs = "".join(
        f'<tr><td><a href="{_u("serial", r["serial"])}">{esc(r["serial"])}</a></td><td>{esc(r.get("sku"))}</td>'
        f'<td class="n">{r.get("runs")}</td><td><a href="{_u("host", r.get("last_host"))}">{esc(r.get("last_host"))}</a></td>'
        f'<td class="n">{esc(r.get("last_card"))}</td><td>{fmt_ts(r.get("last_date"))}</td>'
        f'<td>{_badge(None, r.get("last_certified"))}</td><td class="drift">{"drift" if r.get("last_drift") else ""}</td></tr>'
        for r in rows)
    body = ("<h1>GPUs by serial</h1><table><tr><th>serial</th><th>SKU</th><th>runs</th><th>last host</th><th>card</th>"
            f"<th>last run</th><th>last result</th><th></th></tr>{trs or '<tr><td colspan=8>No GPU in the registry.</td></tr>'}</table>")
    return layout("GPUs · certification", body, user=user, current="serials", open_alerts=open_alerts)


# ---- one certification -------------------------------------------------------------------------
def card_serials(cert: dict | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in (cert or {}).get("cards") or []:
        if c.get("card") is not None and c.get("serial"):
            out[int(c["card"])] = str(c["serial"])
    return out


def _failure_line(f: dict, serials: dict[int, str]) -> str:
    exp = f.get("expectation") or f.get("expectation_type") or f.get("type") or "expectation"
    bits = [f"<b>{esc(exp)}</b>"]
    if f.get("column"):
        bits.append(f"column {esc(f['column'])}")
    card = f.get("card")
    if card not in (None, ""):
        try:
            sn = serials.get(int(card))
        except (TypeError, ValueError):
            sn = None
        bits.append(f"card {esc(card)}" + (f' (GPU <a href="{_u("serial", sn)}">{esc(sn)}</a>)' if sn else ""))
    line = " · ".join(bits)
    obs, expv = f.get("observed", f.get("observed_value")), f.get("expected", f.get("expected_value"))
    if obs is not None or expv is not None:
        line += f": observed <b>{_fmt_any(obs)}</b>, expected {_fmt_any(expv)}"
    if f.get("reason") and obs is None:
        line += f" — {esc(f['reason'])}"
    return line


def _fmt_any(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(v)
    if isinstance(v, dict):
        return ", ".join(f"{esc(k)} {_fmt_any(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_any(x) for x in v[:20]) + (", …" if len(v) > 20 else "") + "]"
    return esc(v)


def run_page(cert: dict, *, user: str, open_alerts: int, alerts: list[dict]) -> str:
    serials = card_serials(cert)
    host, run = cert["host"], cert["run_id"]
    verdicts = "".join(f'<tr><td>{esc(s)}</td><td>{_verdict_word(v)}</td></tr>' for s, v in sorted((cert.get("verdicts") or {}).items()))
    failed = "".join(f"<li>{esc(f.get('suite'))}: {_failure_line(f, serials)}</li>" for f in cert.get("failed") or [])
    cards = "".join(
        f'<tr><td class="n">{esc(c.get("card"))}</td><td><a href="{_u("serial", c.get("serial"))}">{esc(c.get("serial"))}</a></td>'
        f'<td>{esc(c.get("bus_id"))}</td><td>{"ok" if c.get("card_ok") else ("FAILED" if c.get("card_ok") is False else "–")}</td>'
        + "".join(f'<td class="n">{fmt(c.get(m))}</td>' for m in METRICS) + "</tr>"
        for c in cert.get("cards") or [] if c.get("serial"))
    heads = "".join(f"<th>{esc(label)} ({esc(unit)})</th>" for label, unit in METRICS.values())
    al = "".join(f'<li><a href="{_u("alerts", host=host)}#alert-{esc(a["id"])}">{esc(a.get("suite") or a.get("kind"))}</a> '
                 f'({esc(a.get("status"))})</li>' for a in alerts)
    body = (f'<h1>{esc(host)} · run {esc(run)}</h1><p>{_badge(None, cert.get("certified"))} '
            f'<span class="meta">started {fmt_ts(cert.get("started"))} · finished {fmt_ts(cert.get("finished"))} · registered '
            f'{fmt_ts(cert.get("registered_at"))} · expires {fmt_ts(cert.get("expires_at"))} · signer {esc((cert.get("signer_keyid") or "")[:16])}'
            f' ({"trusted" if cert.get("trusted") else "not trusted"})</span></p>'
            + (f'<p>{esc("; ".join(cert.get("reasons") or []))}</p>' if cert.get("reasons") else "")
            + f'<h2>Evidence</h2><p>{_evidence_links(cert)}</p><p class="meta">bundle {esc(cert.get("bundle_uri") or "–")} · '
              f'envelope sha256 <code>{esc(cert.get("bundle_digest") or "–")}</code>; every file is checked against it before it is shown</p>'
            + f"<h2>Suites</h2><table style=\"width:auto\"><tr><th>suite</th><th>verdict</th></tr>{verdicts}</table>"
            + (f"<h2>Failed expectations</h2><ul>{failed}</ul>" if failed else "")
            + (f"<h2>Alerts</h2><ul>{al}</ul>" if al else "")
            + f'<h2>Cards</h2><div class="wide"><table><tr><th>card</th><th>serial</th><th>bus</th><th>verdict</th>{heads}</tr>{cards}</table></div>')
    return layout(f"{host} {run} · certification", body, user=user, current="fleet", open_alerts=open_alerts)


def files_page(cert: dict, names: list[str], *, user: str) -> str:
    host, run = cert["host"], cert["run_id"]
    lis = "".join(f'<li><a href="{evidence_url(host, run, n)}">{esc(n)}</a></li>' for n in names)
    body = (f'<h1>Bundle of {esc(host)} · {esc(run)}</h1><p class="meta">{esc(cert.get("bundle_uri"))} — each file is read '
            f'from the object store and checked (registered envelope sha256 → signed statement → manifest) before it is shown.</p>'
            f"<ul>{lis}</ul>")
    return layout(f"bundle {run}", body, user=user, current="fleet")


# ---- alerts ---------------------------------------------------------------------------------------
def _alert_block(a: dict, serials: dict[int, str]) -> str:
    aid = esc(a["id"])
    fails = [f for f in a.get("failures") or [] if isinstance(f, dict)]
    if a.get("kind") == "drift":
        lis = "".join(f'<li>GPU <a href="{_u("serial", f.get("serial"))}">{esc(f.get("serial"))}</a> (card {esc(f.get("card"))}): '
                      f'{esc(METRICS.get(f.get("metric"), (f.get("metric"),))[0])} {fmt(f.get("value"))} vs '
                      f'{esc(_against(f.get("against")))} {fmt(f.get("reference"))}</li>' for f in fails)
    else:
        lis = "".join(f"<li>{_failure_line(f, serials)}</li>" for f in fails)
    if not lis and a.get("message"):
        lis = "".join(f"<li>{esc(line)}</li>" for line in str(a["message"]).splitlines() if line.strip())
    run = a.get("run_id")
    links = ""
    if run:
        links = (f'<a href="{_u("run", a["host"], run)}">run {esc(run)}</a> '
                 + (f'<a href="{evidence_url(a["host"], run, "artifacts/report/index.html")}" target="_blank" class="ev-report">report</a> '
                    if a.get("report") else "")
                 + (f'<a href="{evidence_url(a["host"], run, DATA_DOCS)}" '
                    f'target="_blank" class="ev-docs">Data Docs</a> ' if a.get("data_docs") else "")
                 + (f'<a href="{evidence_url(a["host"], run, "")}" class="ev-bundle">bundle</a>'
                    if str(a.get("bundle_uri") or "").startswith("s3://") else ""))
    acked = a.get("status") == "acknowledged"
    history = "".join(f'<li>{esc(e.get("action"))} {("by " + esc(e.get("by"))) if e.get("by") else ""} at {fmt_ts(e.get("at"))}'
                      f'{(": " + esc(e.get("note"))) if e.get("note") and e.get("action") != "links" else ""}</li>'
                      for e in a.get("events") or [] if e.get("action") != "links")
    state = (f'<p class="ackinfo">Acknowledged by <b class="ack-by">{esc(a.get("acknowledged_by"))}</b> at '
             f'{fmt_ts(a.get("acknowledged_at"))}{(": <i class=ack-note>" + esc(a.get("note")) + "</i>") if a.get("note") else ""}</p>'
             if acked else "")
    action = (f'<input class="note" placeholder="note (optional)" id="note-{aid}" size="40"> '
              + (f'<button class="reopen secondary" data-id="{aid}">Reopen</button>' if acked else
                 f'<button class="ack" data-id="{aid}">Acknowledge</button>')
              + f' <span class="result" id="result-{aid}"></span>')
    sev = "warn" if a.get("severity") == "warning" else "bad"
    return (f'<div class="card alert {"acknowledged" if acked else "open"}" id="alert-{aid}" data-id="{aid}">'
            f'<div><span class="badge {sev}">{esc(a.get("kind"))}</span> <a href="{_u("host", a.get("host"))}"><b>{esc(a.get("host"))}</b></a>'
            f' · suite <b>{esc(a.get("suite") or "–")}</b> · raised {fmt_ts(a.get("created"))} <span class="meta">{aid}</span></div>'
            f'<ul>{lis}</ul><div class="links">{links}</div>{state}'
            f'<details><summary class="meta">history</summary><ul class="meta">{history}</ul></details><div>{action}</div></div>')


ALERT_JS = """<script>
(function(){
  const P = "%s";
  function counts(){
    const n = document.querySelectorAll("#open-list .alert").length;
    const m = document.querySelectorAll("#acked-list .alert").length;
    document.querySelectorAll(".open-count").forEach(e => e.textContent = n);
    document.querySelectorAll(".acked-count").forEach(e => e.textContent = m);
    document.title = "Alerts (" + n + " open) · certification";
    const empty = document.getElementById("open-empty"); if (empty) empty.style.display = n ? "none" : "";
  }
  async function act(btn, verb){
    const id = btn.dataset.id, note = document.getElementById("note-" + id).value;
    const out = document.getElementById("result-" + id);
    out.textContent = "…"; out.className = "result";
    let r;
    try {
      r = await fetch(P + "/api/alerts/" + encodeURIComponent(id) + "/" + verb, {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-Requested-With": "fetch"}, body: JSON.stringify({note: note})});
    } catch (e) { out.textContent = "request failed: " + e; out.className = "result err"; return; }
    if (!r.ok) {
      let d = r.status + ""; try { d = (await r.json()).detail || d; } catch (e) {}
      out.textContent = (r.status === 403 ? "Not allowed: " : "Failed: ") + d; out.className = "result err"; return;
    }
    const d = await r.json();
    const tmp = document.createElement("div"); tmp.innerHTML = (d.html || "").trim();
    const block = tmp.firstElementChild;
    document.getElementById("alert-" + id).remove();
    const list = document.getElementById(verb === "ack" ? "acked-list" : "open-list");
    list.insertBefore(block, list.firstChild);
    wire(block); counts();
  }
  function wire(root){
    root.querySelectorAll("button.ack").forEach(b => b.addEventListener("click", () => act(b, "ack")));
    root.querySelectorAll("button.reopen").forEach(b => b.addEventListener("click", () => act(b, "reopen")));
  }
  wire(document); counts();
})();
</script>""" % PREFIX


def alerts_page(open_alerts: list[dict], acked: list[dict], *, user: str,
                serials_of: dict[tuple[str, str], dict[int, str]], host: str | None = None) -> str:
    """``serials_of``: (host, run id) → {card: serial} (the GPU serials shown on failures)."""
    def block(a: dict) -> str:
        return _alert_block(a, serials_of.get((a.get("host"), a.get("run_id") or ""), {}))

    flt = (f'<p>Showing host <b>{esc(host)}</b> only · <a href="{_u("alerts")}">all hosts</a></p>' if host else "")
    body = (f'<h1>Alerts: <span class="open-count">{len(open_alerts)}</span> open</h1>{flt}'
            f'<h2>Open (<span class="open-count">{len(open_alerts)}</span>)</h2><div id="open-list">'
            + "".join(block(a) for a in open_alerts) + "</div>"
            + f'<p id="open-empty" class="meta"{" style=display:none" if open_alerts else ""}>No open alerts.</p>'
            + f'<h2>Acknowledged (<span class="acked-count">{len(acked)}</span>)</h2><div id="acked-list">'
            + "".join(block(a) for a in acked) + "</div>")
    return layout(f"Alerts ({len(open_alerts)} open) · certification", body, user=user, current="alerts",
                  open_alerts=None, script=ALERT_JS).replace(
        '<a href="' + _u("alerts") + '" class="cur">Alerts</a>',
        '<a href="' + _u("alerts") + '" class="cur">Alerts (<span class="open-count">'
        + str(len(open_alerts)) + "</span> open)</a>")


def alert_fragment(a: dict, serials: dict[int, str]) -> str:
    """One alert's block (what the page swaps in after an acknowledgement or reopening)."""
    return _alert_block(a, serials)


def as_json(obj: Any) -> str:
    return json.dumps(obj, default=str)
