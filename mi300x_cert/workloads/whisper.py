"""Whisper speech-to-text workload (transformers ``WhisperForConditionalGeneration``).

One batch = ``batch_size`` speech clips from ``include/audio`` (repeated to fill the batch) →
log-mel features → greedy ``generate`` of exactly ``new_tokens`` tokens per clip (EOS is suppressed
until then: ``min_new_tokens == max_new_tokens``), so every batch does the same work whatever the
weights say. ``tokens`` counts generated tokens only (not the forced start/language/task tokens).

``latency_s`` is the ``generate`` call (synchronized); ``latency_overhead_s`` adds reading the clip
samples into the batch, feature extraction, the host→device copy and decoding the ids to text.
"""

from __future__ import annotations

import json
import time
import wave
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError, WorkerError
from .base import Workload, device_sync, repo_path

__all__ = ["WhisperWorkload", "load_clips", "read_wav", "word_error_rate"]

SAMPLE_RATE = 16000
DEFAULT_AUDIO_DIR = "include/audio"


def read_wav(path: Path) -> Any:
    """PCM WAV → float32 mono samples in [-1, 1] at 16 kHz (linear resampling if needed)."""
    import numpy as np

    try:
        with wave.open(str(path), "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise WorkerError(f"audio clip {path.name!r} is not a readable PCM WAV file: {e}") from e
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise WorkerError(f"audio clip {path.name!r}: unsupported sample width {width} bytes")
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    if sr != SAMPLE_RATE and len(x):
        n_out = int(round(len(x) * SAMPLE_RATE / sr))
        x = np.interp(np.linspace(0, len(x) - 1, n_out), np.arange(len(x)), x).astype(np.float32)
    return x


def load_clips(audio_dir: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Clips of ``audio_dir`` (ordered as in clips.json, else by file name) with reference text."""
    if not audio_dir.is_dir():
        raise WorkerError(f"audio directory {str(audio_dir)!r} does not exist")
    meta: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    index = audio_dir / "clips.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise WorkerError(f"{index.name} in the audio directory is not valid JSON: {e}") from e
        for c in data.get("clips", []):
            meta[c["file"]] = c
            order.append(c["file"])
    for p in sorted(audio_dir.glob("*.wav")):
        if p.name not in meta:
            order.append(p.name)
    clips = []
    for name in order:
        p = audio_dir / name
        if not p.is_file():
            raise WorkerError(f"clips.json lists {name!r} but the file is missing from the audio directory")
        samples = read_wav(p)
        clips.append({"file": name, "text": meta.get(name, {}).get("text"), "samples": samples,
                      "duration_s": len(samples) / SAMPLE_RATE})
    if not clips:
        raise WorkerError(f"audio directory {str(audio_dir)!r} has no .wav clips")
    if limit and limit > 0:
        clips = [clips[i % len(clips)] for i in range(limit)]
    return clips


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference length (lower-cased, punctuation dropped)."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


class WhisperWorkload(Workload):
    kind = "whisper"
    PRELOAD = ("torch", "numpy", "transformers:GenerationConfig,WhisperConfig,WhisperFeatureExtractor,"
               "WhisperForConditionalGeneration,WhisperTokenizer")

    def _load(self) -> None:
        import torch

        p = self.params
        self.new_tokens = int(p.get("new_tokens", 128))
        if self.new_tokens <= 0:
            raise WorkerError(f"new_tokens must be positive, got {self.new_tokens}")
        self.language = p.get("language", "en")
        self.attention = str(p.get("attention", "sdpa"))
        if self.attention not in ("sdpa", "eager"):
            raise WorkerError(f"attention {self.attention!r} is not one of sdpa, eager")
        self.clips = load_clips(repo_path(p.get("audio", DEFAULT_AUDIO_DIR)), int(p.get("clips", 0) or 0))

        from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

        src = self.source
        d = src.path
        src.require("config.json", what="a Whisper model directory")
        try:
            if src.synthetic:
                cfg = WhisperConfig.from_pretrained(d, local_files_only=True)
                torch.manual_seed(self.seed)
                with self.synthetic_init():
                    model = WhisperForConditionalGeneration._from_config(cfg, attn_implementation=self.attention)
                if (d / "generation_config.json").exists():
                    model.generation_config = GenerationConfig.from_pretrained(d, local_files_only=True)
            else:
                src.require_any(["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                 "pytorch_model.bin.index.json"], what="a Whisper model directory with weights")
                model = WhisperForConditionalGeneration.from_pretrained(
                    d, local_files_only=True, attn_implementation=self.attention
                )
            if (d / "preprocessor_config.json").exists():
                fe = WhisperFeatureExtractor.from_pretrained(d, local_files_only=True)
            else:
                fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelSourceError(f"cannot load Whisper from {src.label!r} ({d}): {e}") from e
        if fe.feature_size != model.config.num_mel_bins:
            raise ModelSourceError(
                f"{src.label!r}: feature extractor makes {fe.feature_size} mel bins but the model expects "
                f"{model.config.num_mel_bins}"
            )
        max_new = int(model.config.max_target_positions) - 4
        if self.new_tokens > max_new:
            raise WorkerError(f"new_tokens {self.new_tokens} exceeds what the decoder can hold ({max_new})")

        self.tokenizer = None
        if not src.synthetic and any((d / f).exists() for f in ("tokenizer.json", "vocab.json")):
            from transformers import WhisperTokenizer

            try:
                self.tokenizer = WhisperTokenizer.from_pretrained(d, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ModelSourceError(f"cannot load the Whisper tokenizer in {d}: {e}") from e

        model.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model = model
        self.feature_extractor = fe
        self._feature_cache: dict[Any, Any] = {}  # clip file -> log-mel features (see features)
        gc = model.generation_config
        self.generate_kwargs: dict[str, Any] = {
            "min_new_tokens": self.new_tokens,
            "max_new_tokens": self.new_tokens,
            "do_sample": False,
            "num_beams": 1,
        }
        lang_to_id = getattr(gc, "lang_to_id", None) or {}
        if getattr(gc, "is_multilingual", False) and self.language and f"<|{self.language}|>" in lang_to_id:
            self.generate_kwargs.update(language=self.language, task="transcribe")
        if getattr(gc, "no_timestamps_token_id", None) is not None:
            self.generate_kwargs["return_timestamps"] = False
        self.forced_prompt = self._forced_prompt()

        comp = dict(p.get("compile") or {})
        if comp.get("enabled"):
            backend = str(comp.get("backend", "inductor"))
            mode = str(comp.get("mode", "max-autotune"))
            self.model.forward = torch.compile(self.model.forward, backend=backend, mode=mode)
            self.compile_mode = f"{backend}:{mode}"
        self.last_text: list[str] | None = None

    def _forced_prompt(self) -> list[int]:
        """The decoder prompt generate() starts from (start, language, task, no-timestamps)."""
        gc = self.model.generation_config
        ids = [int(self.model.config.decoder_start_token_id)]
        if "language" in self.generate_kwargs:
            ids.append(int(gc.lang_to_id[f"<|{self.language}|>"]))
            ids.append(int(gc.task_to_id["transcribe"]))
        if self.generate_kwargs.get("return_timestamps") is False:
            ids.append(int(gc.no_timestamps_token_id))
        return ids

    # -- replaceable steps ---------------------------------------------------------------------
    def select_clips(self, batch_size: int, batch_index: int) -> list[dict[str, Any]]:
        start = max(batch_index, 0) * batch_size
        return [self.clips[(start + i) % len(self.clips)] for i in range(batch_size)]

    FEATURE_CACHE_CLIPS = 1024

    def features(self, clips: list[dict[str, Any]]) -> Any:
        """Log-mel features of a batch of clips. The clip list repeats cyclically over a few files,
        so each file's features are computed once (CPU, the model's dtype) and reused: a batch of
        hundreds of clips then costs a gather and one host→device copy instead of hundreds of
        STFTs on the host, which at large batches took as long as the card's whole decode."""
        import torch

        cache = self._feature_cache
        keys = [c.get("file") or id(c["samples"]) for c in clips]
        missing = {k: c for k, c in zip(keys, clips) if k not in cache}
        fresh: dict[Any, Any] = {}
        if missing:
            feats = self.feature_extractor(
                [c["samples"] for c in missing.values()], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features.to(self.dtype)
            fresh = dict(zip(missing, feats))
            if len(cache) + len(fresh) <= self.FEATURE_CACHE_CLIPS:
                cache.update(fresh)
        out = torch.stack([fresh[k] if k in fresh else cache[k] for k in keys])
        self.feature_cache_clips = len(cache)
        return out.to(self.device)

    def generate(self, features: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.generate(input_features=features, **self.generate_kwargs)

    def generated_ids(self, sequences: Any) -> Any:
        """The generated part of ``generate``'s output (the forced prompt stripped if present)."""
        k = len(self.forced_prompt)
        if sequences.shape[1] > self.new_tokens and sequences.shape[1] >= k:
            head = sequences[:, :k].tolist()
            if all(row == self.forced_prompt for row in head):
                return sequences[:, k:]
        return sequences

    def prepare(self, batch_size: int, batch_index: int) -> Any:
        clips = self.select_clips(batch_size, batch_index)
        return clips, self.features(clips)

    def compute(self, inputs: Any) -> Any:
        return self.generate(inputs[1])

    def collect(self, outputs: Any, inputs: Any, batch_size: int) -> dict[str, Any]:
        clips = inputs[0]
        gen = self.generated_ids(outputs).cpu()
        texts: list[str] | None = None
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        row: dict[str, Any] = {
            "tokens": int(gen.shape[0] * gen.shape[1]),
            "tokens_per_clip": int(gen.shape[1]),
            "audio_s": float(sum(c["duration_s"] for c in clips)),
        }
        self.last_ids = gen
        self.last_text = texts
        if texts is not None:
            refs = [(c["text"], t) for c, t in zip(clips, texts) if c.get("text")]
            if refs:
                row["wer"] = sum(word_error_rate(r, h) for r, h in refs) / len(refs)
        return row

    def _work(self) -> dict[str, Any]:
        """Encoder FLOPs per clip (counted) and the bytes one decoded token must read at least:
        the decoder's weights once per step shared by the batch, plus the clip's cross-attention
        keys/values (2 × layers × encoder positions × d_model)."""
        import torch

        cfg = self.model.config
        enc = self.model.get_encoder()
        frames = 2 * int(cfg.max_source_positions)
        feats = torch.zeros((1, int(cfg.num_mel_bins), frames), device=self.device, dtype=self.dtype)
        enc_flops = self.count_flops(lambda: enc(input_features=feats))
        dec = self.model.get_decoder()
        item = torch.finfo(self.dtype).bits // 8
        dec_bytes = sum(p.numel() for p in dec.parameters()) * item
        cross = 2 * int(cfg.decoder_layers) * int(cfg.max_source_positions) * int(cfg.d_model) * item
        return {"encoder_flops_per_clip": enc_flops, "decoder_weight_bytes": dec_bytes, "cross_kv_bytes_per_clip": cross,
                "per": "token", "against": "hbm_gbps",
                "bytes_per_token": "decoder_weight_bytes / batch size + cross_kv_bytes_per_clip"}

    def _conditions(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "new_tokens": self.new_tokens,
            "tokens_per_sample": self.new_tokens,
            "forced_prompt_tokens": len(self.forced_prompt),
            "clips": len(self.clips),
            "audio_s_total": round(sum(c["duration_s"] for c in self.clips), 3),
            "d_model": int(cfg.d_model),
            "encoder_layers": int(cfg.encoder_layers),
            "decoder_layers": int(cfg.decoder_layers),
            "num_mel_bins": int(cfg.num_mel_bins),
            "decoding": "greedy, min_new_tokens = max_new_tokens (EOS suppressed)",
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else "none (token ids only)",
            "attention": self.attention,
            "attention_backend": getattr(cfg, "_attn_implementation", None) or self.attention,
            "latency_counts": "generate() (encoder + all decoder steps)",
            "overhead_counts": "clip selection, log-mel feature extraction, host→device copy, ids → host (+ text decoding)",
        }
