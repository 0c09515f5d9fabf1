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

__all__ = ["WhisperTokens", "clip_count", "STATS"]

STATS = "stats/whisper_tokens.csv"  # per case: tokens, wall time, tokens/s (the verdict and the report read it)


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
    shown_tables = (STATS,)
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
        """``stats/whisper_tokens.csv``, the table the whisper verdict's tokens/s come from."""
        from pathlib import Path

        import pandas as pd

        from ..report.html import esc, table_html

        try:  # the experiment's own table, written once at finalize (the verdict reads it too)
            table = pd.read_csv(Path(run_dir) / STATS)
        except (OSError, ValueError):
            return f'<p class="missing">missing: {esc(STATS)}</p>'
        show = table.rename(columns={"case_id": "case", "tokens": "total tokens", "wall_s": "wall s",
                                     "total_tokens_per_s": "tokens/s (total)", "compute_tokens_per_s": "tokens/s (compute)",
                                     "tokens_per_s_per_gpu": "tokens/s per GPU"})
        return table_html(show, left=("case", "accelerator"))

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
        return {"tables": [STATS, "stats/whisper_summary.csv"], **overall}
