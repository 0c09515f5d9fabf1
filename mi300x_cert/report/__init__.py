"""The certification report of one run directory: ``report/index.html`` + ``report/figure<N>.png``.

    build_report(run_dir) -> Path of report/index.html

One self-contained HTML page (figures embedded as base64 PNG): verdicts with observed vs expected
values (from ``validation/verdicts.json``; "not validated" when absent), Figures 1–7, the thermal
summary per card in °C and °F, the Appendix A/B tables (``stats/*.csv``), each experiment plugin's
own section, the inventory and the conditions. A missing input never raises: its figure or section
says what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


__all__ = ["build_report"]

_STATS_ORDER = ("mean", "median", "std", "min", "max")
_STAT_TITLES = {"mean": "Mean", "median": "Median", "std": "Standard deviation", "min": "Minimum", "max": "Maximum"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _missing(what: str) -> str:
    from .html import esc

    return f'<p class="missing">missing: {esc(what)}</p>'


def _stats_section(run_dir: Path) -> tuple[str, str]:
    import pandas as pd

    from .html import esc, table_html

    sdir = run_dir / "stats"
    files = sorted(sdir.glob("*.csv")) if sdir.is_dir() else []
    if not files:
        return _missing("stats/*.csv (Appendix A/B tables)"), ""
    from ..experiments import all_experiments

    shown = {Path(t).stem for exp in all_experiments() for t in exp.shown_tables}  # in their own sections
    by_name = {f.stem: f for f in files if f.stem not in shown}
    a, b = [], []
    for stat in _STATS_ORDER:
        if f"appendix_a_{stat}" in by_name:
            a.append((f"{_STAT_TITLES[stat]} of normalized inference latency per image (s)", by_name.pop(f"appendix_a_{stat}")))
    for stat in _STATS_ORDER:
        for suffix, label in (("", ""), ("_overhead", " with overhead")):
            key = f"appendix_b_{stat}{suffix}"
            if key in by_name:
                b.append((f"{_STAT_TITLES[stat]} batch inference latency{label} (s)", by_name.pop(key)))
    left = ("N-processes", "Accelerator", "statistic", "accelerator", "case_id", "cards", "metric", "batch_config")

    def render(items):
        out = []
        for title, f in items:
            try:
                out.append(f"<h3>{esc(title)}</h3>" + table_html(pd.read_csv(f), left=left))
            except Exception as e:
                out.append(f"<h3>{esc(title)}</h3>" + _missing(f"{f.name} unreadable: {e}"))
        return "".join(out)

    appendix_a = render(a) or _missing("stats/appendix_a_*.csv")
    appendix_b = render(b) or _missing("stats/appendix_b_*.csv")
    other = render([(f.stem.replace("_", " "), f) for f in by_name.values()])
    return appendix_a, appendix_b + (("<h3>Other statistics</h3>" + other) if other else "")


def _thermal_section(run_dir: Path) -> str:
    """The thermal verdict's frame as the suite sees it: the bare-metal experiment's tables (written
    at finalize), recovery at the verdict's margin (else the thresholds set's)."""
    from ..experiments.bare_metal import thermal_params
    from .html import esc, table_html

    params, source = thermal_params(run_dir)
    try:
        from ..rundir import RunDir
        from ..validation.frames import thermal_frame

        try:
            profile = RunDir(run_dir).load_profile()
        except Exception:  # the evidence checks of planned groups need the stored profile; the numbers do not
            profile = None
        fr = thermal_frame(run_dir, profile, params)
    except Exception as e:
        return _missing(f"thermal summary could not be read: {type(e).__name__}: {e}")
    df = fr.df
    if df.empty or "junction_mean_c" not in df.columns:
        return _missing("bare-metal thermal table with junction temperatures") + "".join(_missing(p) for p in fr.problems)
    show = df[df["role"].isin(["idle", "active", "cooldown"])].copy()
    cols = {"card": "card", "role": "phase", "samples": "samples"}
    for c, label in (("junction_mean_c", "junction mean"), ("junction_p95_c", "junction p95"),
                     ("junction_max_c", "junction max"), ("memory_max_c", "memory max")):
        if c in show.columns:
            cols[c] = f"{label} °C"
            cols[c.replace("_c", "_f")] = f"{label} °F"
    for c, label in (("delta_active_idle_c", "active − idle °C"), ("recovery_s", "recovery s"), ("throttle_events", "throttle samples")):
        if c in show.columns:
            cols[c] = label
    order = [c for c in ("card", "role", "samples", "junction_mean_c", "junction_mean_f", "junction_p95_c", "junction_p95_f",
                         "junction_max_c", "junction_max_f", "memory_max_c", "memory_max_f", "delta_active_idle_c",
                         "recovery_s", "throttle_events") if c in show.columns]
    out = show[order].rename(columns=cols)
    margin = params.get("recovery_margin_c")
    recovery = (f"recovery s = seconds from the end of the card's load until its junction is within "
                f"{float(margin):g} °C of its idle mean ({esc(source)})."
                if margin is not None else
                "recovery s: no thermal verdict and no thresholds set gave the margin; shown at 3 °C.")
    note = ("<p>Report bands (seed): idle 88–100 °F (31–38 °C), active 115–130 °F (46–54 °C). "
            "p95 = 95th percentile of the junction temperature while the card was loaded. "
            f"The numbers the thermal verdict judges (stats/bare_metal_thermal.csv); {recovery}</p>")
    return note + table_html(out, left=("phase",)) + "".join(_missing(p) for p in fr.problems)


def _experiment_sections(root: Path) -> list[tuple[str, str]]:
    """Each experiment plugin's own section (from its ``stats/`` tables), in its report order."""
    from ..experiments import all_experiments

    out = []
    for exp in sorted(all_experiments(), key=lambda e: e.report_order):
        try:
            html = exp.report_section(root)
        except Exception as e:  # a section never breaks the report: it says what is missing
            html = _missing(f"{exp.name} section could not be built: {type(e).__name__}: {e}")
        if html is not None:
            out.append((exp.report_title or exp.title, html))
    return out


