"""Experiment three: Whisper token throughput (compiled, forced number of new tokens per clip).

One case per repetition (``r<k>``); one process per card of the experiment's card set (the report
used one card), each transcribing the same ``clips`` clips in batches of ``batch_size`` (the last
batch holds the remainder). Summary like the report's: total tokens generated, tokens/s per GPU,
total tokens/s.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import INCLUDE_DIR, Profile
from . import register
from .base import Experiment

__all__ = ["WhisperTokens", "clip_count"]


def clip_count(clips: int) -> int:
    """``clips`` when positive, else the number of clips shipped in include/audio."""
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


@register("whisper")
class WhisperTokens(Experiment):
    kind = "whisper"
    spec_attr = "whisper"
    extra_columns = ["tokens_per_s"]

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
        atomic_write_text(rd.root / "stats" / "whisper_tokens.csv", pd.DataFrame(recs).to_csv(index=False))
        atomic_write_text(rd.root / "stats" / "whisper_summary.csv", pd.DataFrame([overall]).to_csv(index=False))
        return {"tables": ["stats/whisper_tokens.csv", "stats/whisper_summary.csv"], **overall}
