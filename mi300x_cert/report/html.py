"""The report page: one self-contained HTML file (PNGs embedded as base64, inline CSS)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from ..units import format_c, format_dc

__all__ = ["render_page", "table_html", "c_f"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.pass{color:#0a7d28;font-weight:bold}.fail{color:#b00020;font-weight:bold}
.skip{color:#8a6d00;font-weight:bold}figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444}.missing{color:#b00020}pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.8em}
.banner{padding:.8em 1em;border-radius:6px;font-size:1.2em;margin:1em 0}.banner.pass{background:#e6f4ea}.banner.fail{background:#fdecea}
.banner.none{background:#f1f1f1;color:#555}
"""


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def c_f(c: Any) -> str:
    """``51.0 °C (123.8 °F)``; empty for a missing value."""
    return format_c(c)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return esc(v)


def table_html(df: Any, left: tuple[str, ...] = (), max_rows: int = 500) -> str:
    """A pandas DataFrame as an HTML table (numbers right-aligned, ``left`` columns left-aligned)."""
    cols = list(df.columns)
    head = "".join(f'<th class="{"l" if c in left else ""}">{esc(c)}</th>' for c in cols)
    body = []
    for rec in df.head(max_rows).itertuples(index=False):
        body.append("<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{_cell(v)}</td>' for c, v in zip(cols, rec)) + "</tr>")
    more = f"<p>… {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(Path(path).name)}" src="data:image/png;base64,{data}">'


def _verdict_section(verdicts: dict | None) -> str:
    if verdicts is None:
        return '<div class="banner none">not validated — run <code>mi300x-cert validate RUN_DIR</code> first</div>'
    ok = bool(verdicts.get("success"))
    out = [f'<div class="banner {"pass" if ok else "fail"}">{"PASS — every suite met its expectations" if ok else "FAIL — expectations failed"}'
           f' (thresholds: {esc(verdicts.get("thresholds"))})</div>']
    rows = []
    suites = verdicts.get("suites") or {}
    for name, v in suites.items():
        status = v.get("status") or ("passed" if v.get("success") else "failed")
        cls = {"passed": "pass", "failed": "fail", "skipped": "skip"}.get(status, "fail")
        rows.append(f'<tr><td class="l">{esc(name)}</td><td class="l {cls}">{esc(status.upper())}</td>'
                    f'<td>{esc(v.get("evaluated"))}</td><td>{esc(v.get("declared"))}</td>'
                    f'<td>{len(v.get("failures") or [])}</td><td class="l">{esc(v.get("reason") or "")}</td></tr>')
    for f in verdicts.get("run_problems") or []:
        rows.append(f'<tr><td class="l">run</td><td class="l fail">FAILED</td><td></td><td></td><td>1</td>'
                    f'<td class="l">{esc(f.get("reason"))}</td></tr>')
    for name in verdicts.get("not_validated") or []:
        rows.append(f'<tr><td class="l">{esc(name)}</td><td class="l fail">NOT VALIDATED</td><td></td><td></td><td></td><td></td></tr>')
    out.append('<table><thead><tr><th class="l">suite</th><th class="l">verdict</th><th>evaluated</th><th>declared</th>'
               '<th>failures</th><th class="l">note</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")
    failures = [f for v in suites.values() for f in (v.get("failures") or [])]
    if failures:
        out.append("<h3>Failed expectations (observed vs expected)</h3>")
        frows = []
        for f in failures[:300]:
            obs = f.get("observed")
            if f.get("unit") == "°C" and isinstance(obs, (int, float)):
                obs = c_f(obs)
            elif f.get("unit") == "Δ°C" and isinstance(obs, (int, float)):
                obs = f"{format_dc(obs)} difference"
            elif isinstance(obs, dict):
                obs = json.dumps(obs)
            frows.append(f'<tr><td class="l">{esc(f.get("suite"))}</td><td class="l">{esc(f.get("expectation"))}</td>'
                         f'<td class="l">{esc(f.get("subject") or "")}</td><td class="l">{esc(f.get("column") or "")}</td>'
                         f'<td class="l">{esc(obs)}</td><td class="l">{esc(f.get("expected") or "")}</td>'
                         f'<td class="l">{esc(f.get("reason"))}</td></tr>')
        out.append('<table><thead><tr><th class="l">suite</th><th class="l">expectation</th><th class="l">card / config / case</th>'
                   '<th class="l">column</th><th class="l">observed</th><th class="l">expected</th><th class="l">reason</th></tr></thead>'
                   f'<tbody>{"".join(frows)}</tbody></table>')
    docs = verdicts.get("data_docs")
    if docs:
        # the report is report/index.html of the run directory (and of artifacts/ in the bundle): a
        # relative link works on disk, from S3 and through the console alike
        out.append(f'<p>Great Expectations Data Docs: <a href="../{esc(docs)}"><code>{esc(docs)}</code></a> '
                   "(relative to the run directory)</p>")
    return "\n".join(out)


def render_page(*, title: str, meta: dict, figures: list, sections: list[tuple[str, str]], verdicts: dict | None) -> str:
    """Assemble the page. ``sections`` are (heading, inner HTML) pairs placed after the figures."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    parts.append("<table>" + "".join(f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>' for k, v in meta.items()) + "</table>")
    parts.append("<h2>Verdicts</h2>" + _verdict_section(verdicts))
    parts.append("<h2>Figures</h2>")
    for f in figures:
        missing = f'<br><span class="missing">not drawn: {esc(f.missing)}</span>' if f.missing else ""
        parts.append(f"<figure>{_img(f.path)}<figcaption><b>Figure {f.number}: {esc(f.title)}.</b> {esc(f.caption)}{missing}</figcaption></figure>")
    for heading, inner in sections:
        parts.append(f"<h2>{esc(heading)}</h2>{inner}")
    parts.append("</body></html>")
    return "\n".join(parts)
