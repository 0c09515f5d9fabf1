"""``hardware-ceilings``: the card's own limits, so a weak card is caught even when no model notices.

What peers measure (ROCm Validation Suite GST/BABEL/PEBB/PBQT/IET, DCGM diag, SuperBench), with
vendor-neutral torch code (:mod:`mi300x_cert.workloads.ceilings`), per card:

* dense matrix TFLOP/s (float16, bfloat16; float8 where the card supports it),
* HBM bandwidth (BabelStream copy and triad),
* pinned host→device and device→host bandwidth, next to the link generation/width of the inventory,
* the peer-to-peer bandwidth of every card pair (domain from the inventory),
* sustained power under matrix load for ``power_s`` as a fraction of the board limit, with clocks and
  throttle events from telemetry.

Cases: ``alone-c<card>`` (each card by itself), ``all-c<cards>`` (every card at once, same tests),
``p2p`` (one worker that sees every card; planned only with two cards or more) and
``power-c<cards>`` (every card at once, for ``power_s``). The metric tables are computed once, at
finalize, into ``stats/hardware_ceilings*.csv``; the suite ``hardware-ceilings`` and the report
section read those tables and compute nothing of their own. See ``docs/hardware-ceilings.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..specbase import ExperimentSection
from . import register
from .base import Experiment, card_label

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["HardwareCeilings", "HardwareCeilingsSpec", "FLOOR_PARAMS", "SUITE"]

SUITE = "hardware-ceilings"
STATS = "stats/hardware_ceilings.csv"
STATS_P2P = "stats/hardware_ceilings_p2p.csv"
STATS_POWER = "stats/hardware_ceilings_power.csv"
# test → the thresholds parameter that is its floor (expectations/params/<set>.yaml)
FLOOR_PARAMS: dict[str, str] = {
    "gemm-float16": "gemm_float16_min_tflops", "gemm-bfloat16": "gemm_bfloat16_min_tflops",
    "gemm-float8": "gemm_float8_min_tflops", "hbm-copy": "hbm_copy_min_gbps", "hbm-triad": "hbm_triad_min_gbps",
    "h2d": "h2d_min_gbps", "d2h": "d2h_min_gbps",
}


class HardwareCeilingsSpec(ExperimentSection):
    cards: str | list[int] = "all"
    alone: bool = Field(True, description="measure each card by itself")
    all_at_once: bool = Field(True, description="measure every card at once (same tests)")
    dtypes: list[Literal["float16", "bfloat16", "float8"]] = Field(
        default_factory=lambda: ["float16", "bfloat16", "float8"], min_length=1)
    gemm_n: int = Field(8192, ge=64, description="matrix size n of the n×n×n products")
    iters: int = Field(20, gt=0, description="back-to-back repetitions timed per test")
    hbm_mib: int = Field(1024, gt=0, description="size of each of the three BabelStream arrays")
    pcie_mib: int = Field(256, gt=0, description="pinned host buffer copied to/from the card")
    p2p: bool = Field(True, description="peer-to-peer matrix of every card pair (needs two cards or more)")
    p2p_mib: int = Field(256, gt=0)
    power_s: float = Field(60.0, gt=0, description="sustained matrix load for the power figure")
    power_chunk_s: float = Field(0.5, gt=0)
    timeout_s: float = Field(600.0, gt=0, description="per worker process")


def _tests(spec: HardwareCeilingsSpec) -> list[str]:
    return [f"gemm-{d}" for d in spec.dtypes] + ["hbm-copy", "hbm-triad", "h2d", "d2h"]


@register("hardware-ceilings")
class HardwareCeilings(Experiment):
    kind = "ceilings"
    spec_model = HardwareCeilingsSpec
    title = "Hardware ceilings"
    suites = (SUITE,)
    fanout = "serial"
    extra_columns = ["mode", "test", "value", "unit", "supported"]
    report_order = 60
    follows_card_set = True
    has_model = False

    # ---- profile and plan -------------------------------------------------------------------
    def model_source(self, profile: Profile) -> str:
        return "none"

    def check(self, profile: Profile) -> None:
        self.cases(profile)

    def cases(self, profile: Profile) -> list[dict]:
        spec = self.spec(profile)
        cards = self.cards(profile)
        tests = _tests(spec)
        out: list[dict] = []
        base = {"experiment": self.name, "batch_size": 1, "repetition": 1}
        if spec.alone:
            out += [{**base, "case_id": f"alone-c{c}", "mode": "alone", "cards": [c], "tests": tests,
                     "n_batches": len(tests), "process_count": 1} for c in cards]
        if spec.all_at_once and len(cards) > 1:
            out.append({**base, "case_id": f"all-c{card_label(cards)}", "mode": "all", "cards": cards, "tests": tests,
                        "n_batches": len(tests), "process_count": len(cards)})
        if spec.p2p and len(cards) > 1:
            pairs = [f"p2p-{s}-{d}" for s in cards for d in cards if s != d]
            out.append({**base, "case_id": "p2p", "mode": "p2p", "cards": [cards[0]], "peers": cards, "tests": pairs,
                        "n_batches": len(pairs), "process_count": 1})
        out.append({**base, "case_id": f"power-c{card_label(cards)}", "mode": "power", "cards": cards,
                    "tests": ["power"], "n_batches": None, "process_count": len(cards)})
        return out

    # ---- running ------------------------------------------------------------------------------
    def _simulated(self, profile: Profile) -> dict | None:
        if profile.telemetry.backend != "simulated":
            return None
        from ..telemetry.simulated import default_domains

        sim = profile.telemetry.simulated
        return {"hbm_scale": {str(k): v for k, v in sim.hbm_scale.items()},
                "pcie_width": {str(k): v for k, v in sim.pcie_width.items()},
                "domains": profile.host.xgmi_domains or default_domains(profile.host.card_ids), "latency_s": 0.002}

    def workload_params(self, profile: Profile, case: dict) -> dict:
        spec = self.spec(profile)
        return {"tests": case["tests"], "gemm_n": spec.gemm_n, "iters": spec.iters, "hbm_bytes": spec.hbm_mib << 20,
                "pcie_bytes": spec.pcie_mib << 20, "p2p_bytes": spec.p2p_mib << 20,
                "power_chunk_s": spec.power_chunk_s, "simulated": self._simulated(profile)}

    def worker_plan(self, profile: Profile, case: dict) -> dict:
        if case["mode"] == "power":
            return {"mode": "duration", "batch_size": 1, "min_s": float(self.spec(profile).power_s)}
        return super().worker_plan(profile, case)

    def worker_specs(self, profile: Profile, case: dict) -> list[dict]:
        specs = super().worker_specs(profile, case)
        if case["mode"] == "p2p":
            for s in specs:
                s["all_cards_visible"] = True
        return specs

    def timeout_s(self, profile: Profile, case: dict) -> float:
        spec = self.spec(profile)
        return float(spec.timeout_s) + (float(spec.power_s) if case["mode"] == "power" else 0.0)

    def extra_row(self, case: dict, msg: dict) -> dict:
        return {"mode": case["mode"], "test": msg.get("test"), "value": msg.get("value"), "unit": msg.get("unit"),
                "supported": msg.get("supported")}

    def conditions(self, profile: Profile) -> dict:
        spec = self.spec(profile)
        return {"device": profile.device, "cards": self.cards(profile), "tests": _tests(spec),
                "gemm_n": spec.gemm_n, "iters": spec.iters, "hbm_mib": spec.hbm_mib, "pcie_mib": spec.pcie_mib,
                "p2p_mib": spec.p2p_mib, "power_s": spec.power_s, "warmup_batches": spec.warmup_batches,
                "timeout_s": spec.timeout_s, "simulated": profile.telemetry.backend == "simulated"}

    # ---- finalize: the metric tables (computed once) ----------------------------------------------
    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        import pandas as pd

        from ..rundir import atomic_write_text

        inv = _inventory_cards(rd.root)
        recs, p2p = [], []
        if len(rows):
            df = rows.copy()
            df["value"] = pd.to_numeric(df["value"], errors="coerce")
            for r in df[df["mode"].isin(["alone", "all"])].to_dict("records"):
                if not isinstance(r.get("test"), str):
                    continue
                card = int(r["card"])
                link = inv.get(card, {})
                supported = str(r.get("supported")).lower() not in ("false", "0")
                recs.append({"mode": r["mode"], "case_id": r["case_id"], "card": card, "test": r["test"],
                             "value": _f(r["value"]) if supported else None, "unit": r["unit"], "supported": supported,
                             "accelerator": accelerator, "link_gen": link.get("link_gen"),
                             "link_width": link.get("link_width"), "link_width_max": link.get("link_width_max")})
            for r in df[df["mode"] == "p2p"].to_dict("records"):
                parts = str(r["test"]).split("-")
                if len(parts) != 3 or parts[0] != "p2p":  # a row without its pair names no figure
                    continue
                _, src, dst = parts
                ds, dd = inv.get(int(src), {}).get("domain"), inv.get(int(dst), {}).get("domain")
                p2p.append({"src": int(src), "dst": int(dst), "src_domain": ds, "dst_domain": dd,
                            "same_domain": ds is not None and ds == dd, "gbps": _f(r["value"])})
        power = self._power_table(rd, profile, rows, inv)
        atomic_write_text(rd.root / STATS, pd.DataFrame(recs, columns=_STATS_COLS).to_csv(index=False))
        atomic_write_text(rd.root / STATS_P2P, pd.DataFrame(p2p, columns=_P2P_COLS).to_csv(index=False))
        atomic_write_text(rd.root / STATS_POWER, pd.DataFrame(power, columns=_POWER_COLS).to_csv(index=False))
        return {"tables": [STATS, STATS_P2P, STATS_POWER], "measurements": len(recs), "pairs": len(p2p)}

    def _power_table(self, rd: Any, profile: Profile, rows: Any, inv: dict) -> list[dict]:
        import pandas as pd

        case = next(c for c in self.cases(profile) if c["mode"] == "power")
        path = rd.root / "telemetry" / f"{self.name}-{case['case_id']}.csv"
        try:
            tel = pd.read_csv(path)
        except (OSError, ValueError):
            return []
        tel = tel[tel["phase"] == "active"]
        out = []
        tflops = {}
        if len(rows):
            pr = rows[rows["mode"] == "power"]
            for card, g in pr.groupby("card"):
                tflops[int(card)] = float(pd.to_numeric(g["value"], errors="coerce").median())
        for card in case["cards"]:
            g = tel[tel["card"] == card].sort_values("t")
            if g.empty:
                continue
            t0, t1 = float(g["t"].min()), float(g["t"].max())
            steady = g[g["t"] >= t0 + 0.2 * (t1 - t0)]  # the first fifth is the ramp
            pw = pd.to_numeric(steady["power_w"], errors="coerce")
            limit = inv.get(card, {}).get("power_limit_w")
            med = float(pw.median()) if pw.notna().any() else None
            reasons = sorted({x for v in g["throttle_reasons"].dropna().astype(str) for x in v.split("|") if x})
            out.append({"card": int(card), "seconds": round(t1 - t0, 3), "samples": int(len(steady)),
                        "power_median_w": med, "power_limit_w": limit,
                        "power_fraction": (med / float(limit)) if med is not None and limit else None,
                        "sclk_median_mhz": float(pd.to_numeric(steady["sclk_mhz"], errors="coerce").median()),
                        "sclk_min_mhz": float(pd.to_numeric(steady["sclk_mhz"], errors="coerce").min()),
                        "throttle_samples": int(g["throttle"].astype(str).str.lower().isin(["true", "1"]).sum()),
                        "throttle_reasons": "|".join(reasons), "tflops": tflops.get(int(card))})
        return out

    # ---- calibration: the measured floors; link, peer and throttle limits are policy ------------
    baseline_policy = {SUITE: {"min_link_gen": 5, "min_link_width": 16, "max_throttle_samples": 0,
                               "p2p_domain_min_gbps": 35.0, "p2p_cross_min_gbps": 25.0}}

    def baseline_specs(self, policy: dict) -> list:
        specs = [(SUITE, param, "floor", "rate", "value", f"{test} (slowest card, alone or all at once)", False, {"test": test, "kind": "ceiling"})
                 for test, param in FLOOR_PARAMS.items()]
        return specs + [(SUITE, "min_power_fraction", "floor", "rate", "power_fraction",
                         "sustained power / board limit (lowest card)", False, {"kind": "power"})]

    # ---- verdict: the frame from the tables ------------------------------------------------------
    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:
        import numpy as np
        import pandas as pd

        from ..validation.frames import Frame, _case_rows, _cases

        run_dir = Path(run_dir)
        problems: list[str] = []
        tables = {}
        for key, rel in (("main", STATS), ("p2p", STATS_P2P), ("power", STATS_POWER)):
            try:
                tables[key] = pd.read_csv(run_dir / rel)
            except (OSError, ValueError) as e:
                problems.append(f"missing or unreadable table {rel}: {type(e).__name__}")
                tables[key] = None
        rows: list[dict] = []
        main = tables["main"]
        planned = self.cases(profile) if profile is not None else []
        cards = sorted({c for case in planned for c in case["cards"]} | {c for case in planned for c in case.get("peers", [])})
        if main is not None:
            for r in main.to_dict("records"):
                ok = str(r.get("supported")).lower() not in ("false", "0")
                rows.append({"subject": f"card {int(r['card'])} {r['mode']} {r['test']}", "kind": "ceiling" if ok else "unsupported",
                             "mode": r["mode"], "card": int(r["card"]), "test": r["test"], "value": r["value"] if ok else np.nan,
                             "unit": r["unit"]})
            alone = main[main["mode"] == "alone"] if "mode" in main.columns else main
            for card in cards:
                g = alone[alone["card"] == card]
                first = g.iloc[0].to_dict() if len(g) else {}
                rows.append({"subject": f"card {card} host link", "kind": "link", "card": card,
                             "link_gen": _f(first.get("link_gen")), "link_width": _f(first.get("link_width")),
                             "link_width_max": _f(first.get("link_width_max"))})
        p2p = tables["p2p"]
        if p2p is not None:
            for r in p2p.to_dict("records"):
                same = str(r.get("same_domain")).lower() in ("true", "1")
                rows.append({"subject": f"peer {int(r['src'])}→{int(r['dst'])}", "kind": "p2p_domain" if same else "p2p_cross",
                             "card": int(r["src"]), "value": r["gbps"], "unit": "GB/s"})
        power = tables["power"]
        if power is not None:
            have = set(power["card"].astype(int)) if len(power) else set()
            for r in power.to_dict("records"):
                rows.append({"subject": f"card {int(r['card'])} sustained power", "kind": "power", "card": int(r["card"]),
                             "power_fraction": r["power_fraction"], "throttle_samples": r["throttle_samples"]})
            power_case = next((c for c in planned if c["mode"] == "power"), None)
            for card in (power_case or {}).get("cards", []):
                if card not in have:  # the plan is the checklist: no telemetry, no power figure
                    rows.append({"subject": f"card {card} sustained power", "kind": "power", "card": card,
                                 "power_fraction": np.nan, "throttle_samples": np.nan})
        rows += _case_rows(_cases(run_dir, self.name, problems, profile))
        out = pd.DataFrame(rows)
        for col in ("subject", "kind", "test", "case_status", "mode", "unit"):
            if col not in out.columns:
                out[col] = pd.Series([None] * len(out), dtype=object)
        for col in ("value", "link_gen", "link_width", "link_width_max", "power_fraction", "throttle_samples"):
            if col not in out.columns:
                out[col] = np.nan
        return Frame(suite, out, problems)

    # ---- report: per-card bars against the floor, the peer-to-peer heatmap ------------------------
    def report_section(self, run_dir: Any) -> str | None:
        return _report(Path(run_dir), self)

    def utilization_ceilings(self, run_dir: Any) -> dict[int, dict[str, float]]:
        """Per card: the measured ``matrix_tflops`` (best of float16/bfloat16, the card alone) and
        ``hbm_gbps`` (copy, the card alone), from ``stats/hardware_ceilings.csv``."""
        import pandas as pd

        try:
            df = pd.read_csv(Path(run_dir) / STATS)
        except (OSError, ValueError):
            return {}
        out: dict[int, dict[str, float]] = {}
        alone = df[df["mode"] == "alone"]
        for card, g in alone.groupby("card"):
            mm = pd.to_numeric(g[g["test"].isin(["gemm-float16", "gemm-bfloat16"])]["value"], errors="coerce").max()
            hbm = pd.to_numeric(g[g["test"] == "hbm-copy"]["value"], errors="coerce").max()
            out[int(card)] = {"matrix_tflops": float(mm), "hbm_gbps": float(hbm)}
        return out


_STATS_COLS = ["mode", "case_id", "card", "test", "value", "unit", "supported", "accelerator", "link_gen", "link_width",
               "link_width_max"]
_P2P_COLS = ["src", "dst", "src_domain", "dst_domain", "same_domain", "gbps"]
_POWER_COLS = ["card", "seconds", "samples", "power_median_w", "power_limit_w", "power_fraction", "sclk_median_mhz",
               "sclk_min_mhz", "throttle_samples", "throttle_reasons", "tflops"]


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


def _inventory_cards(root: Path) -> dict[int, dict]:
    try:
        inv = json.loads((root / "inventory.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {int(c["index"]): c for c in inv.get("cards") or [] if isinstance(c, dict) and c.get("index") is not None}


def _floors(root: Path) -> dict:
    try:
        from ..rundir import RunDir
        from ..validation import load_profile_params

        return load_profile_params(RunDir(root).load_profile()).get(SUITE, {})
    except Exception:
        return {}


def _report(root: Path, exp: HardwareCeilings) -> str:
    import pandas as pd

    from ..report.html import esc, table_html

    try:
        df = pd.read_csv(root / STATS)
    except (OSError, ValueError):
        return '<p class="missing">missing: stats/hardware_ceilings.csv</p>'
    floors = _floors(root)
    out = ["<p>Each bar is one card's measured figure (the card alone, and all cards at once); the "
           "line is the SKU floor from the thresholds set. These are the numbers the verdict judged.</p>"]
    for test, g in df.groupby("test", sort=False):
        floor = floors.get(FLOOR_PARAMS.get(str(test), ""), None)
        vals = pd.to_numeric(g["value"], errors="coerce")
        top = max([v for v in vals if v == v] + [float(floor or 0)] + [1e-9]) * 1.1
        unit = str(g["unit"].iloc[0])
        lines = [f"<h3>{esc(test)} ({esc(unit)}){' — floor ' + format(float(floor), '.4g') if floor is not None else ''}</h3>",
                 '<table class="bars">']
        for r in g.to_dict("records"):
            v = _f(r["value"])
            width = 0 if v is None else 100.0 * v / top
            bad = floor is not None and (v is None or v < float(floor))
            mark = 100.0 * float(floor) / top if floor is not None else None
            bar = (f'<div style="position:relative;background:#eee;height:14px;width:420px">'
                   f'<div style="background:{"#c0392b" if bad else "#2e86c1"};height:14px;width:{width:.1f}%"></div>'
                   + (f'<div style="position:absolute;top:-2px;left:{mark:.1f}%;width:2px;height:18px;background:#000"></div>'
                      if mark is not None else "") + "</div>")
            label = "not supported" if v is None else f"{v:.4g}"
            lines.append(f"<tr><td>card {int(r['card'])}</td><td>{esc(r['mode'])}</td><td>{bar}</td><td>{esc(label)}</td></tr>")
        out.append("".join(lines) + "</table>")
    links = df[(df["mode"] == "alone") & (df["test"] == "h2d")][["card", "link_gen", "link_width", "link_width_max", "value"]]
    if len(links):
        out.append("<h3>Host link (inventory) and host→device bandwidth</h3>"
                   + table_html(links.rename(columns={"value": "h2d GB/s"}), left=("card",)))
    try:
        p2p = pd.read_csv(root / STATS_P2P)
    except (OSError, ValueError):
        p2p = None
    if p2p is not None and len(p2p):
        cards = sorted(set(p2p["src"]) | set(p2p["dst"]))
        vmax = float(pd.to_numeric(p2p["gbps"], errors="coerce").max() or 1.0)
        cell = {(int(r["src"]), int(r["dst"])): _f(r["gbps"]) for r in p2p.to_dict("records")}
        head = "".join(f"<th>{c}</th>" for c in cards)
        body = []
        for s in cards:
            tds = []
            for d in cards:
                v = cell.get((s, d))
                if v is None:
                    tds.append('<td style="background:#ddd">—</td>')
                else:
                    shade = int(255 - 180 * (v / vmax if vmax else 0))
                    tds.append(f'<td style="background:rgb({shade},{shade},255)" title="{s}→{d}: {v:.4g} GB/s">{v:.0f}</td>')
            body.append(f"<tr><th>{s}</th>{''.join(tds)}</tr>")
        out.append("<h3>Peer-to-peer bandwidth (GB/s, row = source, column = destination)</h3>"
                   f'<table class="heatmap"><tr><th></th>{head}</tr>{"".join(body)}</table>')
    else:
        out.append("<p>Peer-to-peer matrix: not measured (one card, or disabled).</p>")
    try:
        power = pd.read_csv(root / STATS_POWER)
    except (OSError, ValueError):
        power = None
    if power is not None and len(power):
        floor = floors.get("min_power_fraction")
        out.append("<h3>Sustained power under matrix load" + (f" (floor {float(floor):.2f} of the board limit)" if floor is not None else "")
                   + "</h3>" + table_html(power, left=("card",)))
    return "".join(out)
