"""Appendix C extension: ResNet-50 inference over image size × batch size × mode (eager | compiled).

One case per combination (``s<size>-b<batch>-<mode>``), ``iterations`` measured batches per process,
one process per card of the experiment's card set. Table: images/s and latency per combination.
"""

from __future__ import annotations

from typing import Any

from ..config import Profile
from . import register
from .base import Experiment

__all__ = ["ResNet50"]


@register("resnet50")
class ResNet50(Experiment):
    kind = "resnet50"
    spec_attr = "resnet50"
    extra_columns = ["image_size", "mode", "images_per_s"]

    def cases(self, profile: Profile) -> list[dict]:
        spec = profile.experiments.resnet50
        cards = self.cards(profile)
        return [{"case_id": f"s{s}-b{b}-{m}", "experiment": self.name, "image_size": s, "batch_size": b, "mode": m,
                 "n_batches": spec.iterations, "batch_config": f"{b}x{spec.iterations}", "repetition": 1,
                 "cards": cards, "process_count": len(cards)}
                for s in spec.image_sizes for b in spec.batch_sizes for m in spec.modes]

    def workload_params(self, profile: Profile, case: dict) -> dict:
        spec = profile.experiments.resnet50
        comp = spec.compile.model_dump()
        comp["enabled"] = case["mode"] == "compiled"
        return {"model": spec.model, "dtype": profile.dtype, "path": profile.path, "seed": profile.seed,
                "image_size": case["image_size"], "mode": case["mode"], "compile": comp}

    def extra_row(self, case: dict, msg: dict) -> dict:
        items, lat = msg.get("items"), msg.get("latency_s")
        return {"image_size": case["image_size"], "mode": case["mode"],
                "images_per_s": (float(items) / float(lat)) if items and lat else None}

    def conditions(self, profile: Profile) -> dict:
        spec = profile.experiments.resnet50
        return {**super().conditions(profile), "cards": self.cards(profile), "image_sizes": spec.image_sizes,
                "batch_sizes": spec.batch_sizes, "modes": spec.modes, "iterations": spec.iterations,
                "compile": spec.compile.model_dump()}

    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        import pandas as pd

        from ..rundir import atomic_write_text

        recs = []
        for case in self.cases(profile):
            g = rows[rows["case_id"] == case["case_id"]] if len(rows) else rows
            if not len(g):
                continue
            lat = pd.to_numeric(g["latency_s"])
            items = float(pd.to_numeric(g["items"]).sum())
            recs.append({"image_size": case["image_size"], "batch_size": case["batch_size"], "mode": case["mode"],
                         "accelerator": accelerator, "batches": int(len(g)),
                         "images_per_s": items / float(lat.sum()) if lat.sum() > 0 else None,
                         "latency_mean_s": float(lat.mean()), "latency_median_s": float(lat.median()),
                         "latency_min_s": float(lat.min()), "latency_max_s": float(lat.max()),
                         "per_image_median_s": float(pd.to_numeric(g["per_image_s"]).median())})
        atomic_write_text(rd.root / "stats" / "resnet50.csv", pd.DataFrame(recs).to_csv(index=False))
        return {"tables": ["stats/resnet50.csv"], "combinations": len(recs)}
