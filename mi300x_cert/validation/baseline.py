"""Calibration: derive a thresholds set (``expectations/params/<set>.yaml``) from reference runs.

    derive(run_dirs, policy=None, set_name=None) -> Baseline   the numbers and where each came from
    write_params(baseline, path)                                 the params file, every number traced
    baseline(run_dirs, out, policy=None, set_name=None) -> dict  both (the CLI ``mi300x-cert baseline``)

Rule (docs/verdicts.md, "Calibration"). For every measured parameter each reference run gives one
value — its worst case over the cards, configs or cases that parameter judges (the highest latency
or temperature, the lowest rate). Over the runs: ``center`` = median, ``spread`` = max − min.

* floors (rates: ``min_tokens_per_s``, ``min_images_per_s``, ``min_per_card_scaling``; lower
  temperature-band edges ``idle_min_c``, ``active_min_c``; ``min_active_delta_c``):
  ``center − margin``;
* ceilings (latency ``per_image_max_s*``, ``cv_max``; temperatures ``idle_max_c``,
  ``active_max_c``, ``junction_limit_c``, ``memory_limit_c``; ``recovery_max_s``):
  ``center + margin``;
* ``margin = max(2 × spread, floor_margin)``: ``floor_margin`` is 15 % of the center for rates and
  latency, 5 °C for temperatures, 50 % of the center for the active−idle difference, 50 % of the
  center but at least 10 s for the recovery time (samples and fan response are coarser than a
  short reference cooldown), 100 % of the center (at least 0.02) for the run-to-run variation.

A value is never derived from a run that is not ``complete`` or whose metric is missing: that is an
error naming the run and the metric, and no file is written. Parameters that are limits of policy,
not measurements (``max_throttle_events``, ``min_sensor_readable``, ``recovery_margin_c``, the
network bounds) are copied from ``policy`` (a params file) or the defaults below, and marked so.
The file carries, beside every number, a comment with its rule and values, and a ``sources:``
block (ignored by the validator, which reads ``suites`` only) with each value's run, cards and date.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ValidationError

__all__ = ["POLICY_DEFAULTS", "Baseline", "derive", "write_params", "baseline"]

# limits of policy: not measured, the same for every set unless a policy file says otherwise
def _policy_defaults() -> dict[str, dict[str, Any]]:
    from ..experiments import all_experiments

    out: dict[str, dict[str, Any]] = {}
    for exp in all_experiments():  # each experiment plugin's limits of policy for its suites
        out.update({s: dict(v) for s, v in exp.baseline_policy.items()})
    out["network"] = {"max_external_bytes_sent": 65536, "max_external_bytes_recv": 65536, "max_external_connections": 0,
                      "max_namespace_external_bytes": 0}
    return out


POLICY_DEFAULTS: dict[str, dict[str, Any]] = _policy_defaults()

# parameter → (suite, direction, margin kind, frame selector, column, description)
_KINDS = {
    "rate": ("relative", 0.15),
    "latency": ("relative", 0.15),
    "temperature": ("absolute", 5.0),
    "difference": ("relative", 0.50),
    "time": ("time", 0.50),
    "variation": ("variation", 1.0),
}


@dataclass
class _Param:
    suite: str
    name: str
    direction: str  # floor | ceiling
    kind: str       # key of _KINDS
    what: str       # the metric, in words
    values: list[dict] = field(default_factory=list)  # one per run: {run, value, subject, ...}
    value: float | None = None
    center: float | None = None
    spread: float | None = None
    margin: float | None = None


@dataclass
class Baseline:
    set_name: str
    sku: str
    path: str
    runs: list[dict]
    params: dict[str, dict[str, Any]]           # suite → name → value (what the validator reads)
    sources: dict[str, dict[str, Any]]          # "suite.name" → provenance
    comments: dict[str, str]                    # "suite.name" → one-line comment
    policy_source: str


def _round(x: float, up: bool) -> float:
    """Four significant digits, rounded away from the judged values (floors down, ceilings up)."""
    if x == 0 or not math.isfinite(x):
        return x
    digits = 3 - int(math.floor(math.log10(abs(x))))
    f = 10 ** digits
    return (math.ceil(x * f) if up else math.floor(x * f)) / f


def _run_info(rd: Any, profile: Any) -> dict:
    meta = rd.meta
    try:
        inv = rd.read_json("inventory.json")
    except Exception:
        inv = {}
    cards = [{"index": c.get("index"), "name": c.get("name"), "serial": c.get("serial")}
             for c in (inv.get("cards") or []) if isinstance(c, dict)]
    return {"run_id": meta.get("run_id"), "dir": rd.root.name, "host": meta.get("host"), "profile": profile.name,
            "sku": profile.sku, "path": profile.path, "started": meta.get("started"), "finished": meta.get("finished"),
            "state": meta.get("state"), "cards": cards}


def _worst(df, column: str, highest: bool, where: dict | None = None):
    import pandas as pd

    d = df
    for k, v in (where or {}).items():
        d = d[d[k] == v]
    if column not in d.columns:
        return None, None
    vals = pd.to_numeric(d[column], errors="coerce")
    if vals.isna().any() or not len(vals):
        bad = d.loc[vals.isna(), "subject"].tolist() if len(vals) else []
        return None, bad or ["no rows"]
    i = vals.idxmax() if highest else vals.idxmin()
    return float(vals[i]), str(d.loc[i, "subject"])


def derive(run_dirs: list[str | Path], policy: str | Path | None = None, set_name: str | None = None) -> Baseline:
    """The thresholds of the reference runs (see the module docstring); raises ValidationError naming
    the run and the metric when a value cannot be derived, before anything is written."""
    import yaml

    from ..rundir import RunDir
    from .frames import build_frame

    if not run_dirs:
        raise ValidationError("baseline needs at least one reference run directory")
    pol = {s: dict(v) for s, v in POLICY_DEFAULTS.items()}
    policy_source = "defaults of mi300x_cert.validation.baseline.POLICY_DEFAULTS"
    if policy:
        try:
            data = yaml.safe_load(Path(policy).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValidationError(f"--policy {policy}: cannot be read: {e}") from None
        suites = data.get("suites") if isinstance(data, dict) else None
        if not isinstance(suites, dict):
            raise ValidationError(f"--policy {policy}: needs a 'suites' mapping like a params file")
        for s, names in pol.items():
            for n in names:
                if n in (suites.get(s) or {}):
                    names[n] = suites[s][n]
        policy_source = f"policy file {Path(policy).name}"
    runs, loaded = [], []
    for d in run_dirs:
        rd = RunDir(d)
        profile = rd.load_profile()
        info = _run_info(rd, profile)
        if info["state"] != "complete":
            raise ValidationError(f"{rd.root}: run state is {info['state']!r}, not 'complete': "
                                  "a reference run must be complete")
        runs.append(info)
        loaded.append((rd, profile, info))
    sets = {p.thresholds_set for _, p, _ in loaded}
    if len(sets) > 1 and not set_name:
        raise ValidationError(f"the reference runs belong to different thresholds sets {sorted(sets)} "
                              "(SKU and workload path): calibrate one set at a time, or name it with --set")
    first = loaded[0][1]
    name = set_name or first.thresholds_set

    params: list[_Param] = []

    def add(suite, pname, direction, kind, what):
        p = _Param(suite, pname, direction, kind, what)
        params.append(p)
        return p

    bc_params: dict[str, _Param] = {}
    for rd, profile, info in loaded:
        from ..experiments import all_experiments

        frames = {}
        specs: list[tuple[str, str, str, str, str, str, bool, dict | None]] = []
        for exp in all_experiments():  # each plugin says which of its metrics a reference run calibrates
            if not exp.enabled(profile) or not exp.suites:
                continue
            for suite in exp.suites:
                frames[suite] = build_frame(suite, rd.root, profile, exp.baseline_frame_params(pol))
            specs += exp.baseline_specs(pol)
        for suite, fr in frames.items():
            if fr.problems:
                raise ValidationError(f"{rd.root}: the {suite} evidence is incomplete ({'; '.join(fr.problems[:3])}): "
                                      "a reference run must have all of it")
        for suite, pname, direction, kind, col, what, highest, where in specs:
            p = next((x for x in params if x.suite == suite and x.name == pname), None) or add(suite, pname, direction, kind, what)
            value, subject = _worst(frames[suite].df, col, highest, where)
            if value is None:
                raise ValidationError(f"{rd.root}: cannot derive {suite}.{pname}: {col} is missing for {subject}")
            p.values.append({"run": info["run_id"], "dir": info["dir"], "value": value, "subject": subject,
                             "cards": [c.get("index") for c in info["cards"]], "date": info["started"]})
        if "latency" in frames:  # per batch config: the slowest median over the process counts
            df = frames["latency"].df
            cfg = df[df["kind"] == "config"]
            for bc in sorted(set(cfg["batch_config"].astype(str))):
                p = bc_params.get(bc) or _Param("latency", f"per_image_max_s_by_batch_config.{bc}", "ceiling", "latency",
                                                f"median per-image latency at {bc} (slowest process count)")
                bc_params[bc] = p
                value, subject = _worst(cfg, "median_per_image_s", True, {"batch_config": bc})
                if value is None:
                    raise ValidationError(f"{rd.root}: cannot derive the {bc} latency bound: median_per_image_s is missing for {subject}")
                p.values.append({"run": info["run_id"], "dir": info["dir"], "value": value, "subject": subject,
                                 "cards": [c.get("index") for c in info["cards"]], "date": info["started"]})
    all_params = params + list(bc_params.values())
    for p in all_params:
        if len(p.values) != len(loaded):
            missing = sorted({i["dir"] for i in runs} - {v["dir"] for v in p.values})
            raise ValidationError(f"{p.suite}.{p.name} is measured by some reference runs but not by {missing}: "
                                  "calibrate from runs of one profile")
        vals = [v["value"] for v in p.values]
        p.center = float(statistics.median(vals))
        p.spread = float(max(vals) - min(vals))
        how, k = _KINDS[p.kind]
        floor_margin = {"relative": k * abs(p.center), "absolute": k,
                        "variation": max(k * abs(p.center), 0.02), "time": max(k * abs(p.center), 10.0)}[how]
        p.margin = max(2.0 * p.spread, floor_margin)
        raw = p.center - p.margin if p.direction == "floor" else p.center + p.margin
        if p.kind in ("rate", "difference") and p.direction == "floor":
            raw = max(raw, 0.0)
        p.value = _round(raw, up=p.direction == "ceiling")

    out: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    comments: dict[str, str] = {}
    for p in all_params:
        key = f"{p.suite}.{p.name}"
        if p.name.startswith("per_image_max_s_by_batch_config."):
            out.setdefault("latency", {}).setdefault("per_image_max_s_by_batch_config", {})[p.name.split(".", 1)[1]] = p.value
        else:
            out.setdefault(p.suite, {})[p.name] = p.value
        how, k = _KINDS[p.kind]
        floor_txt = {"relative": f"{k:.0%} of the center", "absolute": f"{k:g} °C",
                     "variation": f"{k:.0%} of the center (≥ 0.02)", "time": f"{k:.0%} of the center (≥ 10 s)"}[how]
        rule = (f"{p.direction}: median {p.center:.6g} {'−' if p.direction == 'floor' else '+'} max(2 × spread {p.spread:.4g}, "
                f"{floor_txt}) = {p.value:g}")
        vals = ", ".join(f"{v['value']:.5g} ({v['dir']})" for v in p.values)
        comments[key] = f"{rule}; {p.what}: {vals}"
        sources[key] = {"rule": rule, "metric": p.what, "center": round(p.center, 6), "spread": round(p.spread, 6),
                        "margin": round(p.margin, 6),
                        "values": [{**v, "value": round(v["value"], 6)} for v in p.values]}
    if "latency" in out:
        by_bc = out["latency"].get("per_image_max_s_by_batch_config") or {}
        if by_bc:
            top = max(by_bc.values())
            out["latency"]["per_image_max_s"] = top
            comments["latency.per_image_max_s"] = "ceiling: the highest per-batch-config bound above"
            sources["latency.per_image_max_s"] = {"rule": "max of per_image_max_s_by_batch_config", "value": top}
    from ..experiments import all_experiments

    enabled_suites = set(out)
    for exp in all_experiments():
        if exp.enabled(first):
            enabled_suites |= set(exp.suites)
    for suite, names in pol.items():
        if suite == "network" or suite in enabled_suites:
            for n, v in names.items():
                out.setdefault(suite, {})[n] = v
                comments[f"{suite}.{n}"] = f"policy, not measured ({policy_source})"
                sources[f"{suite}.{n}"] = {"rule": "policy", "from": policy_source, "value": v}
    return Baseline(set_name=name, sku=first.sku, path=first.path, runs=runs, params=out, sources=sources,
                    comments=comments, policy_source=policy_source)


def _scalar(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def render(b: Baseline) -> str:
    """The params file text: header (runs, rule), ``suites`` with a comment beside every number,
    and the ``sources`` block."""
    import yaml

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Thresholds set {b.set_name} (SKU {b.sku}, workload path {b.path}), derived by `mi300x-cert baseline`",
             f"# on {now} from {len(b.runs)} reference run(s):"]
    for r in b.runs:
        cards = ", ".join(f"card {c.get('index')} {c.get('name')} serial {c.get('serial')}" for c in r["cards"]) or "no cards listed"
        lines.append(f"#   run {r['run_id']} (dir {r['dir']}), host {r['host']}, profile {r['profile']}, "
                     f"started {r['started']}: {cards}")
    lines += ["# Rule (docs/verdicts.md, Calibration): per run the worst value over the judged cards/configs/cases;",
              "# floor = median − margin, ceiling = median + margin, margin = max(2 × run-to-run spread, a minimum",
              "# per kind). Every number below says its rule and values; `sources:` lists runs, cards and dates",
              "# (the validator reads `suites` only).",
              f"set: {b.set_name}",
              f"description: {_scalar(f'{b.sku} on the {b.path} path, calibrated from {len(b.runs)} reference run(s)')}",
              "suites:"]
    from ..experiments import suite_names

    order = ["thermal", "latency", "network"] + [x for x in suite_names() if x not in ("thermal", "latency", "network")]
    for suite in [s for s in order if s in b.params] + [s for s in b.params if s not in order]:
        lines.append(f"  {suite}:")
        for n, v in b.params[suite].items():
            if isinstance(v, dict):
                lines.append(f"    {n}:")
                for k, x in v.items():
                    lines.append(f"      {k}: {_scalar(x)}   # {b.comments.get(f'{suite}.{n}.{k}', '')}")
                continue
            lines.append(f"    {n}: {_scalar(v)}   # {b.comments.get(f'{suite}.{n}', '')}")
    lines.append(yaml.safe_dump({"derivation": {"tool": "mi300x-cert baseline", "policy": b.policy_source,
                                                "runs": b.runs},
                                 "sources": b.sources}, sort_keys=False, allow_unicode=True, width=120).rstrip())
    return "\n".join(lines) + "\n"


def write_params(b: Baseline, out: str | Path) -> Path:
    from ..rundir import atomic_write_text

    text = render(b)
    import yaml

    check = yaml.safe_load(text)  # what the validator will read must be what we derived
    if check.get("suites") != b.params:
        raise ValidationError("internal: the rendered params file does not read back as derived")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out


def baseline(run_dirs: list[str | Path], out: str | Path, policy: str | Path | None = None,
             set_name: str | None = None) -> dict:
    """Derive and write; returns ``{"out", "set", "runs", "params"}``."""
    b = derive(run_dirs, policy=policy, set_name=set_name)
    path = write_params(b, out)
    return {"out": str(path), "set": b.set_name, "runs": [r["run_id"] for r in b.runs], "params": b.params}
