"""Experiment one: bare-metal validation — card groups activated one after another.

One case per group (``g<i>-c<cards>``, in the profile's order, e.g. ``[12-15]`` then ``[0-3]`` then
the 8-card set), each with phases ``idle`` (nothing running, ``idle_s``) → ``load`` (workers load
and warm up) → ``active`` (every card of the group repeats Stable Diffusion batches until
``active_s`` has passed, at least one batch) → ``cooldown`` (``cooldown_s``). Telemetry of every
card and the network are recorded throughout; the thermal and network verdicts read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..specbase import ExperimentSection as _ExperimentBase
from . import register
from .base import Experiment, card_label
from .sd_throughput import sd_params

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["BareMetal", "THERMAL_TABLE", "RECOVERY_TABLE", "THERMAL_TABLE_COLUMNS", "thermal_tables", "recovery_s",
           "thermal_params"]

THERMAL_TABLE = "stats/bare_metal_thermal.csv"  # the thermal verdict's table: one row per card × role
RECOVERY_TABLE = "stats/bare_metal_recovery.csv"  # each loaded card's cool-down after its (last) active segment
THERMAL_TABLE_COLUMNS = ["subject", "card", "role", "samples", "junction_readable", "memory_readable",
                         "junction_mean_c", "junction_p95_c", "junction_max_c", "memory_mean_c", "memory_max_c",
                         "junction_mean_f", "junction_p95_f", "junction_max_f", "memory_max_f", "idle_mean_c",
                         "delta_active_idle_c", "throttle_events", "power_mean_w"]
RECOVERY_COLUMNS = ["card", "seconds", "junction_c"]


def _segments(events, problems: list[str]) -> list[dict]:
    """Phase segments from event markers: [{stem, t0, t1, phase, cards}]."""
    import math

    from ..validation.frames import _parse_cards

    segs: list[dict] = []
    if events is None or not {"t", "kind", "phase"}.issubset(events.columns):
        return segs
    ph = events[events["kind"].astype(str) == "phase"].sort_values(["stem", "t"])
    for stem, g in ph.groupby("stem", sort=False):
        rows = g.to_dict("records")
        for i, r in enumerate(rows):
            t1 = rows[i + 1]["t"] if i + 1 < len(rows) else math.inf
            segs.append({"stem": stem, "t0": float(r["t"]), "t1": float(t1), "phase": str(r["phase"]),
                         "cards": _parse_cards(r.get("cards"))})
    if not segs:
        problems.append("no phase markers (kind=phase) in events/bare-metal*.csv")
    return segs


def thermal_tables(run_dir: Any, profile: Any) -> tuple[Any, Any, list[str]]:
    """The thermal suite's metrics from the bare-metal telemetry (``telemetry/bare-metal*.csv``) and
    its phase markers (``events/bare-metal*.csv``), computed once at finalize:

    * the card × role table (:data:`THERMAL_TABLE_COLUMNS`): each sample gets a role — ``idle``,
      ``active`` (phase active, the card in the loaded group), ``unloaded`` (another group loaded),
      ``cooldown``; metrics derived from a column the telemetry lacks are left out;
    * the recovery curve (:data:`RECOVERY_COLUMNS`): per loaded card, the samples after the end of
      its last active segment at which its junction reached a new low (seconds after the end, °C);
      the first at or below idle mean + margin is its recovery time, whatever margin a verdict uses;
    * findings: unreadable streams, missing columns, no phase markers, and every card of a planned
      group without samples in one of its phases (fail closed).
    """
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from ..stats import truthy
    from ..validation.frames import _read_many, c_to_f

    run_dir = Path(run_dir)
    problems: list[str] = []
    tel = _read_many(run_dir, "telemetry", "bare-metal*.csv", problems,
                     ["t", "card", "phase", "junction_c", "memory_c", "throttle"])
    ev = _read_many(run_dir, "events", "bare-metal*.csv", problems, ["t", "kind", "phase", "cards"])
    segs = _segments(ev, problems)
    curve = pd.DataFrame(columns=RECOVERY_COLUMNS)
    if tel is None or not {"t", "card", "phase"}.issubset(tel.columns):
        return pd.DataFrame(columns=["subject"]), curve, problems
    tel = tel.sort_values("t").reset_index(drop=True)
    tel["card"] = tel["card"].astype(int)
    has_j, has_m = "junction_c" in tel.columns, "memory_c" in tel.columns
    for col in ("junction_c", "memory_c", "power_w"):
        if col in tel.columns:
            tel[col] = pd.to_numeric(tel[col], errors="coerce")

    # role of each sample: idle | active (this card loaded) | unloaded (another group loaded) | cooldown
    role = np.array(["other"] * len(tel), dtype=object)
    seg_id = np.full(len(tel), -1)
    tv, cv, sv = tel["t"].to_numpy(float), tel["card"].to_numpy(int), tel["stem"].to_numpy(object)
    for i, sg in enumerate(segs):
        m = (sv == sg["stem"]) & (tv >= sg["t0"]) & (tv < sg["t1"])
        seg_id[m] = i
        if sg["phase"] == "active":
            loaded = np.isin(cv, sg["cards"])
            role[m & loaded] = "active"
            role[m & ~loaded] = "unloaded"
        elif sg["phase"] in ("idle", "cooldown"):
            role[m] = sg["phase"]
    if not segs:  # no markers: fall back to the sampler's phase column, but active cards are unknown
        role = tel["phase"].astype(str).to_numpy(object)
    tel["role"] = role
    tel["seg"] = seg_id
    throttle = tel["throttle"].map(truthy) if "throttle" in tel.columns else None

    rows = []
    curves = []
    idle_means: dict[int, float] = {}
    if has_j:
        idle_means = tel[tel["role"] == "idle"].groupby("card")["junction_c"].mean().to_dict()
    for (card, r), g in tel[tel["role"].isin(["idle", "active", "unloaded", "cooldown"])].groupby(["card", "role"]):
        row: dict[str, Any] = {"subject": f"card {card} {r}", "card": int(card), "role": r, "samples": len(g)}
        if has_j:
            j = g["junction_c"]
            row.update(junction_readable=float(j.notna().mean()), junction_mean_c=j.mean(),
                       junction_p95_c=j.quantile(0.95) if j.notna().any() else np.nan, junction_max_c=j.max())
        if has_m:
            mm = g["memory_c"]
            row.update(memory_readable=float(mm.notna().mean()), memory_mean_c=mm.mean(), memory_max_c=mm.max())
        if "power_w" in g.columns:
            row["power_mean_w"] = g["power_w"].mean()
        if r == "active":
            if throttle is not None:
                row["throttle_events"] = int(throttle[g.index].sum())
            if has_j:
                idle = idle_means.get(card, np.nan)
                row["idle_mean_c"] = idle
                row["delta_active_idle_c"] = row["junction_mean_c"] - idle
                curves += [{"card": int(card), "seconds": sec, "junction_c": jc} for sec, jc in _cooldown(tel, card, g, segs)]
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in THERMAL_TABLE_COLUMNS:
        derived_from_missing = ((not has_j and ("junction" in col or col in ("idle_mean_c", "delta_active_idle_c")))
                                or (not has_m and "memory" in col) or (throttle is None and col == "throttle_events"))
        if col not in df.columns and not derived_from_missing:
            df[col] = np.nan
    if has_j:
        for col in ("junction_mean", "junction_max", "junction_p95"):
            df[f"{col}_f"] = df[f"{col}_c"].map(c_to_f)
    if has_m:
        df["memory_max_f"] = df["memory_max_c"].map(c_to_f)
    df = df[[c for c in THERMAL_TABLE_COLUMNS if c in df.columns]]
    if curves:
        curve = pd.DataFrame(curves, columns=RECOVERY_COLUMNS)
    _coverage(profile, tel, problems)
    return df, curve, problems


def _cooldown(tel, card: int, active, segs: list[dict]) -> list[tuple[float, float]]:
    """(seconds after the end of the card's last active segment, junction °C) of each sample of that
    card's stream after it at which the junction reached a new low (none: no marked active segment)."""
    seg_ids = sorted(set(int(s) for s in active["seg"] if s >= 0))
    if not seg_ids or not segs:
        return []
    end = segs[seg_ids[-1]]["t1"]
    after = tel[(tel["card"] == card) & (tel["t"] >= end) & (tel["stem"] == segs[seg_ids[-1]]["stem"])]
    after = after[after["junction_c"].notna()]
    out: list[tuple[float, float]] = []
    low = float("inf")
    for t, j in zip(after["t"], after["junction_c"]):
        if j < low:
            low = j
            out.append((float(t - end), float(j)))
    return out


def recovery_s(curve: Any, card: int, idle: float, margin: float) -> float:
    """Seconds from the end of the card's (last) active segment until its junction is within
    ``margin`` °C of its idle mean, from the recovery curve; NaN when it never gets there (or idle
    is unknown)."""
    if idle != idle:  # NaN
        return float("nan")
    pts = curve[curve["card"] == card]
    ok = pts[pts["junction_c"] <= idle + margin]
    return float(ok["seconds"].iloc[0]) if len(ok) else float("nan")


def _coverage(profile: Any, tel, problems: list[str]) -> None:
    """Samples of every card of every planned bare-metal group in each of its phases (idle, active,
    cooldown — a phase of zero length excepted)."""
    from ..validation.frames import planned_cases

    for case in planned_cases(profile, "bare-metal", problems):
        stem, cid, cards = f"bare-metal-{case['case_id']}", case["case_id"], [int(c) for c in case["cards"]]
        what = f"bare-metal group {cid} (cards {cards})"
        mine = tel[tel["stem"] == stem]
        roles = ["idle"] * (float(case.get("idle_s") or 0) > 0) + ["active"] + ["cooldown"] * (float(case.get("cooldown_s") or 0) > 0)
        for role in roles:
            have = set(int(c) for c in mine.loc[mine["role"] == role, "card"].unique())
            lacking = [c for c in cards if c not in have]
            if lacking and len(mine):
                problems.append(f"no {role} telemetry for card(s) {lacking} of {what} in telemetry/{stem}.csv")


def thermal_params(run_dir: Any) -> tuple[dict, str]:
    """The thermal parameters a reader of the tables applies (the recovery margin): those the
    thermal verdict used (``validation/thermal.json``), else the run's thresholds set; with where
    they came from. Empty when neither is available."""
    import json
    from pathlib import Path

    root = Path(run_dir)
    try:
        v = json.loads((root / "validation" / "thermal.json").read_text())
        if isinstance(v.get("params"), dict) and "recovery_margin_c" in v["params"]:
            return v["params"], "the thermal verdict's parameters"
    except (OSError, ValueError, AttributeError):
        pass
    try:
        from ..rundir import RunDir
        from ..validation import load_profile_params

        profile = RunDir(root).load_profile()
        params = load_profile_params(profile).get("thermal") or {}
        if "recovery_margin_c" in params:
            return params, f"thresholds set {profile.thresholds_set}"
    except Exception:  # no profile or no thresholds set: the reader says the margin is unknown
        pass
    return {}, ""


class BareMetalSpec(_ExperimentBase):
    groups: list[str | list[int]] = Field(default_factory=lambda: ["[12-15]", "[0-3]"], min_length=1)
    idle_s: float = Field(5.0, ge=0)
    active_s: float = Field(10.0, gt=0, description="minimum active time per group; batches repeat until reached")
    cooldown_s: float = Field(10.0, ge=0)
    batch_size: int = Field(1, gt=0)


@register("bare-metal")
class BareMetal(Experiment):
    spec_model = BareMetalSpec
    title = "Bare-metal SD phases"
    shown_tables = (THERMAL_TABLE, RECOVERY_TABLE)
    suites = ("thermal",)
    fanout = "serial"
    task_id = "bare_metal"
    follows_card_set = True

    baseline_policy = {"thermal": {"recovery_margin_c": 5.0, "max_throttle_events": 0, "min_sensor_readable": 0.98}}

    def baseline_frame_params(self, policy: dict) -> dict:
        return {"recovery_margin_c": float(policy["thermal"]["recovery_margin_c"])}

    def baseline_specs(self, policy: dict) -> list:
        margin = float(policy["thermal"]["recovery_margin_c"])
        return [
            ("thermal", "idle_min_c", "floor", "temperature", "junction_mean_c", "idle mean junction (coolest card)", False, {"role": "idle"}),
            ("thermal", "idle_max_c", "ceiling", "temperature", "junction_mean_c", "idle mean junction (warmest card)", True, {"role": "idle"}),
            ("thermal", "active_min_c", "floor", "temperature", "junction_p95_c", "active p95 junction (coolest loaded card)", False, {"role": "active"}),
            ("thermal", "active_max_c", "ceiling", "temperature", "junction_p95_c", "active p95 junction (hottest loaded card)", True, {"role": "active"}),
            ("thermal", "junction_limit_c", "ceiling", "temperature", "junction_max_c", "highest junction reading", True, None),
            ("thermal", "memory_limit_c", "ceiling", "temperature", "memory_max_c", "highest memory reading", True, None),
            ("thermal", "min_active_delta_c", "floor", "difference", "delta_active_idle_c", "active − idle mean junction (smallest)", False, {"role": "active"}),
            ("thermal", "recovery_max_s", "ceiling", "time", "recovery_s",
             f"seconds to within {margin:g} °C of idle after the load (slowest card)", True, {"role": "active"}),
        ]

    def card_fields(self, spec: Any) -> list[tuple[str, Any]]:
        return [(f"experiments.bare-metal.groups[{i}]", g) for i, g in enumerate(spec.groups)]

    def card_override(self, cards: Any) -> dict:
        return {"groups": [cards] if cards != "all" else ["all"]}
    kind = "sd"
    phased = True

    def model_source(self, profile: Profile) -> str:
        return profile.sd.model

    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:
        from pathlib import Path

        from ..validation.frames import thermal_frame

        return thermal_frame(Path(run_dir), profile, params)

    def cases(self, profile: Profile) -> list[dict]:
        spec = profile.experiments.bare_metal
        out = []
        for i, group in enumerate(spec.groups):
            cards = profile.cards(group)
            out.append({"case_id": f"g{i}-c{card_label(cards)}", "experiment": self.name, "group": i,
                        "cards": cards, "process_count": len(cards), "batch_size": spec.batch_size,
                        "batch_config": f"{spec.batch_size}x{spec.active_s:g}s", "repetition": 1,
                        "idle_s": spec.idle_s, "active_s": spec.active_s, "cooldown_s": spec.cooldown_s})
        return out

    def workload_params(self, profile: Profile, case: dict) -> dict:
        return sd_params(profile)

    def worker_plan(self, profile: Profile, case: dict) -> dict:
        return {"mode": "duration", "batch_size": int(case["batch_size"]), "min_s": float(case["active_s"])}

    def timeout_s(self, profile: Profile, case: dict) -> float:
        # the measured run lasts active_s by design; timeout_s is the margin for the last batch
        return float(case["active_s"]) + float(profile.experiments.bare_metal.timeout_s)

    def conditions(self, profile: Profile) -> dict:
        spec = profile.experiments.bare_metal
        return {**super().conditions(profile), "groups": [profile.cards(g) for g in spec.groups],
                "idle_s": spec.idle_s, "active_s": spec.active_s, "cooldown_s": spec.cooldown_s,
                "batch_size": spec.batch_size, "phases": ["idle", "load", "active", "cooldown", "done"],
                "height": profile.sd.height, "width": profile.sd.width, "steps": profile.sd.steps}

    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        import pandas as pd

        from ..rundir import atomic_write_text
        from ..stats import write_problems

        thermal, curve, problems = thermal_tables(rd.root, profile)
        atomic_write_text(rd.root / THERMAL_TABLE, thermal.to_csv(index=False))
        atomic_write_text(rd.root / RECOVERY_TABLE, curve.to_csv(index=False))
        found = write_problems(rd.root, THERMAL_TABLE, problems)

        recs = []
        for case in self.cases(profile):
            g = rows[rows["case_id"] == case["case_id"]] if len(rows) else rows
            lat = pd.to_numeric(g["latency_s"], errors="coerce") if len(g) else pd.Series(dtype=float)
            recs.append({"case_id": case["case_id"], "group": case["group"],
                         "cards": " ".join(str(c) for c in case["cards"]), "accelerator": accelerator,
                         "batches": int(len(g)), "images": int(pd.to_numeric(g["items"]).sum()) if len(g) else 0,
                         "active_s": (float(pd.to_numeric(g["t_end"]).max() - pd.to_numeric(g["t_start"]).min())
                                      if len(g) else None),
                         "latency_median_s": float(lat.median()) if len(lat) else None,
                         "per_image_median_s": float(pd.to_numeric(g["per_image_s"]).median()) if len(g) else None})
        table = pd.DataFrame(recs)
        atomic_write_text(rd.root / "stats" / "bare_metal_groups.csv", table.to_csv(index=False))
        return {"tables": ["stats/bare_metal_groups.csv", THERMAL_TABLE, RECOVERY_TABLE, found], "groups": recs}
