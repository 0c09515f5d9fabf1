"""Experiment two: Stable Diffusion throughput over process counts × batch configs × repetitions.

Case ``p<N>-b<BxM>-r<k>``: ``N`` processes, each on its own card (the first ``N`` cards of the
experiment's card set; shared round-robin only when ``procs_per_card`` allows it), each generating
``M`` batches of ``B`` images. Statistics: the reference MI300X validation report's Appendix A and B tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from ..specbase import REPORT_BATCH_CONFIGS, REPORT_PROCESS_COUNTS, parse_batch_config
from ..specbase import ExperimentSection as _ExperimentBase
from . import register
from .base import Experiment

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["SDThroughput"]


def sd_params(profile: Profile) -> dict:
    sd = profile.sd
    return {"model": sd.model, "dtype": profile.dtype, "path": profile.path, "attention": profile.attention,
            "seed": profile.seed, "height": sd.height, "width": sd.width, "steps": sd.steps,
            "guidance": sd.guidance, "scheduler": sd.scheduler, "prompts": sd.prompts}


class SDThroughputSpec(_ExperimentBase):
    process_counts: list[int] = Field(default_factory=lambda: list(REPORT_PROCESS_COUNTS))
    batch_configs: list[str] = Field(default_factory=lambda: list(REPORT_BATCH_CONFIGS))
    repetitions: int = Field(1, gt=0)
    cards: str | list[int] = "all"
    procs_per_card: int = Field(1, gt=0, description=">1 shares one card between processes (labelled in results)")

    @field_validator("batch_configs")
    @classmethod
    def _bc(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("the SD matrix is empty: list at least one batch config BxN (e.g. 8x64), "
                             "or set enabled: false")
        return [parse_batch_config(x).label for x in v]

    @field_validator("process_counts")
    @classmethod
    def _pc(cls, v: list[int]) -> list[int]:
        if not v or any(p <= 0 for p in v):
            raise ValueError("process counts must be positive integers")
        return v


@register("sd-throughput")
class SDThroughput(Experiment):
    spec_model = SDThroughputSpec
    title = "SD throughput matrix"
    suites = ("latency",)
    fanout = "mapped"
    task_id = "sd"
    follows_card_set = True

    def utilization_rates(self, run_dir: Any) -> list[dict]:
        """Per process count × batch config: FLOPs per image / median per-image latency (one
        process per card) → TFLOP/s per card, against the matrix ceiling."""
        from pathlib import Path

        import pandas as pd

        from ..rundir import RunDir
        from ..utilization import workload_work

        root = Path(run_dir)
        flops = workload_work(root, self.name).get("flops_per_item")
        try:
            table = pd.read_csv(root / "stats" / "sd_throughput_long.csv")
            cases = self.cases(RunDir(root).load_profile())
        except (OSError, ValueError):
            return []
        out = []
        for r in table[table["metric"] == "per_image_s"].to_dict("records"):
            case = next((c for c in cases if int(c["process_count"]) == int(r["process_count"])
                         and c["batch_config"] == r["batch_config"]), None)
            cards = sorted(set(case["cards"])) if case else []
            shared = bool(case and len(set(case["cards"])) < len(case["cards"]))
            out.append({"workload": self.name, "case": f"N={int(r['process_count'])} {r['batch_config']}", "cards": cards,
                        "what": "text encoder + denoising + VAE decode",
                        "achieved": (flops / float(r["median"]) / 1e12) if flops and r["median"] else None,
                        "unit": "TFLOP/s", "ceiling_metric": "matrix_tflops",
                        "note": ("cards shared by several processes: per process, not per card" if shared else "")
                        or ("" if flops else "FLOPs per image not counted")})
        return out

    def baseline_specs(self, policy: dict) -> list:
        return [
            ("latency", "cv_max", "ceiling", "variation", "cv_per_image", "run-to-run variation std/mean (worst config)", True, {"kind": "config"}),
            ("latency", "min_per_card_scaling", "floor", "rate", "per_card_scaling", "per-card throughput at N ÷ at the baseline N (worst config)", False, {"kind": "config"}),
        ]
    kind = "sd"

    def model_source(self, profile: Profile) -> str:
        return profile.sd.model

    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:
        from pathlib import Path

        from ..validation.frames import latency_frame

        return latency_frame(Path(run_dir), profile, params)

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
