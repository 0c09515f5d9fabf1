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

__all__ = ["SDThroughput", "LATENCY_TABLE", "LATENCY_COLUMNS", "latency_table"]

LATENCY_TABLE = "stats/sd_latency.csv"  # the latency verdict's table (one row per process count × batch config)
LATENCY_COLUMNS = ["subject", "process_count", "batch_config", "n_rows", "failed_rows", "median_per_image_s",
                   "mean_per_image_s", "std_per_image_s", "min_per_image_s", "max_per_image_s", "cv_per_image",
                   "per_process_images_per_s", "cards_used", "baseline_process_count", "per_card_scaling"]
_REQUIRED = ["process_count", "batch_config", "per_image_s", "status"]


def _bc_key(bc: str) -> tuple:
    try:
        b, n = str(bc).lower().split("x")
        return (int(b), int(n))
    except ValueError:
        return (10**9, str(bc))


def latency_table(rows: Any, planned: list[tuple[int, str]]) -> tuple[Any, list[str]]:
    """The per-image latency statistics the latency suite judges, one row per planned or observed
    process count × batch config (columns :data:`LATENCY_COLUMNS`), from the measured rows
    (warm-up excluded; statistics over rows with status ok, ``failed_rows`` counts the others).
    Returns (table, problems); rows without the columns the statistics need give a table without
    them and a problem naming each missing column (fail closed)."""
    import numpy as np
    import pandas as pd

    from ..stats import truthy

    problems = [f"missing column {c!r} in results/sd-throughput/rows.csv" for c in _REQUIRED if c not in rows.columns]
    if not {"process_count", "batch_config", "per_image_s"}.issubset(rows.columns):
        return pd.DataFrame(columns=["subject"]), problems
    df = rows.copy()
    if "status" in df.columns:
        df["status"] = df["status"].astype(str)
    if "warmup" in df.columns:  # warm-up batches are not measurements
        df = df[~df["warmup"].map(truthy)]
    if "batch_index" in df.columns:
        df = df[pd.to_numeric(df["batch_index"], errors="coerce").fillna(0) >= 0]
    df["process_count"] = pd.to_numeric(df["process_count"], errors="coerce").astype("Int64")
    df["batch_config"] = df["batch_config"].astype(str)
    df["per_image_s"] = pd.to_numeric(df["per_image_s"], errors="coerce")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    keys = sorted(set(planned) | {(int(n), str(b)) for n, b in df[["process_count", "batch_config"]].dropna().itertuples(index=False)},
                  key=lambda k: (k[0], _bc_key(k[1])))
    recs: list[dict] = []
    medians: dict = {}
    cards_used: dict = {}
    for n, bc in keys:
        sel = ok[(ok["process_count"] == n) & (ok["batch_config"] == bc)]
        g = sel["per_image_s"].dropna()
        allg = df[(df["process_count"] == n) & (df["batch_config"] == bc)]
        med = float(g.median()) if len(g) else np.nan
        medians[(n, bc)] = med
        cards_used[(n, bc)] = int(sel["card"].nunique()) if "card" in sel.columns and len(sel) else n
        mean = float(g.mean()) if len(g) else np.nan
        std = float(g.std(ddof=1)) if len(g) > 1 else (0.0 if len(g) == 1 else np.nan)
        recs.append({
            "subject": f"N={n} {bc}", "process_count": n, "batch_config": bc, "n_rows": int(len(g)),
            "failed_rows": int((allg["status"] != "ok").sum()) if "status" in allg.columns else 0,
            "median_per_image_s": med, "mean_per_image_s": mean, "std_per_image_s": std,
            "min_per_image_s": float(g.min()) if len(g) else np.nan,
            "max_per_image_s": float(g.max()) if len(g) else np.nan,
            "cv_per_image": (std / mean) if len(g) and mean > 0 else np.nan,
            "per_process_images_per_s": (1.0 / med) if med and med == med and med > 0 else np.nan,
            "cards_used": cards_used[(n, bc)],
        })
    counts = sorted({n for n, _ in keys})
    base_n = 1 if 1 in counts else (counts[0] if counts else 1)
    # Throughput per card at N over throughput per card at the baseline: with one process per card
    # this is per-process scaling; processes sharing a card (shared_card rows) are judged by what
    # the card delivers, not by what each process gets.
    for r in recs:
        bc = r["batch_config"]
        base, med = medians.get((base_n, bc), np.nan), r["median_per_image_s"]
        base_cards, cards = cards_used.get((base_n, bc), base_n) or base_n, r["cards_used"] or r["process_count"]
        r["baseline_process_count"] = base_n
        if base == base and med == med and med > 0 and base > 0:
            r["per_card_scaling"] = ((r["process_count"] / med) / cards) / ((base_n / base) / base_cards)
        else:
            r["per_card_scaling"] = np.nan
    return pd.DataFrame(recs, columns=LATENCY_COLUMNS), problems


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
    report_order = 20
    report_title = "SD latency per configuration (the latency verdict's table)"
    shown_tables = (LATENCY_TABLE,)
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

    def planned_configs(self, profile: Profile) -> list[tuple[int, str]]:
        """(process count, batch config) pairs the profile plans: the latency table's checklist."""
        spec = profile.experiments.sd_throughput
        return [(int(n), str(bc)) for n in spec.process_counts for bc in spec.batch_configs]

    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        from ..rundir import atomic_write_text
        from ..stats import appendix_tables, long_table, write_problems, write_tables

        tables = appendix_tables(rows, accelerator=accelerator)
        paths = write_tables(tables, rd.root / "stats")
        atomic_write_text(rd.root / "stats" / "sd_throughput_long.csv", long_table(rows).to_csv(index=False))
        latency, problems = latency_table(rows, self.planned_configs(profile))
        atomic_write_text(rd.root / LATENCY_TABLE, latency.to_csv(index=False))
        written = write_problems(rd.root, LATENCY_TABLE, problems)
        return {"tables": [f"stats/{p.name}" for p in paths] + ["stats/sd_throughput_long.csv", LATENCY_TABLE, written]}

    def report_section(self, run_dir: Any) -> str | None:
        """The latency verdict's table as the suite judged it (``stats/sd_latency.csv``)."""
        from pathlib import Path

        import pandas as pd

        from ..report.html import esc, table_html

        try:
            table = pd.read_csv(Path(run_dir) / LATENCY_TABLE)
        except (OSError, ValueError):
            return f'<p class="missing">missing: {esc(LATENCY_TABLE)}</p>'
        show = table[[c for c in LATENCY_COLUMNS if c != "subject" and c in table.columns]]
        note = ("<p>Per process count × batch config, over every measured batch of every process and repetition "
                "(status ok; warm-up excluded): the numbers the latency verdict judges. cv = std/mean; per-card "
                "scaling = images/s per card at N ÷ at the baseline N.</p>")
        return note + table_html(show.rename(columns={
            "process_count": "N", "batch_config": "batch config", "n_rows": "batches", "failed_rows": "failed",
            "median_per_image_s": "median s/image", "mean_per_image_s": "mean s/image", "std_per_image_s": "std s/image",
            "min_per_image_s": "min s/image", "max_per_image_s": "max s/image", "cv_per_image": "cv",
            "per_process_images_per_s": "images/s per process", "cards_used": "cards",
            "baseline_process_count": "baseline N", "per_card_scaling": "per-card scaling"}), left=("batch config",))
