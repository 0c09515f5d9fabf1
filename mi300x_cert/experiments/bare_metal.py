"""Experiment one: bare-metal validation — card groups activated one after another.

One case per group (``g<i>-c<cards>``, in the profile's order, e.g. ``[12-15]`` then ``[0-3]`` then
the 8-card set), each with phases ``idle`` (nothing running, ``idle_s``) → ``load`` (workers load
and warm up) → ``active`` (every card of the group repeats Stable Diffusion batches until
``active_s`` has passed, at least one batch) → ``cooldown`` (``cooldown_s``). Telemetry of every
card and the network are recorded throughout; the thermal and network verdicts read them.
"""

from __future__ import annotations

from typing import Any

from ..config import Profile
from . import register
from .base import Experiment, card_label
from .sd_throughput import sd_params

__all__ = ["BareMetal"]


@register("bare-metal")
class BareMetal(Experiment):
    kind = "sd"
    spec_attr = "bare_metal"
    phased = True

    def model_source(self, profile: Profile) -> str:
        return profile.sd.model

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
        return {"tables": ["stats/bare_metal_groups.csv"], "groups": recs}
