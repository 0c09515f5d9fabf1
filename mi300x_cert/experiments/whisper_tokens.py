"""Experiment three: Whisper token throughput (compiled, forced number of new tokens per clip).

One case per repetition (``r<k>``); one process per card of the experiment's card set (the report
used one card), each transcribing the same ``clips`` clips in batches of ``batch_size`` (the last
batch holds the remainder). Summary like the report's: total tokens generated, tokens/s per GPU,
total tokens/s.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..specbase import CompileSpec
from ..specbase import ExperimentSection as _ExperimentBase
from . import register
from .base import Experiment

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["WhisperTokens", "clip_count", "STATS", "BATCH_TABLE", "BATCH_COLUMNS", "batch_table"]

STATS = "stats/whisper_tokens.csv"  # per case: tokens, wall time, tokens/s (the verdict and the report read it)
BATCH_TABLE = "stats/whisper_batches.csv"  # per measured batch: tokens per clip vs the configured new_tokens
BATCH_COLUMNS = ["subject", "case_id", "proc", "card", "batch_index", "status", "clips", "tokens", "tokens_per_clip",
                 "configured_tokens"]
_BATCH_REQUIRED = ["case_id", "tokens", "items"]


def batch_table(rows: Any, planned: list[str], configured: int | None) -> tuple[Any, list[str]]:
    """Tokens per clip of every measured batch (warm-up excluded, every status: a failed batch has no
    tokens and so no tokens per clip), the numbers the whisper suite judges against the configured
    ``new_tokens`` (forced, no early stop). Returns (table with :data:`BATCH_COLUMNS`, problems): a
    column the rule needs missing from the rows, or a planned case without a measured batch, is a
    problem naming it (fail closed)."""
    import numpy as np
    import pandas as pd

    from ..stats import truthy

    problems = [f"missing column {c!r} in results/whisper/rows.csv" for c in _BATCH_REQUIRED if c not in rows.columns]
    if problems:
        return pd.DataFrame(columns=BATCH_COLUMNS), problems
    df = rows.copy()
    if "warmup" in df.columns:  # warm-up batches are not measurements
        df = df[~df["warmup"].map(truthy)]
    if "batch_index" in df.columns:
        df = df[pd.to_numeric(df["batch_index"], errors="coerce").fillna(0) >= 0]
    multi = "proc" in df.columns and df["proc"].nunique() > 1
    recs: list[dict] = []
    for i, r in enumerate(df.to_dict("records")):
        items = pd.to_numeric(pd.Series([r.get("items")]), errors="coerce").iloc[0]
        tokens = pd.to_numeric(pd.Series([r.get("tokens")]), errors="coerce").iloc[0]
        bi = r.get("batch_index", i)
        bi = i if pd.isna(bi) else int(bi)
        proc = r.get("proc")
        who = f" proc {int(proc)}" if multi and not pd.isna(proc) else ""
        recs.append({"subject": f"case {r['case_id']}{who} batch {bi}", "case_id": str(r["case_id"]),
                     "proc": proc, "card": r.get("card"), "batch_index": bi, "status": r.get("status"),
                     "clips": items, "tokens": tokens,
                     "tokens_per_clip": (tokens / items) if not pd.isna(items) and items else np.nan,
                     "configured_tokens": configured if configured is not None else np.nan})
    have = {str(c) for c in df["case_id"].dropna()}
    for cid in planned:
        if cid not in have:
            problems.append(f"planned whisper case {cid} has no measured batch in results/whisper/rows.csv")
    out = pd.DataFrame(recs, columns=BATCH_COLUMNS)
    for c in ("proc", "card", "batch_index"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    return out, problems


def clip_count(clips: int) -> int:
    """``clips`` when positive, else the number of clips shipped in include/audio."""
    from ..config import INCLUDE_DIR

    if clips > 0:
        return clips
    index = INCLUDE_DIR / "audio" / "clips.json"
    if index.is_file():
        try:
            n = len(json.loads(index.read_text()).get("clips", []))
            if n:
                return n
        except (json.JSONDecodeError, AttributeError):
            pass
    return max(1, len(list((INCLUDE_DIR / "audio").glob("*.wav"))))


class WhisperSpec(_ExperimentBase):
    model: str = "synthetic:whisper-large-v3"
    cards: str | list[int] = "[0]"
    batch_size: int = Field(16, gt=0)
    new_tokens: int = Field(128, gt=0, description="tokens generated per clip (forced, no early stop)")
    clips: int = Field(0, ge=0, description="0 = every clip in include/audio; more repeats them")
    repetitions: int = Field(1, gt=0)
    compile: CompileSpec = Field(default_factory=lambda: CompileSpec(enabled=True, mode="max-autotune"))


@register("whisper")
class WhisperTokens(Experiment):
    spec_model = WhisperSpec
    title = "Whisper token throughput"
    report_order = 30
    shown_tables = (STATS, BATCH_TABLE)
    suites = ("whisper",)
    fanout = "serial"
    kind = "whisper"
    extra_columns = ["tokens_per_s"]

    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:
        from pathlib import Path

        from ..validation.frames import whisper_frame

        return whisper_frame(Path(run_dir), profile, params)

    def utilization_rates(self, run_dir: Any) -> list[dict]:
        """Per case: the encoder (FLOPs per clip × clips/s per card, against the matrix ceiling) and
        decoding (bytes a token must read × tokens/s per card, against HBM bandwidth). Both rates
        use the whole generate() wall time, so each is a lower bound of its phase's own rate."""
        from pathlib import Path

        import pandas as pd

        from ..rundir import RunDir
        from ..utilization import workload_work

        root = Path(run_dir)
        work = workload_work(root, self.name)
        try:
            table = pd.read_csv(root / STATS)
            profile = RunDir(root).load_profile()
        except (OSError, ValueError):
            return []
        spec = self.spec(profile)
        cards = self.cards(profile)
        out = []
        for r in table.to_dict("records"):
            gpus = max(1, int(r.get("gpus") or 1))
            clips_s = float(r["clips"]) / float(r["wall_s"]) / gpus if r.get("wall_s") else None
            enc = work.get("encoder_flops_per_clip")
            out.append({"workload": self.name, "case": f"{r['case_id']} encoder", "cards": cards,
                        "what": "encoder FLOPs × clips/s (whole generate time)",
                        "achieved": (enc * clips_s / 1e12) if enc and clips_s else None, "unit": "TFLOP/s",
                        "ceiling_metric": "matrix_tflops", "note": "" if enc else "encoder FLOPs not counted"})
            wb, kv = work.get("decoder_weight_bytes"), work.get("cross_kv_bytes_per_clip")
            per_token = (wb / spec.batch_size + kv) if wb and kv else None
            tps = float(r["tokens_per_s_per_gpu"]) if r.get("tokens_per_s_per_gpu") == r.get("tokens_per_s_per_gpu") else None
            out.append({"workload": self.name, "case": f"{r['case_id']} decoding", "cards": cards,
                        "what": f"(decoder weights / batch {spec.batch_size} + cross-attention K/V per clip) × tokens/s",
                        "achieved": (per_token * tps / 1e9) if per_token and tps else None, "unit": "GB/s",
                        "ceiling_metric": "hbm_gbps", "note": "" if per_token else "bytes per token not counted"})
        return out

    def baseline_specs(self, policy: dict) -> list:
        return [("whisper", "min_tokens_per_s", "floor", "rate", "tokens_per_s", "tokens/s over a case's wall time (slowest case)", False, {"kind": "total"})]

    def report_section(self, run_dir: Any) -> str | None:
        """``stats/whisper_tokens.csv`` and ``stats/whisper_batches.csv``, the tables the whisper
        verdict's tokens/s and tokens per clip come from, as the suite judged them."""
        from pathlib import Path

        import pandas as pd

        from ..report.html import esc, table_html

        parts = []
        try:  # the experiment's own tables, written once at finalize (the verdict reads them too)
            table = pd.read_csv(Path(run_dir) / STATS)
            show = table.rename(columns={"case_id": "case", "tokens": "total tokens", "wall_s": "wall s",
                                         "total_tokens_per_s": "tokens/s (total)", "compute_tokens_per_s": "tokens/s (compute)",
                                         "tokens_per_s_per_gpu": "tokens/s per GPU"})
            parts.append(table_html(show, left=("case", "accelerator")))
        except (OSError, ValueError):
            parts.append(f'<p class="missing">missing: {esc(STATS)}</p>')
        try:
            batches = pd.read_csv(Path(run_dir) / BATCH_TABLE)
            show = batches[[c for c in BATCH_COLUMNS if c != "subject" and c in batches.columns]]
            parts.append("<p>Tokens per clip of every measured batch (warm-up excluded): the whisper verdict checks "
                         "each equals the configured new tokens (forced, no early stop).</p>")
            parts.append(table_html(show.rename(columns={"case_id": "case", "batch_index": "batch",
                                                         "tokens_per_clip": "tokens per clip",
                                                         "configured_tokens": "configured tokens"}),
                                    left=("case", "status")))
        except (OSError, ValueError):
            parts.append(f'<p class="missing">missing: {esc(BATCH_TABLE)}</p>')
        return "".join(parts)

    def _sizes(self, profile: Profile) -> list[int]:
        spec = profile.experiments.whisper
        n = clip_count(spec.clips)
        full, rest = divmod(n, spec.batch_size)
        return [spec.batch_size] * full + ([rest] if rest else [])

    def cases(self, profile: Profile) -> list[dict]:
        spec = profile.experiments.whisper
        cards = self.cards(profile)
        sizes = self._sizes(profile)
        return [{"case_id": f"r{r}", "experiment": self.name, "repetition": r, "cards": cards,
                 "process_count": len(cards), "batch_size": spec.batch_size, "n_batches": len(sizes),
                 "clips": sum(sizes), "batch_config": f"{spec.batch_size}x{len(sizes)}"}
                for r in range(1, spec.repetitions + 1)]

    def workload_params(self, profile: Profile, case: dict) -> dict:
        spec = profile.experiments.whisper
        return {"model": spec.model, "dtype": profile.dtype, "path": profile.path, "attention": profile.attention,
                "seed": profile.seed, "new_tokens": spec.new_tokens, "clips": case["clips"],
                "compile": spec.compile.model_dump()}

    def worker_plan(self, profile: Profile, case: dict) -> dict:
        return {"mode": "fixed", "batch_sizes": self._sizes(profile)}

    def extra_row(self, case: dict, msg: dict) -> dict:
        tok, lat = msg.get("tokens"), msg.get("latency_s")
        return {"tokens_per_s": (float(tok) / float(lat)) if tok is not None and lat else None}

    def conditions(self, profile: Profile) -> dict:
        spec = profile.experiments.whisper
        return {**super().conditions(profile), "cards": self.cards(profile), "batch_size": spec.batch_size,
                "new_tokens": spec.new_tokens, "clips": clip_count(spec.clips), "repetitions": spec.repetitions,
                "compile": spec.compile.model_dump()}

    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:
        import pandas as pd

        from ..rundir import atomic_write_text
        from ..stats import write_problems

        recs = []
        total_tokens = 0
        total_wall = 0.0
        gpus = len(self.cards(profile))
        for case in self.cases(profile):
            g = rows[rows["case_id"] == case["case_id"]] if len(rows) else rows
            if not len(g):
                continue
            tokens = int(pd.to_numeric(g["tokens"], errors="coerce").fillna(0).sum())
            wall = float(pd.to_numeric(g["t_end"]).max() - pd.to_numeric(g["t_start"]).min())
            compute = float(pd.to_numeric(g["latency_s"]).sum())
            total_tokens += tokens
            total_wall += wall
            recs.append({"case_id": case["case_id"], "repetition": case["repetition"], "accelerator": accelerator,
                         "gpus": gpus, "clips": case["clips"] * gpus, "tokens": tokens, "wall_s": wall,
                         "total_tokens_per_s": tokens / wall if wall > 0 else None,
                         "tokens_per_s_per_gpu": tokens / wall / gpus if wall > 0 else None,
                         "compute_tokens_per_s": tokens / compute if compute > 0 else None})
        overall = {"accelerator": accelerator, "gpus": gpus, "total_tokens": total_tokens,
                   "total_tokens_per_s": total_tokens / total_wall if total_wall > 0 else None,
                   "tokens_per_s_per_gpu": total_tokens / total_wall / gpus if total_wall > 0 else None}
        atomic_write_text(rd.root / STATS, pd.DataFrame(recs).to_csv(index=False))
        atomic_write_text(rd.root / "stats" / "whisper_summary.csv", pd.DataFrame([overall]).to_csv(index=False))
        batches, problems = batch_table(rows, [c["case_id"] for c in self.cases(profile)], int(self.spec(profile).new_tokens))
        atomic_write_text(rd.root / BATCH_TABLE, batches.to_csv(index=False))
        written = write_problems(rd.root, BATCH_TABLE, problems)
        return {"tables": [STATS, "stats/whisper_summary.csv", BATCH_TABLE, written], **overall}
