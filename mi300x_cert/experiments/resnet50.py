"""Appendix C extension: ResNet-50 inference over image size × batch size × mode (eager | compiled).

One case per combination (``s<size>-b<batch>-<mode>``), ``iterations`` measured batches per process,
one process per card of the experiment's card set. Table: images/s and latency per combination.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing import Literal

from pydantic import Field

from ..specbase import CompileSpec
from ..specbase import ExperimentSection as _ExperimentBase
from . import register
from .base import Experiment

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["ResNet50"]


class ResNetSpec(_ExperimentBase):
    model: str = "synthetic:resnet-50"
    cards: str | list[int] = "[0]"
    image_sizes: list[int] = Field(default_factory=lambda: [224, 384, 512], min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32, 128], min_length=1)
    iterations: int = Field(10, gt=0)
    modes: list[Literal["eager", "compiled"]] = Field(default_factory=lambda: ["eager", "compiled"], min_length=1)
    compile: CompileSpec = Field(default_factory=lambda: CompileSpec(enabled=True, mode="default"))


@register("resnet50")
class ResNet50(Experiment):
    spec_model = ResNetSpec
    title = "ResNet-50 benchmark"
    report_order = 40
    report_title = "ResNet-50 throughput"
    suites = ("resnet50",)
    fanout = "serial"
    kind = "resnet50"
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
            recs.append({"case_id": case["case_id"], "image_size": case["image_size"], "batch_size": case["batch_size"], "mode": case["mode"],
                         "accelerator": accelerator, "batches": int(len(g)),
                         "images_per_s": items / float(lat.sum()) if lat.sum() > 0 else None,
                         "latency_mean_s": float(lat.mean()), "latency_median_s": float(lat.median()),
                         "latency_min_s": float(lat.min()), "latency_max_s": float(lat.max()),
                         "per_image_median_s": float(pd.to_numeric(g["per_image_s"]).median())})
        atomic_write_text(rd.root / STATS, pd.DataFrame(recs, columns=_COLS).to_csv(index=False))
        return {"tables": [STATS], "combinations": len(recs)}

    # ---- verdict and report: both read stats/resnet50.csv ------------------------------------------
    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:
        import numpy as np
        import pandas as pd

        from ..validation.frames import Frame, _case_rows, _cases

        run_dir = Path(run_dir)
        problems: list[str] = []
        rows: list[dict] = []
        try:
            table = pd.read_csv(run_dir / STATS)
        except (OSError, ValueError) as e:
            problems.append(f"missing or unreadable table {STATS}: {type(e).__name__}")
            table = None
        lacking = [c for c in ("case_id", "batches", "images_per_s", "mode", "image_size", "batch_size")
                   if table is not None and c not in table.columns]
        if lacking:  # a table of an earlier version: a problem, never a crash
            problems.append(f"table {STATS} lacks column(s) {lacking}: `mi300x-cert finalize RUN_DIR` computes it again")
            table = None
        if table is not None:
            for r in table.to_dict("records"):
                label = " ".join(f"{c}={r[c]}" for c in ("mode", "image_size", "batch_size"))
                rows.append({"subject": f"case {r['case_id']} ({label})", "kind": "throughput", "case_id": str(r["case_id"]),
                             "batches": r["batches"], "images_per_s": r["images_per_s"],
                             **{c: r[c] for c in ("mode", "image_size", "batch_size")}})
        rows += _case_rows(_cases(run_dir, self.name, problems, profile))
        out = pd.DataFrame(rows)
        for col in ("subject", "kind", "case_status"):
            if col not in out.columns:
                out[col] = pd.Series([None] * len(out), dtype=object)
        if table is not None and "images_per_s" not in out.columns:
            out["images_per_s"] = np.nan
        return Frame(suite, out, problems)

    def baseline_specs(self, policy: dict) -> list:
        return [("resnet50", "min_images_per_s", "floor", "rate", "images_per_s", "images/s per case (slowest case)", False, {"kind": "throughput"})]

    def report_section(self, run_dir: Any) -> str | None:
        import pandas as pd

        from ..report.html import table_html

        try:
            table = pd.read_csv(Path(run_dir) / STATS)
        except (OSError, ValueError):
            return f'<p class="missing">missing: {STATS}</p>'
        show = table[[c for c in ("case_id", "mode", "image_size", "batch_size", "batches", "latency_median_s",
                                  "images_per_s") if c in table.columns]]
        return table_html(show.rename(columns={"case_id": "case", "latency_median_s": "median batch s",
                                               "images_per_s": "images/s"}), left=("case", "mode"))

    def utilization_rates(self, run_dir: Any) -> list[dict]:
        """images/s per process × FLOPs per image → TFLOP/s, against the matrix ceiling."""
        import pandas as pd

        from ..rundir import RunDir
        from ..utilization import workload_work

        root = Path(run_dir)
        flops = workload_work(root, self.name).get("flops_per_item")
        try:
            table = pd.read_csv(root / STATS)
            cards = self.cards(RunDir(root).load_profile())
        except (OSError, ValueError):
            return []
        return [{"workload": self.name, "case": r["case_id"], "cards": cards, "what": "forward pass",
                 "achieved": (float(r["images_per_s"]) * flops / 1e12) if flops else None, "unit": "TFLOP/s",
                 "ceiling_metric": "matrix_tflops", "note": "" if flops else "FLOPs per image not counted"}
                for r in table.to_dict("records")]


STATS = "stats/resnet50.csv"
_COLS = ["case_id", "image_size", "batch_size", "mode", "accelerator", "batches", "images_per_s", "latency_mean_s",
         "latency_median_s", "latency_min_s", "latency_max_s", "per_image_median_s"]

