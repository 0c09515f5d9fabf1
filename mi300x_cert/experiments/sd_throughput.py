"""Experiment two: Stable Diffusion throughput over process counts × batch configs × repetitions.

Case ``p<N>-b<BxM>-r<k>``: ``N`` processes, each on its own card (the first ``N`` cards of the
experiment's card set; shared round-robin only when ``procs_per_card`` allows it), each generating
``M`` batches of ``B`` images. Statistics: the reference MI300X validation report's Appendix A and B tables.
"""

from __future__ import annotations

from typing import Any

from ..config import Profile, parse_batch_config
from . import register
from .base import Experiment

__all__ = ["SDThroughput"]


def sd_params(profile: Profile) -> dict:
    sd = profile.sd
    return {"model": sd.model, "dtype": profile.dtype, "path": profile.path, "attention": profile.attention,
            "seed": profile.seed, "height": sd.height, "width": sd.width, "steps": sd.steps,
            "guidance": sd.guidance, "scheduler": sd.scheduler, "prompts": sd.prompts}


@register("sd-throughput")
class SDThroughput(Experiment):
    kind = "sd"
    spec_attr = "sd_throughput"

    def model_source(self, profile: Profile) -> str:
        return profile.sd.model

    def cases(self, profile: Profile) -> list[dict]:
        spec = profile.experiments.sd_throughput
        cards = self.cards(profile)
        out = []
        for n in spec.process_counts:
            assigned = self.assign_cards(n, cards, spec.procs_per_card, f"sd-throughput process count {n}")
            for label in spec.batch_configs:
                bc = parse_batch_config(label)
                for r in range(1, spec.repetitions + 1):
                    out.append({"case_id": f"p{n}-b{bc.label}-r{r}", "experiment": self.name, "process_count": n,
                                "batch_config": bc.label, "batch_size": bc.batch_size, "n_batches": bc.n_batches,
                                "repetition": r, "cards": [c for c, _ in assigned],
                                "shared": [s for _, s in assigned]})
        return out

    def workload_params(self, profile: Profile, case: dict) -> dict:
        return sd_params(profile)

    def conditions(self, profile: Profile) -> dict:
        spec = profile.experiments.sd_throughput
        return {**super().conditions(profile), "process_counts": spec.process_counts,
                "batch_configs": spec.batch_configs, "repetitions": spec.repetitions,
                "cards": self.cards(profile), "procs_per_card": spec.procs_per_card,
                "batch_config_convention": "BxN = N batches of B images per process",
                "height": profile.sd.height, "width": profile.sd.width, "steps": profile.sd.steps,
                "guidance": profile.sd.guidance, "scheduler": profile.sd.scheduler}

    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        from ..rundir import atomic_write_text
        from ..stats import appendix_tables, long_table, write_tables

        tables = appendix_tables(rows, accelerator=accelerator)
        paths = write_tables(tables, rd.root / "stats")
        atomic_write_text(rd.root / "stats" / "sd_throughput_long.csv", long_table(rows).to_csv(index=False))
        return {"tables": [f"stats/{p.name}" for p in paths] + ["stats/sd_throughput_long.csv"]}
