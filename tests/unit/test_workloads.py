"""Workloads on the CPU with the tiny shipped configs (synthetic and saved-to-disk weights)."""

from __future__ import annotations

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")

from mi300x_cert.config import MODELS_DIR, INCLUDE_DIR  # noqa: E402
from mi300x_cert.errors import ModelSourceError, WorkerError  # noqa: E402
from mi300x_cert.workloads import load_workload  # noqa: E402

SD = {"model": "synthetic:sd-tiny", "height": 64, "width": 64, "steps": 4, "guidance": 7.5,
      "scheduler": "pndm", "seed": 0, "dtype": "float32", "prompts": "include/prompts/prompts.txt"}
WHISPER = {"model": "synthetic:whisper-smoke", "new_tokens": 6, "dtype": "float32", "seed": 0}
RESNET = {"model": "synthetic:resnet-tiny", "image_size": 64, "dtype": "float32", "seed": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _images(wl) -> list[bytes]:
    return [im.tobytes() for im in wl.last_images]


def _check_row(row: dict, items: int) -> None:
    assert row["items"] == items
    assert row["latency_s"] > 0
    assert row["latency_overhead_s"] >= row["latency_s"]


# -- Stable Diffusion ----------------------------------------------------------------------------

def test_sd_synthetic_batch_and_conditions():
    wl = load_workload("sd", SD, "cpu")
    try:
        assert wl.warmup(1) > 0
        row = wl.run_batch(2, 0)
        _check_row(row, 2)
        assert row["unet_evals"] == SD["steps"] + 1  # PNDM (skip_prk_steps): steps + 1 evaluations
        assert wl._unet_calls == SD["steps"] + 1  # counted by the forward hook, not inferred
        assert len(wl.last_images) == 2 and wl.last_images[0].size == (64, 64)
        c = wl.conditions()
        assert c["model"] == "synthetic:sd-tiny" and c["synthetic"] is True
        assert c["scheduler"] == "pndm" and c["unet_evals"] == 5 and c["unet_batch_factor"] == 2
        assert c["tokenizer"] == "hash (synthetic; no CLIP vocab)"
        assert c["attention"] == "sdpa" and c["attention_backend"].startswith("AttnProcessor2_0 (torch")
        assert c["compile_mode"] == "none" and c["path"] == "stock"
        assert c["versions"]["torch"] == torch.__version__ and "diffusers" in c["versions"]
        # the pieces the optimized path replaces are reachable
        for name in ("pipe", "unet", "vae", "text_encoder", "scheduler"):
            assert getattr(wl, name) is not None
        assert wl.pipe.unet is wl.unet
    finally:
        wl.close()


@pytest.mark.parametrize("scheduler,evals", [("ddim", 4), ("euler", 4), ("dpm++", 4)])
def test_sd_other_schedulers_count_unet_calls(scheduler, evals):
    wl = load_workload("sd", dict(SD, scheduler=scheduler, guidance=1.0), "cpu")
    try:
        row = wl.run_batch(1, 0)
        assert row["unet_evals"] == evals == wl.expected_unet_evals()
        c = wl.conditions()
        assert c["scheduler"] == scheduler and c["cfg"] is False and c["unet_batch_factor"] == 1
    finally:
        wl.close()


def test_sd_seeded_runs_are_deterministic():
    a = load_workload("sd", SD, "cpu")
    b = load_workload("sd", SD, "cpu")
    c = load_workload("sd", dict(SD, seed=1), "cpu")
    try:
        a.run_batch(1, 3)
        b.run_batch(1, 3)
        c.run_batch(1, 3)
        assert _images(a) == _images(b)
        assert _images(a) != _images(c)
        a.run_batch(1, 4)
        assert _images(a) != _images(b)  # another batch index draws other noise and another prompt
    finally:
        for wl in (a, b, c):
            wl.close()


def test_sd_eager_attention():
    wl = load_workload("sd", dict(SD, attention="eager", steps=2), "cpu")
    try:
        from diffusers.models.attention_processor import AttnProcessor

        assert all(isinstance(p, AttnProcessor) for p in wl.unet.attn_processors.values())
        c = wl.conditions()
        assert c["attention"] == "eager" and c["attention_backend"].startswith("AttnProcessor (eager")
        _check_row(wl.run_batch(1, 0), 1)
    finally:
        wl.close()


def test_sd_local_weights_match_synthetic(tmp_path, monkeypatch):
    syn = load_workload("sd", SD, "cpu")
    syn.pipe.save_pretrained(tmp_path / "sd")
    syn.run_batch(1, 0)
    ref = _images(syn)
    syn.close()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    local = load_workload("sd", dict(SD, model=str(tmp_path / "sd")), "cpu")
    try:
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
        local.run_batch(1, 0)
        assert _images(local) == ref
        c = local.conditions()
        assert c["synthetic"] is False and c["model"] == "sd" and c["unet_evals"] == 5
    finally:
        local.close()


def test_sd_local_clip_tokenizer_is_used(tmp_path):
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    syn = load_workload("sd", dict(SD, steps=2), "cpu")
    syn.pipe.save_pretrained(tmp_path / "sd")
    tok.save_pretrained(tmp_path / "sd" / "tokenizer")
    syn.close()
    wl = load_workload("sd", dict(SD, steps=2, model=str(tmp_path / "sd")), "cpu")
    try:
        assert wl.conditions()["tokenizer"] == "CLIPTokenizer"
        ids = wl.tokenize(["a red fox"])
        assert tuple(ids.shape) == (2, 77)  # prompt + unconditional (CFG)
        assert ids[0, :4].tolist() == [52, 26, 17, 4] and ids[1, :2].tolist() == [52, 53]
        _check_row(wl.run_batch(1, 0), 1)
    finally:
        wl.close()


def test_sd_hash_tokenizer_layout():
    from mi300x_cert.workloads.sd import hash_tokenize

    ids = hash_tokenize(["a red fox", "a red fox", "x " * 200], 49408)
    assert ids[0] == ids[1] and len(ids[0]) == len(ids[2]) == 77
    assert ids[0][0] == 49406 and ids[0][4] == 49407 and ids[0][-1] == 49407
    assert all(0 <= t < 49406 for t in ids[0][1:4])
    assert ids[2][76] == 49407 and ids[2][75] != 49407  # truncated to 75 words + EOS


# -- model sources --------------------------------------------------------------------------------

def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-weights"
    with pytest.raises(ModelSourceError, match="no-such-weights"):
        load_workload("sd", dict(SD, model=str(missing)), "cpu")


def test_unknown_synthetic_arch():
    with pytest.raises(ModelSourceError, match="sd-v9"):
        load_workload("sd", dict(SD, model="synthetic:sd-v9"), "cpu")


def test_directory_that_is_not_a_model(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "notes.txt").write_text("not weights")
    with pytest.raises(ModelSourceError, match=r"junk.*no model_index\.json"):
        load_workload("sd", dict(SD, model=str(d)), "cpu")
    with pytest.raises(ModelSourceError, match=r"junk.*no config\.json"):
        load_workload("whisper", dict(WHISPER, model=str(d)), "cpu")
    (d / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ModelSourceError, match=r"junk.*model\.safetensors"):
        load_workload("resnet50", dict(RESNET, model=str(d)), "cpu")


def test_unknown_kind_and_bad_params():
    with pytest.raises(WorkerError, match="unknown workload kind 'bert'"):
        load_workload("bert", {}, "cpu")
    with pytest.raises(WorkerError, match="scheduler 'lms'"):
        load_workload("sd", dict(SD, scheduler="lms"), "cpu")
    with pytest.raises(WorkerError, match="dtype 'int8'"):
        load_workload("resnet50", dict(RESNET, dtype="int8"), "cpu")


def test_optimized_path_without_module_is_a_clear_error(monkeypatch):
    from mi300x_cert.workloads.base import load_optimizer

    monkeypatch.setitem(sys.modules, "mi300x_cert.workloads.optimized", None)
    with pytest.raises(WorkerError, match="path 'optimized' requested for 'sd'"):
        load_optimizer("sd")
    with pytest.raises(WorkerError, match="path 'optimized'"):
        load_workload("sd", dict(SD, path="optimized"), "cpu")


def test_shipped_configs_are_the_published_architectures():
    """Build the full-size configs on the meta device (no memory) and count parameters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, ResNetConfig, ResNetForImageClassification,
                              WhisperConfig, WhisperForConditionalGeneration)

    sd = MODELS_DIR / "sd-v1-4"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(sd / "text_encoder"))
        wl = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(MODELS_DIR / "whisper-large-v3"))
        wt = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(MODELS_DIR / "whisper-tiny"))
        rn = ResNetForImageClassification(ResNetConfig.from_pretrained(MODELS_DIR / "resnet-50"))

    def n(m):
        return sum(p.numel() for p in m.parameters())

    assert n(unet) == 859_520_964  # SD v1-4 UNet
    assert n(vae) == 83_653_863
    assert n(te) == 123_060_480  # CLIP ViT-L/14 text tower
    assert n(wl) == 1_543_490_560  # Whisper large-v3
    assert n(wt) == 37_760_640  # Whisper tiny
    assert n(rn) == 25_557_032  # ResNet-50
    sched = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler" and sched["skip_prk_steps"] is True
    assert (sched["beta_start"], sched["beta_end"], sched["steps_offset"]) == (0.00085, 0.012, 1)
    for arch in ("sd-v1-4", "sd-tiny", "whisper-large-v3", "whisper-tiny", "whisper-smoke", "resnet-50", "resnet-tiny"):
        assert (MODELS_DIR / arch / "README.md").read_text().strip()


# -- Whisper -----------------------------------------------------------------------------------------

def test_whisper_generates_exactly_new_tokens_per_clip():
    wl = load_workload("whisper", WHISPER, "cpu")
    try:
        assert wl.warmup(2) > 0
        row = wl.run_batch(3, 0)
        _check_row(row, 3)
        assert row["tokens"] == 3 * WHISPER["new_tokens"] and row["tokens_per_clip"] == WHISPER["new_tokens"]
        assert tuple(wl.last_ids.shape) == (3, WHISPER["new_tokens"])
        forced = set(wl.forced_prompt)
        assert wl.forced_prompt[0] == 50258
        assert not forced & set(wl.last_ids[:, :1].flatten().tolist())  # no forced token counted
        c = wl.conditions()
        assert c["new_tokens"] == 6 and c["clips"] >= 6 and c["synthetic"] is True
        assert c["attention"] == "sdpa" and c["attention_backend"] == "sdpa"
        # more clips than shipped: they repeat to fill the batch
        row = wl.run_batch(c["clips"] + 2, 1)
        assert row["tokens"] == (c["clips"] + 2) * 6
    finally:
        wl.close()


def test_whisper_features_computed_once_per_clip_file_and_identical():
    """The clip list repeats a few files cyclically: each file's log-mel features are computed once
    and reused; the batch equals the extractor's own output for the same clips."""
    wl = load_workload("whisper", WHISPER, "cpu")
    try:
        calls = []
        fe = wl.feature_extractor
        orig = fe.__class__.__call__

        def counting(self, raw, *a, **k):
            calls.append(len(raw))
            return orig(self, raw, *a, **k)

        n = len({c["file"] for c in wl.clips})
        clips = wl.select_clips(n + 3, 0)  # every file once, three of them twice
        try:
            fe.__class__.__call__ = counting
            got = wl.features(clips)
            again = wl.features(wl.select_clips(n + 3, 1))
        finally:
            fe.__class__.__call__ = orig
        assert calls == [n], calls  # one extraction of each distinct file, none for the repeat batch
        want = fe([c["samples"] for c in clips], sampling_rate=16000, return_tensors="pt").input_features
        assert torch.equal(got, want.to(got.dtype))
        assert again.shape == got.shape and wl.feature_cache_clips == n
    finally:
        wl.close()


def test_whisper_local_weights_match_synthetic(tmp_path):
    syn = load_workload("whisper", WHISPER, "cpu")
    syn.model.save_pretrained(tmp_path / "w")
    syn.feature_extractor.save_pretrained(tmp_path / "w")
    syn.run_batch(2, 0)
    ref = syn.last_ids.tolist()
    syn.close()
    local = load_workload("whisper", dict(WHISPER, model=str(tmp_path / "w")), "cpu")
    try:
        row = local.run_batch(2, 0)
        assert local.last_ids.tolist() == ref and row["tokens"] == 12
        assert local.conditions()["synthetic"] is False
    finally:
        local.close()


def test_whisper_compile_is_recorded():
    params = dict(WHISPER, new_tokens=2, attention="eager", compile={"enabled": True, "backend": "eager", "mode": "default"})
    wl = load_workload("whisper", params, "cpu")
    try:
        c = wl.conditions()
        assert c["compile_mode"] == "eager:default" and c["attention_backend"] == "eager"
        assert wl.run_batch(1, 0)["tokens"] == 2
    finally:
        wl.close()


def test_whisper_text_and_wer_with_a_tokenizer():
    class EchoTokenizer:  # stands in for a real tokenizer: "decodes" to the reference text
        def __init__(self, texts):
            self.texts = texts

        def batch_decode(self, ids, skip_special_tokens=True):
            return self.texts[: len(ids)]

    wl = load_workload("whisper", dict(WHISPER, new_tokens=2), "cpu")
    try:
        refs = [c["text"] for c in wl.select_clips(2, 0)]
        wl.tokenizer = EchoTokenizer(refs)
        row = wl.run_batch(2, 0)
        assert wl.last_text == refs and row["wer"] == 0.0
        wl.tokenizer = EchoTokenizer(["", ""])
        assert wl.run_batch(2, 0)["wer"] == 1.0
    finally:
        wl.close()


def test_audio_clips_are_real_speech():
    from mi300x_cert.workloads.whisper import load_clips, word_error_rate

    meta = json.loads((INCLUDE_DIR / "audio" / "clips.json").read_text())["clips"]
    clips = load_clips(INCLUDE_DIR / "audio")
    assert 6 <= len(clips) <= 8 and len(clips) == len(meta)
    for c, m in zip(clips, meta):
        assert 3.0 <= c["duration_s"] <= 10.0 and abs(c["duration_s"] - m["duration_s"]) < 0.01
        assert c["text"] == m["text"] and len(c["text"].split()) >= 5
        rms = float((c["samples"] ** 2).mean() ** 0.5)
        assert 0.01 < rms < 0.9 and float(abs(c["samples"]).max()) <= 1.0
    assert word_error_rate("the quick brown fox", "the quick brown fox") == 0.0
    assert word_error_rate("the quick brown fox", "the slow brown") == 0.5


# -- ResNet-50 -----------------------------------------------------------------------------------

def test_resnet_batch_deterministic_and_local(tmp_path):
    a = load_workload("resnet50", RESNET, "cpu")
    b = load_workload("resnet50", dict(RESNET, channels_last=True), "cpu")
    try:
        assert a.warmup(1) > 0
        _check_row(a.run_batch(4, 0), 4)
        b.run_batch(4, 0)
        assert torch.allclose(a.last_logits, b.last_logits, atol=1e-4)
        assert a.last_logits.shape == (4, 1000)
        c = a.conditions()
        assert c["mode"] == "eager" and c["image_size"] == 64 and c["num_labels"] == 1000
        a.model.save_pretrained(tmp_path / "rn")
        local = load_workload("resnet50", dict(RESNET, model=str(tmp_path / "rn")), "cpu")
        local.run_batch(4, 0)
        assert torch.equal(local.last_logits, a.last_logits)
        local.run_batch(4, 1)
        assert not torch.equal(local.last_logits, a.last_logits)
        local.close()
    finally:
        a.close()
        b.close()


def test_resnet_compiled_mode_recorded():
    wl = load_workload("resnet50", dict(RESNET, mode="compiled", compile={"backend": "eager", "mode": "default"}), "cpu")
    try:
        assert wl.conditions()["compile_mode"] == "eager:default"
        _check_row(wl.run_batch(2, 0), 2)
    finally:
        wl.close()


def test_synthetic_init_is_recorded_and_validated():
    """Synthetic weights are created on the GPU when there is one (recorded), else on the CPU."""
    from mi300x_cert.errors import WorkerError
    from mi300x_cert.workloads import load_workload

    params = {"model": "synthetic:resnet-tiny", "dtype": "float32", "image_size": 32}
    wl = load_workload("resnet50", params, "cpu")
    try:
        c = wl.conditions()
        assert c["synthetic"] is True and "load_s" in c and c["load_s"] >= 0
    finally:
        wl.close()
    sd = load_workload("sd", {"model": "synthetic:sd-tiny", "dtype": "float32", "height": 64, "width": 64,
                              "steps": 2, "synthetic_init": "device"}, "cpu")
    try:
        assert sd.conditions()["synthetic_init"] == "cpu"   # no GPU here: initialised on the CPU
    finally:
        sd.close()
    with pytest.raises(WorkerError, match="synthetic_init"):
        load_workload("sd", {"model": "synthetic:sd-tiny", "height": 64, "width": 64, "steps": 2,
                             "synthetic_init": "gpu0"}, "cpu")