def _utilization_section(root: Path) -> str:
    """``stats/utilization.csv`` as written when the run finished (the same rows are signed)."""
    import pandas as pd

    from .html import table_html

    try:
        df = pd.read_csv(root / "stats" / "utilization.csv")
    except (OSError, ValueError):
        return _missing("stats/utilization.csv (written when the run finishes)")
    note = ("<p>Each workload's achieved rate against the ceiling the ceilings experiment measured "
            "on the same cards in this run (matrix TFLOP/s: the better of float16/bfloat16, the card alone; "
            "HBM: BabelStream copy). Work per item is counted by the workload (FLOP counter, weight and "
            "key/value bytes); see docs/performance.md, Utilization.</p>")
    return note + table_html(df, left=("workload", "case", "cards", "what"))


def _network_section(run_dir: Path) -> str:
    """Which evidence decided the network verdict, the workers' namespaces, and the host's traffic
    (in enforced mode: background bytes of other processes, recorded and not judged)."""
    import pandas as pd

    from .html import esc, table_html

    verdict = _read_json(run_dir / "validation" / "network.json")
    ev = (verdict or {}).get("evidence")
    if not isinstance(ev, dict):
        return _missing("validation/network.json with its evidence (run `mi300x-cert validate`)")
    out = [f"<p><b>Isolation mode:</b> {esc(ev.get('mode'))}. <b>Decided by:</b> {esc(ev.get('decided_by'))}</p>",
           f"<p><b>Workers:</b> {esc(ev.get('workers'))}, in a namespace of their own: {esc(ev.get('workers_isolated'))} "
           f"(host namespace {esc(', '.join(ev.get('host_netns') or []) or 'not recorded')}; "
           f"{len(ev.get('namespaces') or [])} worker namespace(s))</p>"]
    bg = ev.get("background_bytes")
    if isinstance(bg, dict):
        out.append(f"<p><b>Background bytes</b> (host interfaces during active phases, other processes' traffic; "
                   f"reported, not judged): sent {float(bg.get('bytes_sent', 0)):,.0f} B, "
                   f"received {float(bg.get('bytes_recv', 0)):,.0f} B</p>")
    frame = run_dir / "validation" / "frames" / "network.csv"
    try:
        df = pd.read_csv(frame)
    except (OSError, ValueError):
        df = None
    if df is not None and "kind" in df.columns:
        host = df[df["kind"].isin(["background", "traffic_active"])]
        cols = [c for c in ("subject", "kind", "seconds", "bytes_sent", "bytes_recv", "idle_rate_sent_bps",
                            "idle_rate_recv_bps", "excess_bytes_sent", "excess_bytes_recv", "rate_basis") if c in host.columns]
        if len(host):
            out.append("<p>Host interface traffic during active phases against the same host's idle-phase rate:</p>"
                       + table_html(host[cols], left=("subject", "kind", "rate_basis")))
    return "".join(out)


def _inventory_section(run_dir: Path) -> str:
    import pandas as pd

    from .html import esc, table_html

    inv = _read_json(run_dir / "inventory.json")
    if not isinstance(inv, dict):
        return _missing("inventory.json")
    cards = inv.get("cards") or []
    rest = {k: v for k, v in inv.items() if k != "cards"}
    out = table_html(pd.DataFrame(cards), left=tuple(pd.DataFrame(cards).columns)) if cards else _missing("cards in inventory.json")
    return out + f"<pre>{esc(json.dumps(rest, indent=2, default=str))}</pre>"


def _conditions_section(run_dir: Path) -> str:
    from .html import esc

    cond = _read_json(run_dir / "conditions.json")
    if cond is None:
        return _missing("conditions.json")
    return f"<pre>{esc(json.dumps(cond, indent=2, default=str))}</pre>"


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/index.html`` and ``report/figure1.png`` … ``figure7.png``; return the HTML path.

    Raises RunDirError when ``run_dir`` is not a run directory; missing inputs become placeholders.
    """
    from ..errors import RunDirError
    from ..rundir import atomic_write_text
    from .figures import draw_all
    from .html import render_page

    root = Path(run_dir)
    if not (root / "run.json").is_file():
        raise RunDirError(f"{root} is not a run directory (no run.json)")
    meta = _read_json(root / "run.json") or {}
    out_dir = root / "report"
    figures = draw_all(root, out_dir)
    verdicts = _read_json(root / "validation" / "verdicts.json")
    appendix_a, appendix_b = _stats_section(root)
    sections = [
        ("Thermal summary per card (°C and °F)", _thermal_section(root)),
        ("Appendix A: per-image latency", appendix_a),
        ("Appendix B: batch latency", appendix_b),
        *_experiment_sections(root),
        ("Utilization against the measured ceilings of this run", _utilization_section(root)),
        ("Network isolation evidence", _network_section(root)),
        ("Inventory", _inventory_section(root)),
        ("Conditions", _conditions_section(root)),
    ]
    head = {"run": meta.get("run_id"), "host": meta.get("host"), "profile": meta.get("profile"), "sku": meta.get("sku"),
            "state": meta.get("state"), "started": meta.get("started"), "finished": meta.get("finished")}
    page = render_page(title=f"Certification report — {meta.get('host', '?')} — run {meta.get('run_id', '?')}",
                       meta=head, figures=figures, sections=sections, verdicts=verdicts)
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    path.chmod(0o644)  # served by the dashboard; atomic writes create 0600 files
    return path
