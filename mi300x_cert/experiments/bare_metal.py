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

__all__ = ["BareMetal"]


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
