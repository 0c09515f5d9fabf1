"""The optimized path computes the stock path's function (CPU, tiny synthetic models).

Tolerances: float32 on the CPU, so latents and images must agree to 1e-5 relative (the optimized
loop runs the same scheduler code; fused QKV only regroups the projections); Whisper greedy tokens
must be identical.
"""

from __future__ import annotations

import copy
import json
import operator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _cpu(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    monkeypatch.setenv("MI300X_CERT_COMPILE_CACHE", str(tmp_path / "cc"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


SD = dict(model="synthetic:sd-tiny", height=64, width=64, steps=10, guidance=7.5, dtype="float32", seed=0, device="cpu")


def _sd_pair():
    from mi300x_cert.workloads.sd import SDWorkload

    return SDWorkload(dict(SD, path="stock")), SDWorkload(dict(SD, path="optimized"))


def test_sd_optimized_same_latents_and_images_and_recorded():
    a, b = _sd_pair()
    ids = a.tokenize(a.select_prompts(2, 3))
    cond, uncond = a.encode_prompts(ids)
    lat0 = a.initial_latents(2, 3)
    la, lb = a.denoise(cond, uncond, lat0), b.denoise(cond, uncond, lat0)
    assert la.shape == lb.shape == (2, 4, 8, 8)
    assert float((la - lb).norm() / la.norm()) < 1e-5
    ia, ib = a.decode(la), b.decode(lb)
    assert float((ia - ib).abs().max()) < 1e-4
    row_a, row_b = a.run_batch(2, 0), b.run_batch(2, 0)
    assert row_a["unet_evals"] == row_b["unet_evals"] == 11  # PNDM: steps + 1
    ca, cb = a.conditions(), b.conditions()
    assert ca["path"] == "stock" and cb["path"] == "optimized"
    assert "optimized" not in ca and cb["optimized"]["fused_qkv"] is True
    json.dumps(cb, default=str)  # conditions stay JSON-able for the result rows


def test_sd_optimized_text_encoder_is_replayed_and_the_same(monkeypatch):
    """The optimized path runs the workload's own text encoder through ``FastSD.encode`` (a device
    graph where graphs are supported; here, off the GPU, the graph cache runs it eagerly and says
    so): the same embeddings as stock, bit for bit. The bench's phases split a batch into the three
    device steps. Without a text encoder, ``encode`` is one clear error."""
    from bench.cli import sd_phases
    from mi300x_cert.workloads.optimized import sd_fast
    from mi300x_cert.workloads.sd import SDWorkload

    monkeypatch.setattr(sd_fast, "graphs_supported", lambda device: True)   # FastSD plans the graph
    a = SDWorkload(dict(SD, path="stock"))
    b = SDWorkload(dict(SD, path="optimized"))
    assert b.text_embeddings == b.fast.encode
    ids = a.tokenize(a.select_prompts(2, 5))
    (ca, ua), (cb, ub) = a.encode_prompts(ids), b.encode_prompts(ids)
    assert torch.equal(ca, cb) and torch.equal(ua, ub) and cb.shape == (2, 77, a.text_encoder.config.hidden_size)
    assert b.fast.notes["encode_graph"] == "device graphs unsupported here (eager)"   # through the cache
    phases = sd_phases(b, 2, 2)
    assert list(phases) == ["encode", "denoise", "decode"] and all(v > 0 for v in phases.values()), phases
    fast = sd_fast.FastSD(b.unet, b.vae, b.scheduler, steps=2, guidance=7.5, scaling_factor=0.18215,
                          device="cpu", compile=False)
    with pytest.raises(ValueError, match="no text encoder was given"):
        fast.encode(ids)


def test_sd_optimized_loop_reproduces_pndm_multistep_state():
    """The optimized loop is a different code path from the pipeline: check each step count."""
    from mi300x_cert.workloads.sd import SDWorkload

    for steps in (1, 3, 5):
        a = SDWorkload(dict(SD, steps=steps, path="stock"))
        b = SDWorkload(dict(SD, steps=steps, path="optimized"))
        ids = a.tokenize(a.select_prompts(1, 0))
        cond, uncond = a.encode_prompts(ids)
        lat0 = a.initial_latents(1, 0)
        la, lb = a.denoise(cond, uncond, lat0), b.denoise(cond, uncond, lat0)
        assert float((la - lb).norm() / la.norm()) < 1e-5, steps


def test_device_graph_falls_back_to_eager_on_cpu():
    from mi300x_cert.workloads.optimized.common import DeviceGraph, graphs_supported

    assert graphs_supported("cpu") is False
    g = DeviceGraph(lambda x: x * 2 + 1, "cpu")
    x = torch.arange(4.0)
    assert torch.equal(g.run(x), x * 2 + 1)
    assert not g.captured and "unsupported" in g.reason


def test_compile_cache_dir_is_configurable(tmp_path, monkeypatch):
    """The persistent compile cache: its folder, the FX-graph cache on, and the AOT-autograd cache
    off unless the operator asks for it (its key misses SDPA's priority order, so it could run a
    graph compiled for another attention kernel than the one this run chose and records)."""
    import os

    import torch._functorch.config as fc
    import torch._inductor.config as ic

    from mi300x_cert.workloads.optimized.common import setup_compile_cache

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(var, raising=False)
    # the configs' own patch restores them after the test (monkeypatch would delete the attribute on
    # undo, which hides a torch config from every later compilation in the process)
    with fc.patch(enable_autograd_cache=True), ic.patch(fx_graph_cache=ic.fx_graph_cache):
        d = setup_compile_cache(tmp_path / "inductor")
        assert d == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()
        assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and ic.fx_graph_cache is True
        assert os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "0" and fc.enable_autograd_cache is False
        # the operator's own setting wins
        monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        setup_compile_cache(tmp_path / "inductor")
        assert fc.enable_autograd_cache is True


def test_whisper_optimized_same_tokens_as_generate():
    from mi300x_cert.workloads.optimized import OPTIMIZED_VERSION
    from mi300x_cert.workloads.whisper import WhisperWorkload

    p = dict(model="synthetic:whisper-smoke", new_tokens=12, dtype="float32", device="cpu", clips=3)
    a = WhisperWorkload(dict(p, path="stock"))
    b = WhisperWorkload(dict(p, path="optimized"))
    ra, rb = a.run_batch(3, 0), b.run_batch(3, 0)
    assert ra["tokens"] == rb["tokens"] == 36
    assert torch.equal(a.last_ids, b.last_ids)
    opt = b.conditions()["optimized"]
    assert b.conditions()["path"] == "optimized" and "static KV cache" in opt["recipe"]
    # what ran is recorded: the cross-attention form (K/V on a CPU without the triton kernel), the
    # encoder, the attention choice of the batch size
    assert opt["cross_attention_form"] == "kv" and opt["encoder"] == "eager" and opt["version"] == OPTIMIZED_VERSION == "4"
    assert opt["attention"]["cross_form"] == "kv" and "cross K/V once per batch" in opt["recipe"]


def test_whisper_fast_matches_generate_on_varied_tokens():
    """A model whose greedy tokens vary (scaled-up random weights), so equality is not trivial."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m, feats = _varied_whisper()
    feats = feats[:2]  # the same first two clips as drawing two
    gc = m.generation_config
    n = 10
    ref = m.generate(feats, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")
    fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=n,
                     begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id)
    got = fw.generate(feats)[:, -n:]
    assert len(set(ref.flatten().tolist())) > 2, "tokens should vary for this check to mean something"
    assert torch.equal(ref[:, -n:], got)


def test_bench_renders_markdown_from_json():
    from bench.cli import render_markdown

    data = {"conditions": {"card": "TestCard", "driver": "1"}, "gemm": {"n": 8192, "dtype": "bfloat16", "tflops": 800.0},
            "sd_flops": {"unet_pair_tflop": 1.6, "vae_decode_tflop": 2.5},
            "sd": [{"variant": "stock", "batch": 32, "per_image_s": 0.3, "tflops": 280.0, "steps": 50, "unet_evals": 51,
                    "dtype": "float16", "tflop_per_image": 84.0},
                   {"variant": "optimized", "batch": 32, "per_image_s": 0.2, "tflops": 420.0,
                    "vs_stock": {"latent_rel_err": 1e-3, "image_rel_err": 2e-3}},
                   {"variant": "optimized+freezing=false-library-unet", "batch": 32, "per_image_s": 0.25, "tflops": 336.0},
                   {"variant": "optimized-library-unet", "batch": 32, "per_image_s": 0.24, "tflops": 350.0}],
            "whisper": [], "telemetry": None, "notes": []}
    md = render_markdown([data])
    assert "TestCard" in md and "| 32 | optimized | 0.200 | 1.50 | 420 | 52 |" in md
    # forced UNet forms (and settings) are rows of the optimized path, after its default row
    assert md.index("| 32 | optimized | ") < md.index("| 32 | optimized-library-unet | 0.240 | 1.25 |")
    assert "| 32 | optimized+freezing=false-library-unet | 0.250 | 1.20 |" in md
    assert "Where a batch's time goes" not in md   # rows without phases: no line
    data["sd"][1]["phases_s"] = {"encode": 0.0012, "denoise": 6.0, "decode": 0.25}
    md = render_markdown([data])
    assert "b32 optimized: encode 1.2, denoise 6000.0, decode 250.0." in md


def test_bench_whisper_rows_against_the_runs_ceilings():
    """Each optimized Whisper row is set against the run's own ceilings: cross-attention bytes per
    token at the copy rate plus (in series) or beside (overlapped) the encoder's FLOPs per token at
    the GEMM rate; the K/V form reads twice the bytes; stock rows and rows without counts get none."""
    from bench.cli import _whisper_counts, render_markdown, whisper_bound

    gemm, copy = {"n": 8192, "dtype": "bfloat16", "tflops": 800.0}, {"gib": 4.0, "tb_per_s": 4.0}
    row = {"variant": "optimized", "batch": 1024, "new_tokens": 128, "tokens_per_s": 8000.0, "batch_latency_s": 16.4,
           "cross_form": "hidden", "xattn_bytes_per_token": 120e6, "encoder_tflop_per_clip": 2.56,
           "attention": {"us_per_layer": {"triton a": 2000.0, "triton b": float("nan")},
                         "tb_per_s": {"triton a": 2.0, "triton b": None}}}
    b = whisper_bound(row, gemm, copy)
    assert b["xattn_us_per_token"] == pytest.approx(30.0) and b["encoder_us_per_token"] == pytest.approx(25.0)
    assert b["tokens_per_s"] == pytest.approx(1e6 / 55) and b["fraction"] == pytest.approx(8000 * 55e-6)
    ov = dict(row, variant="optimized+overlap", overlap=True, steady_tokens_per_s=9000.0)
    assert whisper_bound(ov, gemm, copy)["tokens_per_s"] == pytest.approx(1e6 / 30)
    assert whisper_bound(dict(row, cross_form="kv"), gemm, copy)["xattn_us_per_token"] == pytest.approx(60.0)
    assert whisper_bound(row, gemm, None) is None and whisper_bound({"tokens_per_s": 1.0}, gemm, copy) is None
    stock = {"variant": "stock", "batch": 64, "new_tokens": 128, "tokens_per_s": 3000.0, "batch_latency_s": 2.7}
    md = render_markdown([{"conditions": {"card": "TestCard"}, "gemm": gemm, "copy": copy, "sd": [],
                           "whisper": [stock, row, ov], "telemetry": None, "notes": []}])
    assert "4 GiB device-to-device copy = **4.00 TB/s**" in md
    assert "| 1024 | optimized | 8000 | 2.67 (vs best stock) | 16.40 | – | – | 18182 | 44 |" in md
    assert "| 1024 | optimized+overlap | 8000 (steady 9000) |" in md and "| 33333 | 24 |" in md
    assert "triton a 2000 µs per layer, 2.00 TB/s = 50% of the copy rate" in md
    m, _ = _varied_whisper()
    c = _whisper_counts(m, 80)
    L, E = m.config.decoder_layers, m.config.d_model
    assert c["xattn_bytes_per_token"] == L * 1500 * E * 4 and c["encoder_tflop_per_clip"] > 0


def _varied_whisper():
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from mi300x_cert.config import MODELS_DIR

    d = MODELS_DIR / "whisper-smoke"
    torch.manual_seed(1)
    m = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(d)).eval()
    with torch.no_grad():
        for prm in m.model.decoder.parameters():
            prm.mul_(8.0)
    m.generation_config = GenerationConfig.from_pretrained(d)
    feats = torch.randn(3, 80, 3000, generator=torch.Generator().manual_seed(0))
    return m, feats


def _deep_encoder_whisper():
    """whisper-smoke with 3 encoder layers whose LayerNorms each have their own random weight and
    bias (so that using the wrong norm, or a norm in the wrong place, changes the output)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from mi300x_cert.config import MODELS_DIR

    cfg = WhisperConfig.from_pretrained(MODELS_DIR / "whisper-smoke")
    cfg.encoder_layers = 3
    torch.manual_seed(4)
    m = WhisperForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for mod in m.model.encoder.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    return m


def test_whisper_generate_many_same_tokens_as_generate_per_batch():
    """A stream of batches through ``generate_many``: each batch's tokens are generate's on it; on
    the CPU there are no device streams, so the batches run in series and the notes say why."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m, feats = _varied_whisper()
    gc = m.generation_config
    n = 6
    fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=n,
                     begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id, encoder_chunk=1)
    xs = [feats[:2], feats[1:], feats[:2]]
    outs = fw.generate_many(xs)
    assert len(outs) == 3
    for x, got in zip(xs, outs):
        want = m.generate(x, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")
        assert torch.equal(want[:, -n:], got[:, -n:])
    assert fw.notes["batches"]["overlap"] is False and "CPU" in fw.notes["batches"]["why"]
    assert fw.overlap_possible()[0] is False and fw.generate_many([]) == []


def test_whisper_next_encoder_spread_over_decode_steps_covers_every_chunk():
    """The next batch's encoder is launched a chunk every few decode steps; with more chunks than
    steps the rest go at ``finish``, before the done event: the staged output is the whole
    encoder output either way, each chunk launched exactly once."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, _ChunkedEncoder, whisper_prompt_ids

    m, feats = _varied_whisper()
    gc = m.generation_config
    with torch.inference_mode():
        want = m.model.encoder(feats).last_hidden_state
    for steps, chunk in ((8, 1), (2, 1), (5, 2)):
        fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=2, encoder_chunk=chunk)
        order: list[object] = []  # chunk sizes launched, then "done", in call order
        enc = fw._encode
        fw._encode = lambda x, enc=enc: (order.append(int(x.shape[0])), enc(x))[1]
        staging = torch.full_like(want, float("nan"))

        class Done:
            def record(self, stream):
                order.append(("done", stream))

        nchunks = -(-feats.shape[0] // chunk)
        launch = _ChunkedEncoder(fw, feats, staging, None, Done())
        # chunks spread evenly over the batch's decode steps (not all at the first step)
        assert launch.every == max(1, (fw.total - 1) // nchunks), (launch.every, fw.total, nchunks)
        launched: list[int] = []
        with torch.inference_mode():
            for i in range(steps):
                n0 = len(order)
                launch(i)
                launched.extend([i] * (len(order) - n0))
            before_finish = len(order)
            launch.finish()
        calls = [c for c in order if isinstance(c, int)]
        assert sum(calls) == feats.shape[0] and len(calls) == nchunks, (steps, chunk, calls)
        # one chunk at steps 0, every, 2·every, … while chunks are left; the rest at finish
        assert launched == [k * launch.every for k in range(before_finish)], (steps, chunk, launched)
        assert order[-1] == ("done", None) and order.count(("done", None)) == 1, order  # after the last chunk
        assert torch.allclose(staging, want, atol=1e-5), (steps, chunk)


def test_whisper_fast_encoder_in_chunks_same_tokens_and_options_checked():
    """The encoder run in chunks of clips (bounding memory at large batches) changes nothing."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m, feats = _varied_whisper()
    gc = m.generation_config
    n = 8
    ref = m.generate(feats, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")
    kw = dict(prompt_ids=whisper_prompt_ids(gc), new_tokens=n, begin_suppress_tokens=gc.begin_suppress_tokens,
              eos_token_id=gc.eos_token_id)
    fw = FastWhisper(m, encoder_chunk=2, **kw)  # chunks of 2 + 1 clips
    got = fw.generate(feats)[:, -n:]
    assert len(set(ref.flatten().tolist())) > 2
    assert torch.equal(ref[:, -n:], got)
    # no triton on a plain CPU: SDPA is what ran, and the choice is recorded
    assert fw.attn_choice[3]["cross"] == "sdpa" and fw.attn_choice[3]["self"] == "sdpa"
    with pytest.raises(ValueError, match="attn"):
        FastWhisper(m, attn="flash", **kw)
    with pytest.raises(ValueError, match="self_attn"):
        FastWhisper(m, self_attn="math", **kw)


def test_whisper_hidden_cross_attention_is_the_stock_layer_function():
    """The hidden form (projections folded into query and output, attention over the encoder
    output itself) computes each layer's cross-attention as the stock module does, on fresh
    random inputs, in float32; greedy tokens through it equal generate's; the form is recorded."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, hidden_attention_reference, whisper_prompt_ids

    m, feats = _varied_whisper()
    gc = m.generation_config
    with torch.no_grad():  # a v bias, so that the folded bias term is exercised
        for layer in m.model.decoder.layers:
            layer.encoder_attn.v_proj.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt_ids=whisper_prompt_ids(gc), begin_suppress_tokens=gc.begin_suppress_tokens,
              eos_token_id=gc.eos_token_id)
    fw = FastWhisper(m, new_tokens=8, cross="hidden", **kw)
    g = torch.Generator().manual_seed(11)
    E = m.config.d_model
    with torch.inference_mode():
        enc = m.model.encoder(feats).last_hidden_state
        for li, layer in enumerate(m.model.decoder.layers):
            x = torch.randn(3, 1, E, generator=g) * 3
            ref = layer.encoder_attn(x, key_value_states=enc)[0]
            got = fw.hidden_cross_attention(li, x, enc)
            rel = float((got - ref).norm() / ref.norm())
            assert rel < 1e-5, (li, rel)
        # the attention itself, against a direct float64 softmax(q xᵀ) x, with q' given as a
        # head-major view (how the step passes it)
        qp = (torch.randn(5, 3, E, generator=g) * 0.5).transpose(0, 1)  # [3 clips, 5 heads, E], strided
        xs = torch.randn(3, 40, E, generator=g)
        want = torch.softmax(qp.double() @ xs.double().transpose(1, 2), -1) @ xs.double()
        assert float((hidden_attention_reference(qp, xs, chunk=2).double() - want).abs().max()) < 1e-5
    ref_tokens = m.generate(feats, max_new_tokens=8, min_new_tokens=8, language="en", task="transcribe")
    got = fw.generate(feats)[:, -8:]
    assert torch.equal(ref_tokens[:, -8:], got)
    assert fw.cross == "hidden" and fw.attn_choice[3]["cross_form"] == "hidden"
    assert fw.attn_choice[3]["cross"] == "hidden (torch)"  # no triton kernel on a plain CPU
    # the K/V caches are not allocated in the hidden form: only the encoder output is kept
    st = fw._states[3]
    assert st["ck"] == [] and st["cv"] == [] and tuple(st["enc"].shape) == tuple(enc.shape)
    # default on a CPU without the triton kernel: the K/V form; a bad form is named
    assert FastWhisper(m, new_tokens=8, **kw).cross == "kv"
    with pytest.raises(ValueError, match="cross"):
        FastWhisper(m, new_tokens=8, cross="shared", **kw)


def test_whisper_encoder_compile_option_recorded_and_falls_back():
    """compile_encoder: off by default on a CPU; asked for on a CPU it is the eager encoder (the
    compile helper declines CPU compilation) and says so; a failing compiled encoder falls back to
    the eager one with the reason, same tokens."""
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m, feats = _varied_whisper()
    gc = m.generation_config
    kw = dict(prompt_ids=whisper_prompt_ids(gc), new_tokens=4, begin_suppress_tokens=gc.begin_suppress_tokens,
              eos_token_id=gc.eos_token_id)
    assert FastWhisper(m, **kw).compile_encoder is False
    fw = FastWhisper(m, compile_encoder=True, **kw)
    want = fw.generate(feats)
    assert fw.encoder_label == "none (cpu)"

    def broken(*a, **k):
        raise RuntimeError("inductor exploded")

    fw2 = FastWhisper(m, compile_encoder=True, **kw)
    fw2._encoder = broken
    got = fw2.generate(feats)
    assert torch.equal(want, got)
    assert fw2.compile_encoder is False and "inductor exploded" in fw2.encoder_label
    # a compiled fast form that fails (one of its kernels, say) falls back to the library's module
    fw3 = FastWhisper(m, compile_encoder=True, encoder="fast", **kw)
    fw3._encoder = broken
    assert torch.equal(want, fw3.generate(feats))
    assert fw3.encoder_form == fw3.notes["encoder_form"] == "library" and "inductor exploded" in fw3.encoder_label


def test_fast_encoder_is_the_library_encoder_and_its_forms_are_checked():
    """The encoder's fast form (attention without layout copies, the query's scale in the attention
    kernel; ``mlp``/``norm`` "fused": the MLP's first product and GELU, and each residual add with
    the next LayerNorm, as operators, the library's ops on a CPU) computes transformers' encoder,
    also with three layers whose norms all differ: float32 to 1e-5 of the largest value, float16 to
    two units in the last place, with the float16 clamp where the library clamps and nowhere else;
    through FastWhisper the tokens are generate's; the forms and bad inputs are named."""
    from mi300x_cert.workloads.optimized.encoder_fast import FastEncoder, add_layer_norm, fused_mlp_supported, linear_gelu
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m, feats = _varied_whisper()
    enc = m.model.encoder
    deep = _deep_encoder_whisper().model.encoder
    forms = (("library", "library"), ("fused", "library"), ("library", "fused"), ("fused", "fused"))
    with torch.inference_mode():
        for e in (enc, deep):
            ref = e(feats).last_hidden_state
            for mlp, norm in forms:
                got = FastEncoder(e, mlp=mlp, norm=norm)(feats)
                assert got.shape == ref.shape and float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max()), (mlp, norm)
        # float16: the clamp after each MLP add (a bias past float16's range), and none after the
        # attention add (a second overflow there reaches the norm as inf: NaN, as in the library)
        dh = copy.deepcopy(deep).half()
        x16 = feats[:1].half()
        dh.layers[0].self_attn.out_proj.bias[:4] = 1000.0   # then + 64992 at the MLP add: past the range
        dh.layers[0].fc2.weight[:4] = 0.0
        dh.layers[0].fc2.bias[:4] = 65000.0
        a = dh(x16).last_hidden_state
        assert bool(torch.isfinite(a).all())
        for mlp, norm in forms:
            b = FastEncoder(dh, mlp=mlp, norm=norm)(x16)
            assert float((a.float() - b.float()).abs().max()) <= 2.0 ** -10 * 2 * float(a.float().abs().max()), (mlp, norm)
        dh.layers[1].self_attn.out_proj.bias[:4] = 30000.0
        a = dh(x16).last_hidden_state
        assert bool(torch.isnan(a).any())
        for mlp, norm in forms:
            b = FastEncoder(dh, mlp=mlp, norm=norm)(x16)
            assert torch.equal(torch.isnan(a), torch.isnan(b)), (mlp, norm)
        x = torch.randn(2, 5, enc.layers[0].fc1.in_features)
        fc1 = enc.layers[0].fc1
        assert torch.equal(linear_gelu(x, fc1.weight, fc1.bias), torch.nn.functional.gelu(fc1(x)))
        ln = enc.layers[0].final_layer_norm
        y = torch.randn(2, 5, ln.weight.shape[0])
        h, o = add_layer_norm(x[..., : y.shape[-1]] * 0 + 1, y, ln.weight, ln.bias, ln.eps, False)
        assert torch.equal(h, 1 + y) and torch.allclose(o, ln(1 + y))
        with pytest.raises(ValueError, match="length 3000, but found 2999"):
            FastEncoder(enc)(feats[..., :2999])
    with pytest.raises(ValueError, match="mlp must be"):
        FastEncoder(enc, mlp="geglu")
    with pytest.raises(ValueError, match="norm must be"):
        FastEncoder(enc, norm="rms")
    enc.train()
    with pytest.raises(ValueError, match="eval mode"):
        FastEncoder(enc)
    enc.eval()
    assert fused_mlp_supported("cpu")[0] is False
    gc = m.generation_config
    n = 8
    want = m.generate(feats, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")[:, -n:]
    kw = dict(prompt_ids=whisper_prompt_ids(gc), new_tokens=n, begin_suppress_tokens=gc.begin_suppress_tokens,
              eos_token_id=gc.eos_token_id)
    assert FastWhisper(m, **kw).encoder_form == "library"   # auto: the library module where nothing is compiled
    fw = FastWhisper(m, encoder="fast", **kw)
    assert torch.equal(fw.generate(feats)[:, -n:], want) and fw.notes["encoder_form"] == "fast"
    fw = FastWhisper(m, encoder="fast+mlp+norm", **kw)   # no kernels on a CPU: the fast form, and why
    assert fw.encoder_form == "fast", fw.encoder_form
    assert "fused MLP not used: needs an NVIDIA card" in fw.notes["encoder_form_note"]
    assert "add + LayerNorm not used" in fw.notes["encoder_form_note"]
    assert torch.equal(fw.generate(feats)[:, -n:], want)
    with pytest.raises(ValueError, match="encoder must be one of"):
        FastWhisper(m, encoder="fused", **kw)
    # where the product kernel could run, a model in another dtype than float16 still leaves it out
    import mi300x_cert.workloads.optimized.encoder_fast as ef

    real = ef.fused_mlp_supported
    try:
        ef.fused_mlp_supported = lambda device: (True, "ok")
        fw = FastWhisper(m, encoder="fast+mlp", **kw)
        assert fw.encoder_form == "fast" and "float16 only" in fw.notes["encoder_form_note"], fw.notes
    finally:
        ef.fused_mlp_supported = real
    # half precision: the same function to rounding
    mh = copy.deepcopy(m).half()
    with torch.inference_mode():
        a = mh.model.encoder(feats.half()).last_hidden_state.float()
        b = FastEncoder(mh.model.encoder, norm="fused")(feats.half()).float()
    assert float((a - b).abs().max()) <= 2.0 ** -10 * 2 * float(a.abs().max())


def test_fast_encoder_operators_schema_and_fake_tensors():
    """The fused product and the add + LayerNorm as torch operators: their schemas, fake-tensor
    shapes and CPU results pass torch's operator checks (so ``torch.compile`` can place them in a
    graph)."""
    from mi300x_cert.workloads.optimized.encoder_fast import _ln_op, _op

    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(3, 4, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    torch.library.opcheck(_op(), (x, w, b))
    r, y = torch.randn(3, 4, 24, generator=g), torch.randn(3, 4, 24, generator=g)
    torch.library.opcheck(_ln_op(), (r, y, b, b.abs(), 1e-5, True))
    rt = torch.randn(3, 24, 4, generator=g).transpose(1, 2)   # not contiguous, as the encoder's first sum can be
    torch.library.opcheck(_ln_op(), (rt, y, b, b.abs(), 1e-5, False))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = _op()(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b))
        h, o = _ln_op()(mode.from_tensor(r), mode.from_tensor(y), mode.from_tensor(b), mode.from_tensor(b), 1e-5, False)
    assert tuple(out.shape) == (3, 4, 24) and tuple(h.shape) == tuple(o.shape) == (3, 4, 24)


def _refuses(calls: Any) -> None:
    """Each ``(fn, args, kwargs, words)`` of ``calls`` raises one ``ValueError`` whose message has
    ``words`` (for the kernels' checks run in a fresh interpreter process, which import it)."""
    for fn, args, kwargs, words in calls:
        try:
            fn(*args, **kwargs)
        except ValueError as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"no error ({words!r} expected)")


_LINEAR_GELU_CHECK = r"""
import torch
import torch.nn.functional as F
from mi300x_cert.workloads.optimized.encoder_fast import LINEAR_GELU_CONFIGS, linear_gelu_triton

torch.manual_seed(0)
# tails in M and N (the bulk copies' bounds), several launch settings, programs that repeat the last tile
for M, K, N, cfg in ((200, 96, 80, (32, 32, 32, 4, 2, 2)), (130, 64, 48, (64, 16, 16, 4, 2, 1)),
                     (64, 32, 16, (16, 16, 16, 1, 2, 4)), (33, 32, 40, (32, 32, 16, 4, 2, 8))):
    x = torch.randn(M, K).half()
    w = (torch.randn(N, K) / K ** 0.5).half()
    b = torch.randn(N).half()
    # the library's arithmetic: product and bias rounded to float16, exact GELU in float64
    y16 = (x.double() @ w.double().T + b.double()).half().double()
    ref = y16 * 0.5 * (1 + torch.erf(y16 / 2 ** 0.5))
    got = linear_gelu_triton(x.view(1, M, K), w, b, cfg)
    assert got.shape == (1, M, N) and got.dtype == torch.float16
    err = float((got[0].double() - ref).abs().max())
    assert err <= 2 * 2.0 ** -10 * float(ref.abs().max()), (M, K, N, cfg, err)
x = torch.randn(4, 32).half()
w = torch.randn(16, 32).half()
b = torch.randn(16).half()
# one clear error per bad operand (checked at the end, with the add + LayerNorm's)
bad_calls = [(linear_gelu_triton, args, msg) for args, msg in (
    ((x.float(), w, b), "float16 operands"), ((x, w[:, :16], b), "w must be"),
    ((x, w, b[:8]), "b must be"), ((x[:, :12], w[:, :12], b), "multiples of 8"))]
assert LINEAR_GELU_CONFIGS[0] == (128, 256, 64, 8, 3, 8)

from mi300x_cert.workloads.optimized.encoder_fast import FP16_CLAMP, add_layer_norm_triton
# the add + LayerNorm: rows cut between programs, a width that is not a power of two, the clamp of
# a float16 sum past the bound, float32 without the clamp
for rows, N, per, dt, clamp in ((37, 80, 4, torch.float16, True), (5, 48, 2, torch.float16, False),
                               (9, 40, 1, torch.float32, False)):
    r = torch.randn(rows, N).to(dt) * 3
    y = torch.randn(rows, N).to(dt)
    if dt == torch.float16:
        r[0, :3] = torch.tensor([65000.0, -65000.0, 60000.0])
        y[0, :3] = torch.tensor([400.0, -400.0, 100.0])
    w = torch.randn(N).to(dt)
    b = torch.randn(N).to(dt)
    h, o = add_layer_norm_triton(r, y, w, b, 1e-5, clamp, per, 4)
    hr = r + y
    if clamp:
        hr = torch.clamp(hr, min=-FP16_CLAMP, max=FP16_CLAMP)
    assert torch.equal(h, hr), (rows, N, (h.float() - hr.float()).abs().max())
    if clamp:
        assert float(h[0, 0]) == 64512.0 and float(h[0, 1]) == -64512.0 and float(h[0, 2]) == 60096.0
    hd = hr.double()
    ref = (hd - hd.mean(-1, keepdim=True)) / torch.sqrt(hd.var(-1, unbiased=False, keepdim=True) + 1e-5) * w.double() + b.double()
    tol = 2 * 2.0 ** -10 * float(ref.abs().max()) if dt == torch.float16 else 1e-5 * float(ref.abs().max())
    assert float((o.double() - ref).abs().max()) <= tol, (rows, N, dt)
# NaN stays NaN through the clamp (torch.clamp keeps it), inf is clamped
r = torch.randn(3, 16).half()
r[0, 0] = float("nan")
r[1, 0] = float("inf")
h, o = add_layer_norm_triton(r, torch.zeros_like(r), torch.ones(16).half(), torch.zeros(16).half(), 1e-5, True)
assert bool(torch.isnan(h[0, 0])) and bool(torch.isnan(o[0]).all()) and float(h[1, 0]) == 64512.0
assert bool(torch.isfinite(o[1:]).all())
# an operand whose base is not 16-byte aligned (a view at an odd offset) is copied, same result
buf = torch.randn(1 + 64 * 32).half()
xv = buf[1:].view(64, 32)
w = (torch.randn(16, 32) / 32 ** 0.5).half()
b = torch.randn(16).half()
assert torch.equal(linear_gelu_triton(xv, w, b, (16, 16, 16, 1, 2, 4)), linear_gelu_triton(xv.clone(), w, b, (16, 16, 16, 1, 2, 4)))
bad_calls += [(add_layer_norm_triton, args + (1e-5, False), msg) for args, msg in (
    ((torch.zeros(2, 8), torch.zeros(2, 9), torch.zeros(8), torch.zeros(8)), "one shape and dtype"),
    ((torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(9), torch.zeros(8)), "w and b must be [8]"))]
from tests.unit.test_optimized import _refuses

_refuses((fn, args, {}, msg) for fn, args, msg in bad_calls)
print("LINEAR-GELU-OK")
"""


def test_fast_encoder_kernels_are_the_librarys_arithmetic(tmp_path):
    """The fast encoder's Triton kernels, run by triton's CPU interpreter: the fused product
    (persistent, bulk tensor copies) against the library's arithmetic in float64 (the product with
    its bias rounded to float16, then the exact GELU), with tails in both output dimensions; the
    add + LayerNorm against the library's add and clamp (bit for bit) and a float64 LayerNorm;
    one clear error per bad operand."""
    pytest.importorskip("triton")
    r = _run_interpreted(tmp_path / "linear_gelu_check.py", _LINEAR_GELU_CHECK)
    assert r.returncode == 0 and "LINEAR-GELU-OK" in r.stdout, r.stderr[-3000:]


_KERNEL_CHECK = """
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from mi300x_cert.workloads.optimized import whisper_fast as wf
from tests.unit.test_optimized import _varied_whisper

g = torch.Generator().manual_seed(3)
B, H, S, D = 2, 3, 150, 64
q = torch.randn(B, H, D, generator=g) * D ** -0.5
k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
ref = F.scaled_dot_product_attention(q.view(B, H, 1, D), k, v, scale=1.0).view(B, H, D)
for block, splits in ((64, 1), (32, 4), (128, 2)):
    da = wf.DecodeAttention(B, H, S, D, block_n=block, splits=splits, dtype=torch.float32)
    da.out.fill_(float("nan"))
    err = float((da(q, k, v) - ref).abs().max())
    assert err < 1e-5, (block, splits, err)
pos = torch.tensor([40])
ref40 = F.scaled_dot_product_attention(q.view(B, H, 1, D), k[:, :, :41], v[:, :, :41], scale=1.0).view(B, H, D)
da = wf.DecodeAttention(B, H, S, D, block_n=32, splits=2, dtype=torch.float32)
assert float((da(q, k, v, pos) - ref40).abs().max()) < 1e-5

# the shared-hidden cross-attention kernel against the float32 reference: several shapes, splits,
# head tiles, a head-major (strided) q', every output element written (poisoned first)
for (B, H, S, E) in ((2, 20, 150, 1280), (3, 6, 70, 384), (1, 8, 33, 512)):
    qp = (torch.randn(H, B, E, generator=g) * E ** -0.5 * 3).transpose(0, 1)
    x = torch.randn(B, S, E, generator=g)
    ref = wf.hidden_attention_reference(qp, x)
    for bn, sp, ht in ((32, 1, 16), (16, 3, 16), (32, 1, 32)):
        ha = wf.HiddenAttention(B, H, S, E, block_n=bn, splits=sp, head_tile=ht, dtype=torch.float32)
        ha.out.fill_(float("nan"))
        out = ha(qp, x)
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, ((B, H, S, E), (bn, sp, ht), err)
assert wf.hidden_slices(1280) == (5, 256) and wf.hidden_slices(384) == (3, 128) and wf.hidden_slices(1000) is None

m, feats = _varied_whisper()
gc = m.generation_config
n = 6
want = m.generate(feats, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")
fh = wf.FastWhisper(m, prompt_ids=wf.whisper_prompt_ids(gc), new_tokens=n,
                    begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id)
assert fh.cross == "hidden"  # the default where the kernel runs
got = fh.generate(feats)[:, -n:]
assert fh.attn_choice[3]["cross"].startswith("triton shared-hidden"), fh.attn_choice
assert torch.equal(want[:, -n:], got)
want = m.generate(feats[:2], max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")
fw = wf.FastWhisper(m, prompt_ids=wf.whisper_prompt_ids(gc), new_tokens=n,
                    begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id,
                    attn="triton", self_attn="triton", cross="kv")
got = fw.generate(feats[:2])[:, -n:]
assert fw.attn_choice[2]["cross"].startswith("triton") and fw.attn_choice[2]["self"].startswith("triton")
assert torch.equal(want[:, -n:], got)
print("KERNEL-OK")
"""


def _run_interpreted(script: Any, source: str) -> Any:
    """Run ``source`` as ``script`` in a fresh Python with triton's CPU interpreter (chosen when triton
    is imported, hence a new process), the repository on the path; the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script.write_text(source)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)


def test_decode_attention_kernel_matches_sdpa_and_generate(tmp_path):
    """The single-query Triton kernel, run by triton's CPU interpreter (a fresh process: the
    interpreter is chosen when triton is imported), against SDPA on whole K/V, split K/V and a
    device length; then greedy tokens through it (cross- and self-attention) equal generate's."""
    pytest.importorskip("triton")
    r = _run_interpreted(tmp_path / "kernel_check.py", _KERNEL_CHECK)
    assert r.returncode == 0 and "KERNEL-OK" in r.stdout, r.stderr[-3000:]


_GEGLU_CHECK = r"""
import torch
from bench.sd_geglu import geglu, geglu_reference
torch.manual_seed(0)
for M, K, N, cfg in ((200, 96, 80, (32, 32, 32, 4, 2)), (3 * 64, 64, 128, (64, 64, 64, 4, 2))):
    x, w, b = torch.randn(2, M // 2, K), torch.randn(2 * N, K) / K ** 0.5, torch.randn(2 * N)
    y = geglu(x, w, b, config=cfg)
    ref = geglu_reference(x.double(), w.double(), b.double())
    rel = float((y.double() - ref).abs().max() / ref.abs().max())
    assert y.shape == (2, M // 2, N) and rel < 1e-5, (M, K, N, rel)
    from diffusers.models.activations import GEGLU
    m = GEGLU(K, N).double()
    with torch.no_grad():
        assert torch.allclose(m(x.double()), geglu_reference(x.double(), m.proj.weight, m.proj.bias))
from tests.unit.test_optimized import _refuses

_refuses((geglu, bad, {}, msg) for bad, msg in (
    ((torch.randn(4, 8), torch.randn(15, 8), torch.randn(15)), "weight must be"),
    ((torch.randn(4, 8), torch.randn(16, 8), torch.randn(8)), "bias must be"),
    ((torch.randn(4, 8), torch.randn(16, 8).half(), torch.randn(16).half()), "one dtype")))
print("GEGLU-OK")
"""


def test_bench_geglu_one_kernel_is_the_modules_function(tmp_path):
    """The bench's one-kernel GEGLU (both halves' products in one Triton program, the gate in the
    epilogue), run by triton's CPU interpreter, against diffusers' arithmetic in float64 (value
    half first, exact GELU on the gate half), with tails in M and N; one clear error per bad input."""
    pytest.importorskip("triton")
    r = _run_interpreted(tmp_path / "geglu_check.py", _GEGLU_CHECK)
    assert r.returncode == 0 and "GEGLU-OK" in r.stdout, r.stderr[-3000:]


_ATTN_CHECK = r"""
import torch
from bench.sd_attention import attention, attention_reference, diffusers_qkv, head_parts, padded_part, _exp2_kernel
torch.manual_seed(0)
assert [head_parts(d) for d in (40, 80, 160, 64, 16, 8, 48, 100)] == [
    (32, 16), (64, 16), (128, 32), (64, 0), (16, 0), (16, 0), (32, 16), (64, 64)]
assert [padded_part(d) for d in (40, 80, 160, 64, 16, 8)] == [(64, 0), (128, 0), (256, 0), (64, 0), (16, 0), (16, 0)]

diffusers_layout = diffusers_qkv   # [B, S, H·D] viewed as [B, H, S, D]: SD's own strides

cases = ((2, 3, 70, 50, 40, (32, 16, 4, 2), (32, 16)), (2, 3, 70, 50, 40, (32, 16, 4, 2), None),
         (1, 2, 33, 77, 80, (16, 32, 4, 2), (64, 16)), (1, 2, 33, 77, 80, (16, 32, 4, 2), None),
         (1, 1, 16, 64, 64, (16, 16, 4, 1), None), (1, 2, 20, 9, 160, (16, 16, 4, 1), (128, 32)),
         (1, 2, 20, 9, 160, (16, 16, 4, 1), None))
for B, H, Sq, Sk, D, cfg, parts in cases:
    q, k, v = diffusers_layout(B, Sq, H, D), diffusers_layout(B, Sk, H, D), diffusers_layout(B, Sk, H, D)
    o = attention(q, k, v, config=cfg, parts=parts)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert torch.allclose(ref, torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    rel = float((o.double() - ref).abs().max() / ref.abs().max())
    assert o.shape == (B, H, Sq, D) and rel < 1e-5, (B, H, Sq, Sk, D, parts, rel)
# half precision (p cast to the inputs' dtype before PV), written into a given output
qh, kh, vh = (diffusers_layout(2, s, 2, 40).half() for s in (40, 70, 70))
out = torch.full((2, 2, 40, 40), float("nan"), dtype=torch.float16)
assert attention(qh, kh, vh, config=(16, 32, 4, 2), out=out) is out
ref = attention_reference(qh.double(), kh.double(), vh.double())
assert float((out.double() - ref).abs().max() / ref.abs().max()) < 3e-3
q = diffusers_layout(1, 8, 2, 40)
for bad, kw, msg in (((q, q, q[:, :1]), {}, "k and v must be"), ((q, q.double(), q), {}, "one dtype"),
                     ((q[..., ::2], q[..., ::2], q[..., ::2]), {}, "last dimension"),
                     ((q[0], q[0], q[0]), {}, "[B, H, S, D]"), ((q.double(),) * 3, {}, "float16, bfloat16 or float32"),
                     ((q, q, q), {"out": torch.empty(1, 2, 8, 41)}, "out must be"),
                     ((q, q, q), {"out": torch.empty(1, 2, 8, 40).half()}, "out must be"),
                     ((q, q, q), {"config": (48, 32, 4, 2)}, "config"), ((q, q, q), {"config": (8, 32, 4, 2)}, "config")):
    try:
        attention(*bad, **kw)
    except ValueError as e:
        assert msg in str(e), e
    else:
        raise AssertionError(msg)
for parts in ((32, 0), (48, 0), (32, 8)):
    try:
        attention(q, q, q, parts=parts)
    except ValueError as e:
        assert "parts" in str(e) and "D = 40" in str(e), e
    else:
        raise AssertionError(parts)
x = torch.rand(3 * 4 * 64) + 0.5
y = torch.full((4 * 64,), -1.0)   # 3 programs write y[:192]; the rest is a guard that must stay untouched
_exp2_kernel()[(3,)](x, y, ITERS=3, BLOCK=64)
ref = x.double().view(3, 4, 64)
for _ in range(3):
    ref = torch.exp2(ref - 1.0)
assert torch.allclose(y[:192].double(), ref.sum(1).reshape(-1), rtol=1e-5), (y, ref.sum(1))
assert bool((y[192:] == -1.0).all()), "the exp2 kernel wrote past its programs' outputs"
print("ATTN-OK")
"""


def test_bench_sd_attention_kernel_is_attention(tmp_path):
    """The bench's Triton attention for SD's heads, run by triton's CPU interpreter in diffusers'
    strided layout, against softmax(QKᵀ/√d)V in float64 (itself checked against SDPA): the two-part
    head forms (40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32) and the padded ones, tails in both
    sequences; one clear error per bad input or part split; the exp2 ceiling kernel computes exp2."""
    pytest.importorskip("triton")
    r = _run_interpreted(tmp_path / "attn_check.py", _ATTN_CHECK)
    assert r.returncode == 0 and "ATTN-OK" in r.stdout, r.stderr[-3000:]


def test_bench_sd_attention_pad_heads_keeps_the_attention():
    """``--pad-heads``: q, k, v padded with zero columns in diffusers' strided layout give the same
    attention at the true head's scale, the extra output columns zero; a width below the head is one
    clear error."""
    import math

    import torch
    import torch.nn.functional as F

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.sd_attention import attention_reference, diffusers_qkv, pad_heads, sdpa_padded

    g = torch.Generator().manual_seed(0)
    for D, width in ((40, 48), (40, 64), (80, 96), (8, 8)):
        q, k, v = (diffusers_qkv(2, s, 3, D, generator=g, dtype=torch.float64) for s in (37, 53, 53))
        qp, kp, vp = (pad_heads(x, width) for x in (q, k, v))
        assert qp.shape == (2, 3, 37, width) and qp.stride() == (37 * 3 * width, width, 3 * width, 1)
        assert torch.equal(qp[..., :D], q) and not qp[..., D:].any()
        out = F.scaled_dot_product_attention(qp, kp, vp, scale=1.0 / math.sqrt(D))
        assert not out[..., D:].any()
        # the bench's own candidate (CPU: the math backend)
        got = sdpa_padded(F, sdpa_kernel, SDPBackend.MATH, (qp, kp, vp), D)
        assert got.shape == q.shape
        assert torch.allclose(got, attention_reference(q, k, v), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="width 32 is narrower than the head \\(40 columns\\)"):
        pad_heads(diffusers_qkv(1, 4, 2, 40), 32)


@pytest.mark.parametrize("bad", ["44", "48,x", "0", "-8"])
@pytest.mark.parametrize("mode", [[], ["--check-parts"]])
def test_bench_sd_attention_bad_pad_widths_are_usage_errors(monkeypatch, capsys, bad, mode):
    """A ``--pad-heads`` width that is not a positive multiple of 8 stops the bench with a usage
    error naming the option and the value, before any kernel runs (``--check-parts`` too); good
    widths are read once each, in order."""
    import sys

    from bench import sd_attention

    monkeypatch.setattr(sys, "argv", ["sd_attention.py", "--pad-heads", bad, "--configs", "none", *mode])
    with pytest.raises(SystemExit) as ex:
        sd_attention.main()
    assert ex.value.code == 2
    assert (f"--pad-heads: expected widths that are positive multiples of 8, e.g. 48,64; got {bad!r}"
            in capsys.readouterr().err)
    assert sd_attention.pad_widths(" 64,48,,64 ") == [64, 48] and sd_attention.pad_widths("") == []


def test_bench_sd_attention_check_parts_sorts_children(monkeypatch):
    """``--check-parts`` runs each case in a child process and calls it right (within 2e-2 of
    float64), wrong, or a fault (non-zero exit, a hang, no error figure) with the child's own error
    line, not the hint line torch prints after a CUDA error."""
    import json
    import subprocess

    from bench import sd_attention

    seen = []
    replies = [(0, json.dumps({"max_rel_err": 3e-4}), ""), (0, json.dumps({"max_rel_err": 1.12}), ""),
               (1, "", "Traceback\ntorch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
                       "Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/ for more information.\n"),
               "hang", (0, json.dumps({"note": "no error figure"}), "")]

    def fake_run(argv, **kw):
        seen.append(argv)
        rep = replies[len(seen) - 1]
        if rep == "hang":
            raise subprocess.TimeoutExpired(argv, kw.get("timeout"))
        return subprocess.CompletedProcess(argv, rep[0], rep[1], rep[2])

    monkeypatch.setattr(subprocess, "run", fake_run)
    cases = [(1, 1, 128, 128, 40, (64, 64, 4, 1), (64, 0)), (1, 1, 128, 128, 40, (64, 64, 4, 1), (32, 16)),
             (64, 8, 4096, 4096, 40, (128, 64, 4, 3), (32, 16)), (1, 1, 8, 8, 40, (16, 16, 4, 1), (64, 0)),
             (1, 1, 8, 8, 40, (16, 16, 4, 1), (64, 0))]
    rows = sd_attention.check_parts(cases, timeout=5)
    assert [r["result"] for r in rows] == ["right", "wrong", "fault", "fault", "fault"]
    assert rows[0]["max_rel_err"] == 3e-4 and rows[1]["max_rel_err"] == 1.12
    assert "CUDA error: an illegal memory access" in rows[2]["error"] and "timed out" in rows[3]["error"]
    assert rows[4]["error"] and "max_rel_err" not in rows[4]
    assert seen[2][seen[2].index("--one") + 1] == "64,8,4096,4096,40,128,64,4,3,32,16"


def test_bench_cudnn_plans_layouts_knobs_and_usage_errors(monkeypatch, capsys):
    """The cuDNN-plans bench builds q, k, v in the product's layouts (strided views, no copies), walks
    every knob combination in order up to its limit, reads a knob under either attribute spelling,
    and refuses an unknown case as a usage error before it imports the frontend."""
    import math
    import sys
    import types

    from bench import cudnn_attention_plans as plans

    # SD: column blocks of one fused QKV product, row stride 3·H·D
    q, k, v = plans.qkv_views(2, 8, 16, 40, 3 * 320, True, dtype=torch.float32)
    assert q.shape == (2, 8, 16, 40) and q.stride() == (16 * 960, 40, 960, 1)
    assert k.data_ptr() == q.data_ptr() + 320 * 4 and v.data_ptr() == q.data_ptr() + 640 * 4
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    # Whisper's encoder: three products, row stride H·D
    q, k, v = plans.qkv_views(2, 20, 15, 64, 1280, False, dtype=torch.float32)
    assert q.stride() == (15 * 1280, 64, 1280, 1) and q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    for fused, row in ((True, 320), (False, 3 * 1280)):
        with pytest.raises(ValueError, match="row stride"):
            plans.qkv_views(1, 8 if fused else 20, 4, 40 if fused else 64, row, fused)
    for name, (B, H, S, D, row, fused) in plans.CASES.items():
        assert row == (3 if fused else 1) * H * D, name

    assert plans.knob_combinations([], 5) == [{}]
    assert plans.knob_combinations([("a", 0, 2, 1), ("b", 1, 5, 2)], 100) == [
        {"a": a, "b": b} for a in (0, 1, 2) for b in (1, 3, 5)]
    assert plans.knob_combinations([("a", 0, 36, 1)], 37)[-1] == {"a": 36}
    assert len(plans.knob_combinations([("a", 0, 36, 1)], 32)) == 32
    assert plans.knob_combinations([("a", 3, 4, 0)], 9) == [{"a": 3}, {"a": 4}]   # a stride ≤ 0 is 1
    kn = types.SimpleNamespace(type="KERNEL_CFG", min_value=0, max_value=36, stride=1)
    assert plans.knob_fields(kn) == ("KERNEL_CFG", 0, 36, 1)
    kn = types.SimpleNamespace(knob_type="TILE", min_value=1, max_value=4)
    assert plans.knob_fields(kn) == ("TILE", 1, 4, 1)

    # a plan is checked on both inputs, on buffers filled with NaN first, and timed either way
    refs = [torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)]
    outs = [torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 4)]
    timed = []

    def timer(f):
        timed.append(f)
        return 7.0

    def right(i):
        outs[i].copy_(refs[i])
        return outs[i]

    def silent(i):   # writes nothing: the buffer still holds what the last plan left
        return outs[i]

    def first_only(i):
        outs[i].copy_(refs[0])
        return outs[i]

    rec = plans.check_plan(right, outs, refs, lambda: None, timer)
    assert rec == {"err_of_largest": 0.0, "agrees": True, "us": 7.0}
    rec = plans.check_plan(silent, outs, refs, lambda: None, timer)   # outs hold the right answer until the fill
    assert rec["agrees"] is False and math.isnan(rec["err_of_largest"]) and rec["us"] == 7.0
    rec = plans.check_plan(first_only, outs, refs, lambda: None, timer)
    assert rec["agrees"] is False and rec["err_of_largest"] > plans.AGREE
    assert timed == [right, silent, first_only]
    near = refs[0] + plans.AGREE / 2 * refs[0].abs().max()
    assert 0 < plans.err_of_largest(near, refs[0]) <= plans.AGREE
    # the best is the fastest plan that agrees; wrong plans are never it, and are named if faster
    recs = [{"name": "a", "agrees": True, "us": 9.0}, {"name": "w", "agrees": False, "us": 3.0},
            {"name": "f", "failed": "compile"}, {"name": "b", "agrees": True, "us": 5.0},
            {"name": "n", "agrees": True, "us": float("nan")}, {"name": "b2", "agrees": True, "us": 5.0},
            {"name": "w", "agrees": False, "us": 4.0}, {"name": "slow", "agrees": False, "us": 50.0}]
    assert plans.fastest_agreeing(recs) == (3, ["w"])
    assert plans.fastest_agreeing([r for r in recs if r.get("agrees") is not True]) == (None, ["slow", "w"])
    assert plans.fastest_agreeing([]) == (None, [])
    assert plans.finite_json({"a": [float("nan"), 1.5], "b": float("inf"), "c": (float("-inf"),)}) == {
        "a": ["nan", 1.5], "b": "inf", "c": ["-inf"]}

    assert plans.parse_cases(" sd-64 ,whisper-enc,sd-64") == ["sd-64", "whisper-enc"]
    for bad in ("sd-65", "", "sd-64,nope"):
        with pytest.raises(ValueError, match="--cases: unknown"):
            plans.parse_cases(bad)
    monkeypatch.setitem(sys.modules, "cudnn", None)   # importing it would fail: the usage error comes first
    monkeypatch.setattr(sys, "argv", ["cudnn_attention_plans.py", "--cases", "sd-99"])
    with pytest.raises(SystemExit) as e:
        plans.main()
    assert e.value.code == 2 and "unknown sd-99" in capsys.readouterr().err


def test_bench_whisper_recipe_runs_in_a_child_and_a_crash_is_a_row(monkeypatch):
    """The Whisper compile recipe can take its process down (a segmentation fault was measured):
    the bench runs it in a child process; a crash becomes an error row naming the signal, a
    measurement comes back with its token agreement against the parent's stock tokens."""
    import argparse
    import json
    import subprocess
    from pathlib import Path

    from bench import cli as bench

    args = argparse.Namespace(new_tokens=4, repeats=2, dtype="float16", whisper_model="synthetic:whisper-smoke")
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    seen = {}

    def crash(argv, **kw):
        seen["argv"] = argv
        return subprocess.CompletedProcess(argv, -11, "", "compiling\nFatal Python error: Segmentation fault\n")

    monkeypatch.setattr(subprocess, "run", crash)
    row = bench._whisper_recipe_in_child(args, 2, ref, float("inf"))
    assert "--whisper-recipe-child" in seen["argv"] and seen["argv"][seen["argv"].index("--whisper-batch") + 1] == "2"
    assert row["variant"] == "recipe" and "SIGSEGV" in row["error"] and "Segmentation fault" in row["error"]
    assert "tokens_per_s" not in row

    def works(argv, **kw):
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"whisper": [{"variant": "recipe", "batch": 2, "tokens_per_s": 123.0}]}))
        torch.save(torch.tensor([[1, 2, 3, 4], [5, 6, 0, 8]]), str(out) + ".tokens.pt")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", works)
    row = bench._whisper_recipe_in_child(args, 2, ref, float("inf"))
    assert row["tokens_per_s"] == 123.0
    assert row["vs_stock"] == {"token_agreement": 7 / 8, "clips_identical": 0.5}


def test_event_time_us_times_n_calls_after_warmup(monkeypatch):
    """The one device-event timer of the optimized path: warm-up calls untimed, then n calls
    between two recorded events; mean µs per call."""
    from mi300x_cert.workloads.optimized import common

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, other):
            return 8.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    us = common.event_time_us(lambda i: log.append(i), 4, warmup=2)
    assert log == [0, 1, "record", 0, 1, 2, 3, "record", "sync"]
    assert us == 8.0 / 4 * 1e3


def test_inductor_settings_parse_validate_and_merge(monkeypatch):
    pytest.importorskip("torch._inductor.config")
    from mi300x_cert.workloads.optimized.common import (INDUCTOR_ENV, SD_INDUCTOR_DEFAULTS, inductor_settings,
                                                        parse_inductor_settings)

    got = parse_inductor_settings("coordinate_descent_tuning=true, freezing=0,triton.cudagraphs=off")
    assert got == {"coordinate_descent_tuning": True, "freezing": False, "triton.cudagraphs": False}
    assert parse_inductor_settings({"freezing": 1}) == {"freezing": True}
    assert parse_inductor_settings(None) == {} and parse_inductor_settings("") == {}
    with pytest.raises(ValueError, match="unknown Inductor setting 'no_such_knob'"):
        parse_inductor_settings("no_such_knob=1")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_inductor_settings("freezing")
    with pytest.raises(ValueError, match="MI300X_CERT_INDUCTOR: .*switch"):
        parse_inductor_settings("freezing=7", source=INDUCTOR_ENV)
    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    assert inductor_settings(None, SD_INDUCTOR_DEFAULTS) == {"conv_1x1_as_mm": True, "freezing": True}
    # the parameter adds to the defaults; the operator's variable wins over both
    monkeypatch.setenv(INDUCTOR_ENV, "freezing=false")
    assert inductor_settings({"coordinate_descent_tuning": True}, SD_INDUCTOR_DEFAULTS) == {
        "conv_1x1_as_mm": True, "freezing": False, "coordinate_descent_tuning": True}
    monkeypatch.setenv(INDUCTOR_ENV, "bogus=1")
    with pytest.raises(ValueError, match="MI300X_CERT_INDUCTOR: unknown Inductor setting 'bogus'"):
        inductor_settings()


def test_compile_module_passes_settings_for_this_compilation_only(monkeypatch):
    torch = pytest.importorskip("torch")
    from mi300x_cert.workloads.optimized.common import compile_module

    seen = {}

    def fake_compile(fn, **kw):
        seen.update(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    f = lambda x: x  # noqa: E731
    assert compile_module(f, device="cpu")[1] == "none (cpu)" and not seen
    out, label = compile_module(f, device="cuda", mode="reduce-overhead", options={"freezing": True})
    assert out is f and "mode" not in seen  # torch.compile takes a mode or options, not both
    assert seen["options"]["freezing"] is True and seen["options"]["triton.cudagraphs"] is True
    assert label == "torch.compile(reduce-overhead, fullgraph=True, freezing=True)"
    seen.clear()
    compile_module(f, device="cuda")
    assert seen["mode"] == "default" and "options" not in seen


class _Untouchable:
    """A workload that fails the test when touched: attach must refuse a bad parameter first."""

    def __getattr__(self, name):
        raise AssertionError(f"workload touched: {name}")


def test_sd_optimized_rejects_a_bad_inductor_setting_before_any_work():
    from mi300x_cert.workloads.optimized.sd_fast import attach_to_workload

    with pytest.raises(ValueError, match="optimized_inductor: unknown Inductor setting 'fast_please'"):
        attach_to_workload(_Untouchable(), {"optimized_inductor": "fast_please=true"})


def test_bench_rejects_a_bad_inductor_setting_as_a_usage_error(capsys):
    pytest.importorskip("torch._inductor.config")
    from bench import cli as bench

    with pytest.raises(SystemExit) as ex:
        bench.main(["--workload", "sd", "--sd-inductor", "freezing=true,warp_speed=9"])
    assert ex.value.code == 2
    assert "--sd-inductor: unknown Inductor setting 'warp_speed'" in capsys.readouterr().err


def test_bench_rejects_an_unknown_whisper_form_as_a_usage_error(capsys):
    """An unknown --whisper-encoder or --whisper-cross form is a usage error naming it, before any
    GPU work (there is no GPU here: reaching the card would fail differently)."""
    from bench import cli as bench

    for argv, msg in ((["--whisper-encoder", "auto,fused"], "--whisper-encoder: unknown fused"),
                      (["--whisper-cross", "kv,shared"], "--whisper-cross: unknown shared")):
        with pytest.raises(SystemExit) as ex:
            bench.main(["--workload", "whisper", *argv])
        assert ex.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "known:" in err, err


def test_bench_sd_variants_carry_inductor_settings_and_refuse_bad_ones(capsys, monkeypatch):
    """``--variants optimized+key=value`` measures Inductor settings beside the default in one run:
    each item's path and settings (over ``--sd-inductor``), and one usage error naming a bad item
    before the card is touched (asking torch for a card fails the test)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch._inductor.config")
    from bench import cli as bench

    def never() -> bool:
        raise AssertionError("the card was looked for before --variants was checked")

    monkeypatch.setattr(torch.cuda, "is_available", never)

    got = bench.sd_variants("stock, optimized,optimized+split_reductions=false+triton.prefer_nd_tiling=true",
                            {"coordinate_descent_tuning": True})
    assert got == [("stock", "stock", None),
                   ("optimized", "optimized", {"coordinate_descent_tuning": True}),
                   ("optimized+split_reductions=false+triton.prefer_nd_tiling=true", "optimized",
                    {"coordinate_descent_tuning": True, "split_reductions": False, "triton.prefer_nd_tiling": True})]
    assert bench.sd_variants("optimized+freezing=false", {"freezing": True})[0][2] == {"freezing": False}
    assert bench.sd_variants("recipe,optimized")[1] == ("optimized", "optimized", None)
    assert bench.sd_variants(" optimized + split_reductions=false ")[0][0] == "optimized+split_reductions=false"
    for variants, word in (("stock,optimised", "unknown variant 'optimised'"),
                           ("stock+freezing=false", "apply to the optimized path only"),
                           ("optimized+warp_speed=9", "unknown Inductor setting 'warp_speed'"),
                           ("optimized+split_reductions", "'split_reductions' is not key=value"),
                           ("optimized,optimized", "'optimized' measures the same as 'optimized'"),
                           ("optimized+freezing=true,optimized+", "an empty setting in 'optimized+'"),
                           ("optimized+split_reductions=false+combo_kernels=true,"
                            "optimized+combo_kernels=true+split_reductions=false", "measures the same as"),
                           (",", "no variant")):
        with pytest.raises(SystemExit) as ex:
            bench.main(["--workload", "sd", "--variants", variants])
        assert ex.value.code == 2 and word in capsys.readouterr().err, variants
    # rows of such variants render beside the default: by path, the default first
    rows = [{"variant": v, "batch": 1, "per_image_s": t, "tflops": 84.5 / t, "steps": 50, "unet_evals": 51,
             "dtype": "float16", "tflop_per_image": 84.5}
            for v, t in (("optimized+split_reductions=false", 0.324), ("stock", 1.3), ("optimized", 0.329))]
    text = bench.render_markdown([{"conditions": {"device": "card"}, "sd": rows, "gemm": {"n": 8192, "dtype": "bfloat16", "tflops": 780.0}}])
    order = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| 1 |")]
    assert order == ["stock", "optimized", "optimized+split_reductions=false"]
    assert "| 1 | optimized+split_reductions=false | 0.324 | 4.01 |" in text


def test_bench_energy_meter_and_its_sentence(monkeypatch):
    """``--energy``: ``card_energy`` reads the energy counter around the block (the device settled
    before and after) and summarizes the 10 Hz samples; the page says joules per image or token
    against the power limit, and nothing for rows measured without it. The card is faked."""
    from bench import cli as bench

    reads = iter([1000.0, 1700.0])
    settled = []  # settles and counter reads, in order

    class Counter:
        limit_w, matched, index = 700.0, "NVML device 2 by UUID", 2

        def joules(self):
            settled.append("read")
            return next(reads)

    polled = []

    class Poller:
        def __init__(self, rate, card=0):
            polled.append(card)  # the samples come from the counter's card, not NVML's first
            self.rows = [{"power_w": 690.0, "sclk_mhz": 1700.0, "throttle_reasons": "sw_power_cap"},
                         {"power_w": 700.0, "sclk_mhz": 1600.0, "throttle_reasons": "sw_power_cap"},
                         {"power_w": 695.0, "sclk_mhz": 1650.0, "throttle_reasons": None}]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(bench, "_COUNTER", [Counter()])
    monkeypatch.setattr(bench, "_NvmlPoller", Poller)
    with bench.card_energy(lambda: settled.append("settle")) as card:
        assert card == {}  # filled when the block ends
        settled.append("work")
    assert settled == ["settle", "read", "work", "settle", "read"] and polled == [2]
    assert card["joules"] == 700.0 and card["power_limit_w"] == 700.0
    assert card["mean_power_w"] == pytest.approx(700.0 / card["s"])
    assert card["power_w_median"] == 695.0 and card["sm_clock_mhz_median"] == 1650.0
    assert card["sm_clock_mhz_min"] == 1600.0 and card["clock_reasons_most_seen"] == "sw_power_cap"
    sd = [{"variant": "optimized", "batch": 32, "per_image_s": 0.218, "tflops": 390.0, "steps": 50, "unet_evals": 51,
           "tflop_per_image": 84.5, "dtype": "float16",
           "energy": {"joules_per_image": 150.0, "mean_power_w": 690.0, "power_limit_w": 700.0,
                      "sm_clock_mhz_median": 1600.0, "clock_reasons_most_seen": "sw_power_cap"}},
          {"variant": "stock", "batch": 32, "per_image_s": 0.3, "tflops": 280.0, "steps": 50, "unet_evals": 51,
           "tflop_per_image": 84.5, "dtype": "float16"}]
    text = bench.render_markdown([{"conditions": {}, "sd": sd}])
    assert ("b32 optimized: 150.00 J per image, 690 W = 99% of the 700 W limit, SM clock 1600 MHz (sw_power_cap), "
            "at the limit ≥ 0.2143 s per image.") in text  # 150 J at 700 W
    assert "for rows at ≥ 90% of the power limit: the rate that limit allows for the same joules per image)" in text
    # the power limit's bound, seconds per unit: only where the row ran near the limit (a row far
    # below it spent joules waiting on the host), by the whole percent the sentence shows
    assert bench.power_bound(0.058, 700.0, 692.0) == pytest.approx(0.058 / 700.0)
    assert bench.power_bound(150.0, 700.0, 690.0) == pytest.approx(150.0 / 700.0)
    assert bench.power_bound(150.0, 700.0, 626.0) is None  # shown as 89%
    assert bench.power_bound(150.0, 700.0, 627.0) is not None  # shown as 90% (89.6)
    for bad in ((None, 700.0, 690.0), (150.0, None, 690.0), (150.0, 700.0, None), (0.0, 700.0, 690.0),
                (-1.0, 700.0, 690.0), (150.0, -700.0, 690.0)):
        assert bench.power_bound(*bad) is None, bad
    wh = [{"variant": "optimized", "batch": 1024, "tokens_per_s": 11900.0, "batch_latency_s": 11.0, "tokens": 131072,
           "energy": {"joules_per_token": 0.058, "mean_power_w": 692.0, "power_limit_w": 700.0,
                      "sm_clock_mhz_median": 1830.0, "clock_reasons_most_seen": "sw_power_cap"}},
          {"variant": "optimized", "batch": 64, "tokens_per_s": 6300.0, "batch_latency_s": 1.3, "tokens": 8192,
           "energy": {"joules_per_token": 0.0807, "mean_power_w": 511.0, "power_limit_w": 700.0,
                      "sm_clock_mhz_median": 1980.0, "clock_reasons_most_seen": "sw_power_cap"}}]
    wtext = bench.render_markdown([{"conditions": {}, "whisper": wh}]).split("Energy of the timed batches")[1]
    assert wtext.startswith(" (the card's energy counter; `--energy`; \"at the limit\", for rows at ≥ 90% of the power "
                            "limit: the rate that limit allows for the same joules per token): ")
    assert "b1024 optimized: 58.0 mJ per token, 692 W = 99% of the 700 W limit, SM clock 1830 MHz (sw_power_cap), " \
           "at the limit ≤ 12069 tok/s;" in wtext
    assert "b64 optimized: 80.7 mJ per token, 511 W = 73% of the 700 W limit, SM clock 1980 MHz (sw_power_cap)." in wtext
    below = bench.render_markdown([{"conditions": {}, "whisper": wh[1:]}])  # no row near the limit: no bound, no gloss
    assert "Energy of the timed batches (the card's energy counter; `--energy`): b64 optimized:" in below
    assert "at the limit" not in below
    assert "Energy of" not in bench.render_markdown([{"conditions": {}, "sd": sd[1:]}])
    assert bench.build_parser().parse_args(["--energy"]).energy is True
    # a row's energy: joules over all its items, its batches' mean time beside them
    row = bench.energy_row({"joules": 960.0, "s": 6.0}, 32 * 5, "image", 1.2)
    assert row["joules_per_image"] == 6.0 and row["mean_batch_s"] == 1.2 and row["joules"] == 960.0
    with bench._row_energy(bench.build_parser().parse_args([]), None) as nothing:
        assert nothing == {}  # without --energy the card is not touched (torch not even asked)


def test_bench_energy_counter_finds_torchs_card_or_refuses(monkeypatch):
    """The energy counter reads torch's card: NVML's only device, else the one whose UUID is
    torch's (NVML ignores CUDA_VISIBLE_DEVICES); no match, or a card without the counter, is one
    clear error, and ``--energy`` turns it into a usage error before anything is measured."""
    torch = pytest.importorskip("torch")
    import sys
    import types

    from bench import cli as bench

    class FakeNvml(types.ModuleType):
        def __init__(self, uuids, counter_ok=True):
            super().__init__("pynvml")
            self.uuids, self.counter_ok = uuids, counter_ok

        def nvmlInit(self):
            pass

        def nvmlDeviceGetCount(self):
            return len(self.uuids)

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetUUID(self, h):
            return self.uuids[h].encode()

        def nvmlDeviceGetEnforcedPowerLimit(self, h):
            return 700_000

        def nvmlDeviceGetTotalEnergyConsumption(self, h):
            if not self.counter_ok:
                raise RuntimeError("Not Supported")
            return 5_000 * (h + 1)

    class Props:
        uuid = "BBBB-2"

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(["GPU-aaaa-1", "GPU-bbbb-2", "GPU-cccc-3"]))
    c = bench._EnergyCounter()
    assert c.matched == "NVML device 1 by UUID" and c.index == 1 and c.joules() == 10.0 and c.limit_w == 700.0
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(["GPU-zzzz"]))
    assert bench._EnergyCounter().matched == "the only NVML device"
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(["GPU-aaaa-1", "GPU-cccc-3"]))
    with pytest.raises(RuntimeError, match="which of the 2 NVML devices"):
        bench._EnergyCounter()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(["GPU-bbbb-2"], counter_ok=False))
    with pytest.raises(RuntimeError, match="Not Supported"):
        bench._EnergyCounter()
    monkeypatch.setattr(bench, "_COUNTER", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    err = []
    monkeypatch.setattr(bench, "measure_gemm", lambda *a, **k: err.append("measured") or {})
    with pytest.raises(SystemExit) as e:
        bench.main(["--energy", "--workload", "gemm"])
    assert e.value.code == 2 and not err  # refused before anything was measured


def test_whisper_partition_refuses_bad_shares_before_the_model(capsys, monkeypatch):
    """``bench/whisper_partition.py``: multiprocessor shares parsed once, and one usage error naming
    a bad share, a side-by-side run without shares or a batch that is not whole encoder chunks,
    before the card is touched or the model built (either fails the test here)."""
    torch = pytest.importorskip("torch")
    from bench import cli as bench_cli
    from bench import whisper_partition as wp

    def never(*a, **k):
        raise AssertionError("the card or the model was touched before the arguments were checked")

    monkeypatch.setattr(bench_cli, "_whisper_model", never)
    for name in ("init", "is_available", "get_device_properties", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, never)
    assert wp.parse_shares("80, 96", "--side-by-side") == [80, 96]
    for argv, word in ((["--side-by-side", "80,x"], "--side-by-side: expected distinct positive"),
                       (["--side-by-side", "80,80"], "--side-by-side: expected distinct positive"),
                       (["--sms", "0,64"], "--sms: expected distinct positive"),
                       (["--only-side-by-side"], "--only-side-by-side needs --side-by-side"),
                       (["--energy", "--energy-rounds", "0"], "--energy-rounds 0 must be at least 1"),
                       (["--batch", "1000"], "--batch 1000 must be a positive multiple of --encoder-chunk 128")):
        with pytest.raises(SystemExit) as e:
            wp.main(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err, argv


def test_whisper_energy_parts_do_a_whole_batch_each_and_bound_by_the_power_limit(monkeypatch):
    """``bench/whisper_partition.py --energy``: decoding alone replays every decode step of the
    batch once, the encoder alone encodes every clip once, series does both (chunks interleaved
    with the steps); rounds alternate their order; the summary's power bound is the parts' joules
    at the card's limit. The card is replaced by counters (each part's joules = its work)."""
    torch = pytest.importorskip("torch")
    from bench import whisper_partition as wp

    work = {"steps": 0, "clips": 0}
    order: list[str] = []

    class Graph:
        def replay(self):
            work["steps"] += 1

    class Pos:
        def copy_(self, other):
            return self

    class FW:
        total, prompt, encoder_chunk = 132, [1, 2, 3, 4], 4

        def _encode(self, x):
            work["clips"] += len(x)

    B = 16
    st = {"tokens": torch.zeros(B, 1), "graph": Graph(), "pos": Pos()}
    feats = list(range(B))
    J_STEP, J_CLIP, LIMIT, IDLE_W = 2.0, 10.0, 700.0, 100.0
    ROUND_SCALE = [1.0, 1.5, 0.9]  # each part's joules in its 1st, 2nd, 3rd round: the medians take 1.0

    def fake_sampled(fn, settle):
        before = dict(work)
        res = fn()
        steps, clips = work["steps"] - before["steps"], work["clips"] - before["clips"]
        order.append("idle" if not steps and not clips else "decoding" if not clips else
                     "encoder" if not steps else "series")
        j = (steps * J_STEP + clips * J_CLIP) * ROUND_SCALE[sum(o == order[-1] for o in order) - 1]
        if order[-1] == "idle":
            return res, {"s": 2.0, "joules": 2.0 * IDLE_W, "mean_power_w": IDLE_W, "power_limit_w": LIMIT}
        return res, {"s": j / LIMIT * (1.1 if order[-1] == "series" else 1.0), "joules": j,
                     "mean_power_w": LIMIT, "power_limit_w": LIMIT}

    monkeypatch.setattr(wp, "sampled", fake_sampled)
    monkeypatch.setattr(wp.time, "sleep", lambda s: None)
    out = wp.energy_parts(FW(), st, Pos(), feats, 3, lambda k, v: None)
    T = FW.total - 1
    assert order == ["idle", "decoding", "encoder", "series", "series", "encoder", "decoding",
                     "decoding", "encoder", "series"]
    assert work == {"steps": 3 * 2 * T, "clips": 3 * 2 * B}
    r0 = out["rounds"][0]
    assert r0["decoding"]["joules"] == T * J_STEP and r0["encoder"]["joules"] == B * J_CLIP
    assert r0["series"]["joules"] == T * J_STEP + B * J_CLIP  # every step and every clip, once
    assert out["rounds"][1]["series"]["joules"] == 1.5 * (T * J_STEP + B * J_CLIP)
    sm = out["summary"]
    new_tokens = B * (T + 1 - len(FW.prompt))
    E = T * J_STEP + B * J_CLIP  # the medians of the rounds: the first round's
    assert out["new_tokens_per_batch"] == new_tokens == B * 128
    assert sm["median_of_rounds"]["decoding"]["joules"] == T * J_STEP
    assert sm["power_bound_batch_s"] == pytest.approx(E / LIMIT)
    assert sm["power_bound_tokens_per_s"] == pytest.approx(new_tokens * LIMIT / E)
    assert sm["series_tokens_per_s"] == pytest.approx(sm["power_bound_tokens_per_s"] / 1.1)
    assert sm["parts_in_series_tokens_per_s"] == pytest.approx(new_tokens * LIMIT / E)
    assert sm["joules_per_clip_encoder"] == pytest.approx(J_CLIP)
    assert sm["joules_per_token_decoding"] == pytest.approx(T * J_STEP / new_tokens)
    assert sm["joules_per_token"] == pytest.approx(E / new_tokens)
    assert sm["series_joules_vs_parts"] == pytest.approx(1.0)
    assert sm["joules_per_token_for_13000_at_limit"] == pytest.approx(LIMIT / 13000)
    # the idle card's power counted once: (E - idle W x parts' s) / (limit - idle W)
    assert sm["idle_w"] == IDLE_W
    assert sm["power_bound_batch_s_idle_once"] == pytest.approx((E - IDLE_W * E / LIMIT) / (LIMIT - IDLE_W))


def test_cuda_hidden_attention_shapes_and_refusals():
    """The CUDA hidden-form kernel: which shapes it takes, one clear error for the rest, its
    shared memory within a Hopper block's 227 KB for every candidate at Whisper large-v3 shapes,
    and no offer of it where it cannot run (here: no CUDA device)."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc

    assert hc.cuda_hidden_fits(20, 1280, 8) is None
    assert "d_model 1000" in hc.cuda_hidden_fits(20, 1000, 8)
    assert "40 heads" in hc.cuda_hidden_fits(40, 1280, 8)
    # the candidates, and the bench-only cluster form (two blocks per clip) at the same shapes
    for cfg in hc.CUDA_HIDDEN_CONFIGS + ((8, 4, 1, 32, 0, 0, 1, 1, 0, 2), (8, 3, 1, 32, 0, 0, 1, 1, 0, 2)):
        cl = cfg[9] if len(cfg) > 9 else 1
        pm = cfg[10] if len(cfg) > 10 else 0
        ur = bool(cfg[11]) if len(cfg) > 11 else False
        assert hc.smem_bytes(1280, 20, cfg[0], cfg[1], cfg[3], bool(cfg[4]), bool(cfg[6]), cl, pm, ur) <= 227 * 1024, cfg
        lz = bool(cfg[12]) if len(cfg) > 12 else False
        src = hc.kernel_source(20, 1280, cfg[0], cfg[1], *cfg[3:8], cluster=cl, persist=pm, seq=1500, unit_ring=ur,
                               lazy=lz)
        assert f"#define UR {int(ur)}" in src and f"#define LAZY {int(lz)}" in src
        assert ("#define LAZY_LOG2 8.0f" in src) == lz
        assert f"#define EW {1280 // cl // cfg[0]}" in src and "#define NT 3" in src and "hidden_attn_cuda" in src
        assert f"#define CL {cl}" in src
        key = hc.CudaHiddenAttention.config_key(cfg)
        assert key.startswith(f"cuda w{cfg[0]} st{cfg[1]} s{cfg[2]}") and key.endswith(" c2") == (cl == 2), key
    # a cluster of two blocks per clip: half the columns (and accumulators) per block, one set of
    # per-warp partial scores, summed scores per block of the cluster and tile parity
    assert hc.smem_bytes(1280, 20, 8, 4, 32, bulk=True, cluster=2) == 4 * 32 * 648 * 2 + (8 + 4) * 24 * 36 * 4 + 64
    with pytest.raises(ValueError, match="cluster must be 1 or 2"):
        hc.kernel_source(20, 1280, 8, 3, rows=32, bulk=True, red2=True, cluster=4)
    with pytest.raises(ValueError, match="cluster of blocks goes with bulk copies and scores summed once"):
        hc.kernel_source(20, 1280, 8, 3, rows=32, bulk=True, cluster=2)
    with pytest.raises(ValueError, match="per block of a cluster of 2"):
        hc.kernel_source(20, 384, 8, 3, rows=32, bulk=True, red2=True, cluster=2)
    with pytest.raises(ValueError, match="bulk copies go with the plain loop"):
        hc.kernel_source(20, 1280, 8, 3, pipe=True, bulk=True)
    with pytest.raises(ValueError, match="rows must be one of"):
        hc.kernel_source(20, 1280, 8, 3, rows=24)
    with pytest.raises(ValueError, match="stages must be ≥ 3 for the pipelined"):
        hc.kernel_source(20, 1280, 8, 2, pipe=True)
    # the persistent form: its own kernel (same shared memory as the per-clip bulk form), its key, and
    # one clear error for what it does not go with
    src = hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=True, seq=1500)
    assert "#define PERSIST 1" in src and "#define SEQ 1500" in src and "#define PERSIST 0" in hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True)
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 1)) == "cuda w8 st2 s1 r32 tr persistent"
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2)) == "cuda w8 st2 s1 r32 tr persistent staged"
    # the bench-only lazy rescale and L2 prefetch (measured slower, not candidates): their keys, their
    # macros, and one clear error where the prefetch does not go
    assert [c for c in hc.CUDA_HIDDEN_CONFIGS if len(c) > 12 and any(c[12:])] == [(8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1)]
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1)) == \
        "cuda w8 st2 s1 r32 tr persistent staged lazy"
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 0, 0, 1)) == "cuda w8 st2 s1 r32 tr lazy"
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 0, 2)) == \
        "cuda w8 st2 s1 r32 tr persistent staged L2+2"
    assert len({hc.CudaHiddenAttention.config_key(c) for c in hc.CUDA_HIDDEN_CONFIGS}) == len(hc.CUDA_HIDDEN_CONFIGS)
    src = hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=2, seq=1500, lazy=True, prefetch=2)
    assert "#define LAZY 1" in src and "#define LAZY_LOG2 8.0f" in src and "#define PF 2" in src
    assert "#define PF 0" in hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=2, seq=1500)
    for bad in (dict(persist=0), dict(persist=1, unit_ring=True, stages=5), dict(persist=2, prefetch=9),
                dict(persist=2, prefetch=1.5)):
        kw = {**dict(rows=32, bulk=True, red2=True, seq=1500, stages=2, prefetch=2), **bad}
        with pytest.raises(ValueError, match="L2 prefetch goes with the persistent form"):
            hc.kernel_source(20, 1280, 8, **kw)
    # the last warp done with a stage refills it (15th element): persistent stages only
    assert hc.CudaHiddenAttention.config_key((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 0, 0, 1)) == \
        "cuda w8 st2 s1 r32 tr persistent staged last-refill"
    assert "#define LASTW 1" in hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=2, seq=1500,
                                                 last_refills=True)
    assert "#define LASTW 0" in hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=2, seq=1500)
    for bad in (dict(persist=0), dict(persist=1, unit_ring=True, stages=5), dict(persist=2, prefetch=1)):
        kw = {**dict(rows=32, bulk=True, red2=True, seq=1500, stages=2, last_refills=True), **bad}
        with pytest.raises(ValueError, match="last warp's refill goes with the persistent form"):
            hc.kernel_source(20, 1280, 8, **kw)
    with pytest.raises(ValueError, match="at most 15 elements"):
        hc.CudaHiddenAttention.from_config(4, 20, 1500, 1280, (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 1, 1, 1))
    # staged output: a clip's [heads × (E + 8)] fp16 rows where the partial scores were, or more room
    assert hc.smem_bytes(1280, 20, 8, 2, 32, bulk=True, persist=2) == hc.smem_bytes(1280, 20, 8, 2, 32, bulk=True)
    assert hc.smem_bytes(1024, 16, 8, 3, 16, bulk=True, persist=2) == 3 * 16 * 1032 * 2 + 16 * 1032 * 2 + 16 * 20 * 4 + 48
    with pytest.raises(ValueError, match="persist must be 0, 1 or 2"):
        hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=3, seq=1500)
    assert hc.handover_values(20, 1280, 8) == 10 * 3 * 4 + 2 * 3
    for bad in (dict(bulk=False, red2=True), dict(bulk=True, red2=False), dict(bulk=True, red2=True, mode=1),
                dict(bulk=True, red2=True, qsmem=True)):
        with pytest.raises(ValueError, match="persistent form goes with bulk copies"):
            hc.kernel_source(20, 1280, 8, 2, 32, persist=True, seq=1500, **bad)
    with pytest.raises(ValueError, match="diagnostic modes 3 and 4 only"):
        hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=1, seq=1500, mode=2)
    with pytest.raises(ValueError, match="diagnostic mode 4 is for the persistent form"):
        hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, mode=4)
    assert "#define MODE 3" in hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=2, seq=1500, mode=3)
    with pytest.raises(ValueError, match="blocks \\(got 4\\) is for the persistent form"):
        hc.CudaHiddenAttention(4, 20, 1500, 1280, rows=32, bulk=True, red2=True, blocks=4)
    with pytest.raises(ValueError, match="needs at least 32 encoder positions, got 20"):
        hc.kernel_source(20, 1280, 8, 2, 32, bulk=True, red2=True, persist=True, seq=20)
    # the unit ring: `stages` 16-row units (five at large-v3 shapes: three on their way while a tile is
    # computed), one set of partial scores for the real heads only, direct stores
    assert hc.smem_bytes(1280, 20, 8, 5, 32, bulk=True, persist=1, unit_ring=True) == \
        5 * 16 * 1288 * 2 + 8 * 20 * 36 * 4 + 20 * 36 * 4 + 5 * 16 == 232080
    assert hc.smem_bytes(1280, 20, 8, 5, 32, bulk=True, persist=1) > 227 * 1024  # five 32-row stages: no
    assert hc.score_buffers(1, unit_ring=True) == (1, 1) and hc.score_heads(20) == 24
    # the real heads only where the padded ones leave no room for the units (five: yes; four: no)
    assert hc.score_heads(20, 1280, 8, 5, 32, unit_ring=True) == 20 and hc.score_heads(20, 1280, 8, 4, 32, unit_ring=True) == 24
    assert hc.smem_bytes(1280, 20, 8, 4, 32, bulk=True, persist=1, unit_ring=True) == \
        4 * 16 * 1288 * 2 + 8 * 24 * 36 * 4 + 24 * 36 * 4 + 4 * 16
    src = hc.kernel_source(20, 1280, 8, 5, 32, bulk=True, red2=True, persist=1, seq=1500, unit_ring=True)
    assert "#define UR 1" in src and "#define REDF 5760" in src and "#define NREDB 1" in src
    assert hc.CudaHiddenAttention.config_key((8, 5, 1, 32, 0, 0, 1, 1, 0, 1, 1, 1)) == \
        "cuda w8 st5 s1 r32 tr persistent unit ring"
    for bad, word in ((dict(persist=2), "persist 1, got 2"), (dict(persist=1, rows=16), "32-row tiles \\(got 16\\)"),
                      (dict(persist=1, mode=3), "no diagnostic mode \\(got 3\\)")):
        kw = {**dict(rows=32, bulk=True, red2=True, seq=1500, unit_ring=True), **bad}
        with pytest.raises(ValueError, match=word):
            hc.kernel_source(20, 1280, 8, 5, **kw)
    with pytest.raises(ValueError, match="the unit ring goes with the persistent form"):
        hc.kernel_source(20, 1280, 8, 5, 32, bulk=True, red2=True, unit_ring=True)
    ok, why = hc.cuda_hidden_available("cpu")
    assert not ok and why == "not a CUDA device"


def test_fastest_config_is_not_decided_by_the_order_under_drift():
    """The launch-configuration chooser times the candidates that pass their check in rounds, every
    other round reversed, and scores each by its mean: a card that slows steadily while they run
    one after another (here +5 µs per timing) does not hand the choice to whichever came first. A
    candidate over the error limit, one that fails to build and one that fails while timed are out,
    with their reasons; where nothing is timed only the first configuration is tried."""
    from mi300x_cert.workloads.optimized.whisper_fast import fastest_config

    true_us = {"a": 100.0, "b": 98.0, "c": 99.0, "bad": 50.0, "boom": 10.0, "flaky": 1.0, "dead": 2.0}
    calls: list[str] = []

    def build(c):
        if c == "boom":
            raise RuntimeError("no such launch")
        return c

    def time_us(k):
        if k == "dead" or (k == "flaky" and "flaky" in calls):
            raise RuntimeError("launch failed")
        calls.append(k)
        return true_us[k] + 5.0 * (len(calls) - 1)

    rec: dict = {}
    times, best = fastest_config(("a", "dead", "b", "c", "bad", "boom", "flaky"), key=str, build=build,
                                 error=lambda k: 1.0 if k == "bad" else 0.0, limit=0.5, describe="err {:.1f}",
                                 time_us=time_us, timed=True, rec=rec)
    assert best is not None and best[1] == "b", (times, best)
    # the second round reversed; "dead" failed in the first round and is not timed again, "flaky" in the second
    assert calls == ["a", "b", "c", "flaky", "c", "b", "a"]
    # each mean carries the same drift (+15 µs): the order is the true one, b < c < a
    assert {k: times[k] for k in "abc"} == {"a": 115.0, "b": 113.0, "c": 114.0}
    assert times["bad"] != times["bad"] and rec["rejected"]["bad"] == "err 1.0"
    assert "RuntimeError: no such launch" in rec["rejected"]["boom"] and "boom" not in times
    assert "RuntimeError: launch failed" in rec["rejected"]["flaky"] and "flaky" not in times
    assert "RuntimeError: launch failed" in rec["rejected"]["dead"] and "dead" not in times
    with pytest.raises(ValueError, match="configurations share a key"):
        fastest_config(("a", "a"), key=str, build=build, error=lambda k: 0.0, limit=0.5, describe="",
                       time_us=time_us, timed=True, rec={})
    rec = {}
    times, best = fastest_config(("a", "b"), key=str, build=build, error=lambda k: 0.0, limit=0.5, describe="",
                                 time_us=time_us, timed=False, rec=rec)
    assert times == {"a": 0.0} and best == (0.0, "a") and not rec


def test_hidden_chooser_times_triton_and_cuda_candidates_together(monkeypatch):
    """The hidden-form chooser on a (mocked) NVIDIA card: the Triton and CUDA kernels' launch
    configurations are one candidate list, timed in the same alternating rounds, so a card slowing
    while they run does not favour the group timed first; a candidate that misses the float32
    reference is out. The decode step gets the fastest, labelled."""
    import mi300x_cert.workloads.optimized.hidden_attn_cuda as hc
    import mi300x_cert.workloads.optimized.whisper_fast as wf
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, hidden_attention_reference, whisper_prompt_ids

    m, _ = _varied_whisper()
    fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(m.generation_config), new_tokens=2)
    fw.dtype = torch.float16
    B, S = 3, 40
    x = torch.randn(B, S, fw.E, generator=torch.Generator().manual_seed(2)).half()
    st = {"tokens": torch.zeros(B, 4, dtype=torch.long), "S": S, "enc": x}
    true_us = {"triton b32 s1 w4 st3 h16": 120.0, "triton b64 s1 w4 st2 h16": 125.0,
               "cuda w8 st2 s1 r32 tr": 110.0, "cuda w8 st2 s1 r32 tr persistent staged": 104.0,
               "cuda w8 st3 s1 r16 tr": 90.0}
    timed_calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __call__(self, qp, xx):
            out = hidden_attention_reference(qp, xx)
            return out * 1.5 if self.name == "cuda w8 st3 s1 r16 tr" else out  # wrong: rejected

        def label(self):
            return f"fake {self.name}"

    def fake_time(fn, n):
        fn(0)
        timed_calls.append(fake_time.last)
        return true_us[fake_time.last] + 10.0 * (len(timed_calls) - 1)  # the card slows as it goes

    def make(name):
        def call(qp, xx, k=Fake(name)):
            fake_time.last = name
            return k(qp, xx)
        call.label = lambda: f"fake {name}"
        return call

    monkeypatch.setattr(wf, "HIDDEN_ATTN_CONFIGS", ((32, 1, 4, 3, 16), (64, 1, 4, 2, 16)))
    monkeypatch.setattr(wf, "HiddenAttention", lambda B, H, S, E, block_n, splits, num_warps, num_stages, head_tile,
                        device, dtype: make(f"triton b{block_n} s{splits} w{num_warps} st{num_stages} h{head_tile}"))
    monkeypatch.setattr(hc, "CUDA_HIDDEN_CONFIGS", ((8, 2, 1, 32, 0, 0, 1, 1), (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2),
                                                    (8, 3, 1, 16, 0, 0, 1, 1)))
    monkeypatch.setattr(hc, "cuda_hidden_available", lambda dev: (True, ""))
    monkeypatch.setattr(hc.CudaHiddenAttention, "from_config",
                        classmethod(lambda cls, B, H, S, E, c, **kw: make(hc.CudaHiddenAttention.config_key(c))))
    monkeypatch.setattr(wf, "event_time_us", fake_time)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    rec: dict = {}
    fw._choose_hidden(st, rec, timed=True)
    # 4 candidates pass, timed forward then backward: every mean carries the same +35 µs
    assert timed_calls == ["triton b32 s1 w4 st3 h16", "triton b64 s1 w4 st2 h16", "cuda w8 st2 s1 r32 tr",
                           "cuda w8 st2 s1 r32 tr persistent staged", "cuda w8 st2 s1 r32 tr persistent staged",
                           "cuda w8 st2 s1 r32 tr", "triton b64 s1 w4 st2 h16", "triton b32 s1 w4 st3 h16"]
    assert rec["us_per_layer"]["cuda w8 st2 s1 r32 tr persistent staged"] == 139.0
    assert rec["us_per_layer"]["triton b32 s1 w4 st3 h16"] == 155.0
    assert "max rel diff" in rec["rejected"]["cuda w8 st3 s1 r16 tr"]
    assert rec["cross"] == "fake cuda w8 st2 s1 r32 tr persistent staged"
    assert st["xattn"].label() == rec["cross"]
    # on a card without the bulk-copy engine (compute capability 8.x) the bulk forms are not candidates
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0))
    monkeypatch.setattr(hc, "CUDA_HIDDEN_CONFIGS", ((8, 2, 1, 32, 0, 0, 1, 1), (8, 3, 1, 16, 0, 0, 0, 1)))
    true_us["cuda w8 st3 s1 r16 r"] = 80.0
    timed_calls.clear()
    rec = {}
    fw._choose_hidden(st, rec, timed=True)
    assert set(rec["us_per_layer"]) == {"triton b32 s1 w4 st3 h16", "triton b64 s1 w4 st2 h16", "cuda w8 st3 s1 r16 r"}
    assert rec["cross"] == "fake cuda w8 st3 s1 r16 r"


def test_encoder_bench_classifies_kernels_and_refuses_bad_arguments(capsys):
    """The encoder bench's device-time classes (products, attention, Inductor's kernels, other) by
    kernel name, and one usage error naming an unknown variant or a bad chunk size before any GPU
    work."""
    from bench.whisper_encoder import kernel_class, main

    assert kernel_class("nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "gemm"
    assert kernel_class("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc") == "gemm"
    assert kernel_class("triton_tem_fused_addmm_gelu_3") == "gemm"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_class("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
                        "cutlass::half_t>>") == "attention"
    assert kernel_class("triton_red_fused_add_clamp_native_layer_norm_view_11") == "inductor"
    # Inductor's layout copies before an attention call are its own kernels, not the attention's
    assert kernel_class("triton_poi_fused__scaled_dot_product_cudnn_attention__unsafe_view_clone_mul") == "inductor"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<8, GeluCUDAKernelImpl>") == "other"
    assert kernel_class("_linear_gelu_kernel") == "gemm"   # the fast encoder's fused product
    for argv, word in ((["--variants", "default,fastest"], "fastest"), (["--variants", "cdt+flsh"], "cdt+flsh"),
                       (["--variants", "default,cdt,default"], "each variant once"),
                       (["--chunks", "0"], "positive clip counts"), (["--chunks", "abc"], "positive clip counts")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err


def test_sd_profile_sums_kernels_per_run_by_class():
    """``bucket_kernels``: per run (launches over ``reps``), ms and launches by class, largest first,
    the total, the largest kernels, and the largest of no class (memsets, the scheduler's ops)."""
    from bench.sd_profile import bucket_kernels

    got = bucket_kernels({"nvjet_sm90_hsh_x_bias_TNN": [30.0, 30.0, 30.0, 30.0],
                          "triton_poi_fused_add_0": [5.0, 5.0],
                          "Memset (Unknown)": [1.0] * 6,
                          "void at::native::vectorized_elementwise_kernel<add>": [2.0, 2.0]}, reps=2)
    assert got["ms_by_bucket"] == {"gemm": 0.06, "other": 0.005, "inductor": 0.005}
    assert got["calls_by_bucket"] == {"gemm": 2.0, "other": 4.0, "inductor": 1.0}
    assert got["ms_total"] == 0.07 and got["top"][0]["name"] == "nvjet_sm90_hsh_x_bias_TNN"
    assert [k["name"] for k in got["top_other"]] == ["Memset (Unknown)", "void at::native::vectorized_elementwise_kernel<add>"]
    assert got["top_other"][0]["calls_per_eval"] == 3.0 and got["top_other"][0]["ms_per_eval"] == 0.003


def test_bench_sd_phases_and_profile_never_cost_the_row(monkeypatch):
    """A row's phases and profile run in their own try: a failure is recorded beside the timed
    figures, and past the time limit they are left out."""
    import argparse
    import time

    import bench.cli as cli

    class Wl:
        def time_phases(self, b, i):
            return {"encode": 0.001, "denoise": 0.2 + i, "decode": 0.01}

    args = argparse.Namespace(repeats=3, sd_profile=True)
    monkeypatch.setattr(cli, "sd_batch_profile", lambda wl, b: (_ for _ in ()).throw(RuntimeError("no CUPTI")))
    row: dict = {"per_image_s": 0.3}
    cli._sd_extras(row, Wl(), 1, args, "optimized", time.time() + 60)
    assert row["phases_s"] == {"encode": 0.001, "denoise": 1.2, "decode": 0.01}   # medians of 3
    assert row["profile_error"] == "RuntimeError: no CUPTI" and row["per_image_s"] == 0.3
    row = {}
    cli._sd_extras(row, object(), 1, args, "stock", time.time() + 60)
    assert row["phases_error"].startswith("AttributeError") and "profile" not in row and "profile_error" not in row
    row = {}
    cli._sd_extras(row, Wl(), 1, args, "optimized", time.time() - 1)
    assert row == {"phases_skipped": "time limit"}


def test_sd_profile_buckets_kernels_and_refuses_bad_variants(capsys, monkeypatch):
    """The SD profile's kernel classes by name, its variants' Inductor options (a named variant plus
    ``+key=value`` items), and one usage error naming a bad variant, setting, batch or size rule
    before the model is built (building it here fails the test); a good size rule set before."""
    pytest.importorskip("torch._inductor.config")
    from bench.sd_profile import bucket_of, main, variant_options
    from mi300x_cert.workloads import sd as sd_mod

    def never(*a, **k):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(sd_mod, "SDWorkload", never)

    assert bucket_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert bucket_of("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert bucket_of("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN") == "gemm"
    assert bucket_of("triton_per_fused_add_clone_convolution_div_native_group_norm_silu_34") == "inductor"
    assert bucket_of("Memset (Device)") == "other"
    assert variant_options("freeze") == {"conv_1x1_as_mm": True, "freezing": True, "coordinate_descent_tuning": False}
    assert variant_options("base+split_reductions=false+combo_kernels=true") == {
        "conv_1x1_as_mm": True, "freezing": False, "coordinate_descent_tuning": False,
        "split_reductions": False, "combo_kernels": True}
    for argv, word in ((["--variants", "freeze,fast"], "unknown variant 'fast'"),
                       (["--variants", "freeze+warp_speed=9"], "unknown Inductor setting 'warp_speed'"),
                       (["--variants", "cdt+split_reductions"], "'split_reductions' is not key=value"),
                       (["--variants", "freeze, freeze"], "name each variant once"),
                       (["--variants", "freeze", "--batches", "2,x"], "--batches: expected positive"),
                       (["--variants", "freeze", "--batches", "0"], "--batches: expected positive"),
                       (["--kernel-min-elements", "-1"], "--kernel-min-elements: expected a whole number of elements ≥ 0, got '-1'"),
                       (["--kernel-min-elements", "2e6"], "got '2e6'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and word in capsys.readouterr().err
    # a good size rule is set for the run before the model is built
    from mi300x_cert.workloads.optimized import unet_fast

    monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", unet_fast.KERNEL_MIN_ELEMENTS)
    with pytest.raises(AssertionError, match="the model was built"):
        main(["--variants", "freeze", "--kernel-min-elements", "4194304"])
    assert unet_fast.KERNEL_MIN_ELEMENTS == 4194304


def test_bench_frees_a_variants_cycles_before_emptying_the_cache_and_resetting_the_peak():
    """Between variants the bench collects what sits in reference cycles (compiled modules and
    captured graphs hold their memory pools there) before it empties the allocator's cache and
    starts the peak counter again; otherwise the next variant's peak includes the last one's pool.
    A fake ``torch.cuda`` records the order; the pool is an object in a cycle whose finalizer
    says when it is freed (automatic collection off, so only the helper can free it)."""
    import gc
    import types

    from bench import cli as bench

    log: list[str] = []
    held = {"gib": 6.0}

    class Pool:
        def __del__(self) -> None:
            log.append("pool freed")

    def empty_cache() -> None:
        log.append("empty_cache")
        # the allocator hands back only what nothing holds
        held["gib"] = 0.5 if "pool freed" in log else 6.0

    cuda = types.SimpleNamespace(
        synchronize=lambda: log.append("synchronize"), empty_cache=empty_cache,
        reset_peak_memory_stats=lambda: log.append("reset_peak_memory_stats"),
        memory_allocated=lambda: held["gib"] * 2**30)
    gc.disable()
    try:
        holder: dict[str, Any] = {"pool": Pool()}
        holder["self"] = holder  # a cycle: only the collector frees it
        del holder
        assert log == []
        assert bench.release_gpu_memory(types.SimpleNamespace(cuda=cuda)) == 0.5
    finally:
        gc.enable()
    assert log == ["pool freed", "synchronize", "empty_cache", "reset_peak_memory_stats"]


_GROUP_NORM_CHECK = r"""
import torch
import torch.nn.functional as F
from mi300x_cert.workloads.optimized import unet_fast as uf
from tests.unit.test_optimized import _refuses

torch.manual_seed(0)
# tails in the pixels (63, 35) and the channels (96 in blocks of 64), the time embedding's add,
# several groups and launch settings, activations with a large common offset (the variance's
# cancellation), ranges of pixels shorter and longer than a tile; the statistics summed per lane
# and per tile, in tiles of the normalizing pass's size and others
for (N, C, H, W, G, silu, has_t, br, sr, tile_sum, bc, off) in (
        (2, 64, 9, 7, 8, True, True, 16, 16, False, 32, 5.0),
        (2, 64, 9, 7, 8, True, True, 16, 8, True, 32, 5.0),
        (3, 96, 5, 7, 32, False, False, 8, 8, False, 64, 0.0),
        (3, 96, 5, 7, 32, False, False, 8, 32, True, 64, 0.0),
        (1, 40, 16, 16, 4, True, False, 16, 16, False, 16, 300.0),
        (1, 40, 16, 16, 4, True, False, 16, 4, True, 16, 300.0),
        (2, 48, 12, 12, 6, True, True, 4, 4, False, 16, -40.0),
        (2, 48, 12, 12, 6, True, True, 4, 16, True, 16, -40.0)):
    x = (torch.randn(N, C, H, W) * 3 + off).half().to(memory_format=torch.channels_last)
    t = torch.randn(N, C).half() if has_t else None
    w, b = (torch.rand(C) + 0.5).half(), torch.randn(C).half()
    h = x if t is None else x + t[:, :, None, None]          # the library's add, in float16
    ref = F.group_norm(h.double(), G, w.double(), b.double(), 1e-5)
    if silu:
        ref = F.silu(ref.half().double())
    lib = uf.group_norm_act_reference(x.float(), None if t is None else t.float(), w.float(), b.float(), G, 1e-5, silu)
    if t is not None:  # the float32 library ops on the float16 sum, as the float16 library computes it
        lib = uf.group_norm_act_reference(h.float(), None, w.float(), b.float(), G, 1e-5, silu)
    err_lib = float((lib.half().double() - ref).abs().max())
    unit = float(ref.abs().max()) * 2.0 ** -10
    # the three kernels (asked for: these small shapes would take the one kernel by default), the
    # two (statistics per whole group, merged by the normalizing pass; a normalizing block's
    # channels across groups), then the one-kernel form (a program per sample and group) in tiles of
    # 64 or 256 elements: several tiles of pixels, a tail, channels per group not a power of two
    three = dict(block_rows=br, block_c=bc, stat_rows=sr, stat_tile_sum=tile_sum, single=False, merge=False)
    for form in (three, dict(three, merge=True), dict(single=True, single_tile=256 if tile_sum else 64)):
        got = uf.group_norm_act_triton(x, t, w, b, G, 1e-5, silu, **form)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float16
        err = float((got.double() - ref).abs().max())
        assert err <= err_lib + unit, ((N, C, H, W, G), form, err, err_lib, unit)

# t read in place: a row expanded over the batch (a sample stride of 0, as the time table hands it)
# and columns of a wider table give the bits of the same values made contiguous, in both forms
x = (torch.randn(3, 32, 6, 5) * 2 + 1).half().to(memory_format=torch.channels_last)
w, b = (torch.rand(32) + 0.5).half(), torch.randn(32).half()
table = torch.randn(4, 100).half()
for t in (table[1:2, 10:42].expand(3, -1), table[:3, 50:82]):
    assert t.stride() in ((0, 1), (100, 1))
    for form in (dict(single=False, merge=False, block_rows=16, block_c=16, stat_rows=16),
                 dict(single=False, merge=True, block_rows=16, block_c=16, stat_rows=16),
                 dict(single=True, single_tile=64)):
        got = uf.group_norm_act_triton(x, t, w, b, 4, 1e-5, True, **form)
        assert torch.equal(got, uf.group_norm_act_triton(x, t.contiguous(), w, b, 4, 1e-5, True, **form)), form

# more ranges of pixels than the merge takes at once (64), the last one short: the merge across
# its iterations, the merge kernel's and (two kernels) the normalizing pass's (the programs' target
# raised, so each range is one tile of 16 pixels)
uf._programs_target = lambda device, per_sm=2: 1 << 20
ramp = torch.linspace(0, 30, 33)[None, None, :, None]   # the later ranges' means differ from the first ones'
x = (torch.randn(2, 24, 33, 35) * 2 + 7 + ramp).half().to(memory_format=torch.channels_last)
t, w, b = torch.randn(2, 24).half(), (torch.rand(24) + 0.5).half(), torch.randn(24).half()
assert -(-33 * 35 // 16) > 64
h = x + t[:, :, None, None]
ref = F.silu(F.group_norm(h.double(), 4, w.double(), b.double(), 1e-5).half().double())
lib = uf.group_norm_act_reference(h.float(), None, w.float(), b.float(), 4, 1e-5, True).half().double()
unit = float(ref.abs().max()) * 2.0 ** -10
for form in (dict(stat_tile_sum=False, single=False, merge=False), dict(stat_tile_sum=True, single=False, merge=False),
             dict(stat_tile_sum=False, single=False, merge=True), dict(stat_tile_sum=True, single=False, merge=True),
             dict(single=True, single_tile=32)):
    got = uf.group_norm_act_triton(x, t, w, b, 4, 1e-5, True, block_rows=16, block_c=16, stat_rows=16, **form)
    assert float((got.double() - ref).abs().max()) <= float((lib - ref).abs().max()) + unit, form
# float32 activations far from zero: the sums are shifted by each range's first pixel (without the
# shift the variance would cancel to nothing here)
x = (torch.randn(2, 16, 20, 20, dtype=torch.float64) * 0.5 + 1e4).float().to(memory_format=torch.channels_last)
w, b = torch.rand(16) + 0.5, torch.randn(16)
ref = F.group_norm(x.double(), 4, w.double(), b.double(), 1e-6)
for form in (dict(stat_tile_sum=False, single=False, merge=False), dict(stat_tile_sum=True, single=False, merge=False),
             dict(single=False, merge=True), dict(single=True, single_tile=64)):
    got = uf.group_norm_act_triton(x, None, w, b, 4, 1e-6, False, block_rows=16, block_c=16, stat_rows=16, **form)
    assert float((got.double() - ref).abs().max()) < 1e-2, (form, float((got.double() - ref).abs().max()))
# the default form by size: the one kernel at most SINGLE_MAX_PIXELS pixels and SINGLE_MAX_ELEMENTS
# elements, else two at most MERGE_MAX_ELEMENTS elements, else the three
seen = []
uf_kernels = uf._kernels


def _counting():
    ks = uf_kernels()
    return tuple(type("K", (), {"__getitem__": lambda self, grid, k=k, i=i: (seen.append(i), k[grid])[1]})()
                 for i, k in enumerate(ks))


uf._kernels = _counting
xs = torch.randn(2, 16, 4, 4).half().to(memory_format=torch.channels_last)
ws = torch.ones(16).half()
n = xs.numel()
for pixels, limit, tile, merge_limit, want in (
        (16, n, 64, n, [3]), (16, n - 1, 64, 0, [0, 1, 2]), (16, n - 1, 64, n, [0, 2]), (16, n - 1, 64, n - 1, [0, 1, 2]),
        (15, n, 64, 0, [0, 1, 2]), (16, n, 2, 0, [0, 1, 2]), (16, n, 2, n, [0, 2])):
    # (a group of 4 channels wider than a tile of 2 elements keeps the two or three kernels)
    uf.SINGLE_MAX_PIXELS, uf.SINGLE_MAX_ELEMENTS, uf.MERGE_MAX_ELEMENTS = pixels, limit, merge_limit
    seen.clear()
    a = uf.group_norm_act_triton(xs, None, ws, ws, 4, 1e-5, True, block_rows=16, block_c=16, stat_rows=16,
                                 single_tile=tile)
    assert seen == want, (pixels, limit, tile, merge_limit, seen)
    assert torch.equal(a, uf.group_norm_act_triton(xs, None, ws, ws, 4, 1e-5, True, block_rows=16, block_c=16,
                                                   stat_rows=16, single=want == [3], merge=want == [0, 2]))
uf._kernels = uf_kernels
uf.SINGLE_MAX_PIXELS, uf.SINGLE_MAX_ELEMENTS, uf.MERGE_MAX_ELEMENTS = 256, 1 << 21, 1 << 23

# one clear error per bad operand
x = torch.randn(2, 8, 3, 3).half().to(memory_format=torch.channels_last)
w = torch.ones(8).half()
for kw, word in ((dict(x=x.contiguous()), "channels-last"), (dict(groups=3), "do not split into 3 groups"),
                 (dict(w=torch.ones(7).half()), "w and b must be [8]"),
                 (dict(t=torch.ones(2, 7).half()), "t must be [2, 8]"),
                 (dict(block_rows=24), "block_rows must be a power of two, got 24"),
                 (dict(stat_rows=48), "stat_rows must be a power of two, got 48"),
                 (dict(stat_warps=3), "stat_warps must be a power of two, got 3"),
                 (dict(stat_programs=0), "stat_programs must be at least 1, got 0"),
                 (dict(single_tile=48), "single_tile must be a power of two, got 48"),
                 (dict(single_warps=6), "single_warps must be a power of two, got 6")):
    a = dict(x=x, t=None, w=w, b=w, groups=4, eps=1e-5, silu=True)
    a.update(kw)
    launch = {k: a.pop(k) for k in ("block_rows", "stat_rows", "stat_warps", "stat_programs", "single_tile",
                                     "single_warps") if k in a}
    _refuses([(uf.group_norm_act_triton, (a["x"], a["t"], a["w"], a["b"], a["groups"], a["eps"], a["silu"]),
               {"block_rows": 16, **launch}, word)])
print("GROUP-NORM-OK")
"""


def test_unet_group_norm_kernels_are_the_librarys_norm(tmp_path):
    """The UNet's GroupNorm (+ time embedding, + SiLU) kernels, run by triton's CPU interpreter:
    no further from float64 than the library's own float16 result plus one float16 unit (tails of
    pixels and channels, offsets that would cancel in a naive variance); one clear error per bad
    operand."""
    pytest.importorskip("triton")
    r = _run_interpreted(tmp_path / "group_norm_check.py", _GROUP_NORM_CHECK)
    assert r.returncode == 0 and "GROUP-NORM-OK" in r.stdout, r.stderr[-3000:]


def test_unet_group_norm_statistics_ranges_fit_the_pixels():
    """The statistics pass's range of pixels per program: doubled while enough programs remain, at
    most 1,024 pixels, and never longer than the activation's pixels (a range past them would loop
    over nothing: an 8×8 activation takes one tile, not sixteen)."""
    from mi300x_cert.workloads.optimized.unet_fast import _rows_per_program

    assert _rows_per_program(64 * 5, 64 * 64, 264, 64) == 1024      # SD's largest norm: 4 ranges
    assert _rows_per_program(64 * 5, 64 * 64, 1 << 20, 64) == 64     # a high target keeps tiles
    assert _rows_per_program(64 * 40, 8 * 8, 264, 64) == 64          # 8² pixels: one tile of 64
    assert _rows_per_program(64 * 20, 16 * 16, 264, 64) == 256       # 16²: the whole image
    assert _rows_per_program(64 * 20, 16 * 16, 264, 128) == 256
    assert _rows_per_program(1, 300, 1, 16) == 512                   # a tail: the next power of two
    assert _rows_per_program(1, 300, 4, 16) == 64                    # 5 ranges: ≥ 4 programs


def test_unet_group_norm_operator_schema_and_fake_tensors():
    """The GroupNorm operator passes torch's operator checks (schema, fake tensors with the input's
    channels-last layout, with and without the time embedding)."""
    from mi300x_cert.workloads.optimized.unet_fast import _op

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g).to(memory_format=torch.channels_last)
    t, w, b = torch.randn(2, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    torch.library.opcheck(_op(), (x, t, w, b, 4, 1e-5, True))
    torch.library.opcheck(_op(), (x.contiguous(), None, w, b, 2, 1e-6, False))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = _op()(mode.from_tensor(x), None, mode.from_tensor(w), mode.from_tensor(b), 4, 1e-5, True)
    assert tuple(out.shape) == (2, 8, 5, 3) and out.is_contiguous(memory_format=torch.channels_last)


def _tiny_unet_and_vae():
    """The tiny SD UNet (channels-last) and VAE, every GroupNorm with its own random weight and bias
    (a synthetic model's are ones and zeros, which cannot tell one norm from another)."""
    from mi300x_cert.workloads.sd import SDWorkload

    wl = SDWorkload(dict(SD, path="stock"))
    if getattr(wl, "_hook", None) is not None:
        wl._hook.remove()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in (*wl.unet.modules(), *wl.vae.modules()):
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return wl.unet.to(memory_format=torch.channels_last), wl.vae


def test_fast_unet_time_table_is_the_time_embedding():
    """``unet_fast.time_table``: for the plan's timesteps, every resnet's time term once; the UNet
    handed a row (expanded to its batch) computes what it computes from the timestep, none of the
    time products runs, and a timestep still works; a UNet not in the ``fast`` form, or one whose
    rows would be as wide as a time embedding (a row told from one by its width), is left as it is
    (``None``, and the reason); rows for another batch are one clear error."""
    from diffusers import UNet2DConditionModel

    from mi300x_cert.workloads.optimized import unet_fast

    unet, _ = _tiny_unet_and_vae()
    assert unet_fast.time_table(unet, torch.tensor([999, 500, 1])) is None   # library form
    assert "get_time_embed" not in vars(unet) and not hasattr(unet.time_embedding, "_time_rows_width")
    assert unet_fast.time_table_refusal(unet) == (
        "down_blocks.0.resnets.0 takes the time embedding and is not a resnet of the fast form")
    width = sum(m.time_emb_proj.out_features * 2 for m in unet.modules() if hasattr(m, "time_emb_proj"))
    wide = UNet2DConditionModel(**{**unet.config, "time_embedding_dim": width}).eval()
    unet_fast.prepare_unet(wide, "fast")
    assert unet_fast.time_table_refusal(wide) == f"the table's width ({width}) is a time embedding's"
    assert unet_fast.time_table(wide, torch.tensor([1])) is None and "get_time_embed" not in vars(wide)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # the time products' own random weights, so a wrong column shows
        for m in unet.modules():
            if hasattr(m, "time_emb_proj") and m.time_emb_proj is not None:
                m.time_emb_proj.weight.copy_(torch.randn(m.time_emb_proj.weight.shape, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
    e = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        refs = [unet(x, torch.tensor(t), encoder_hidden_states=e, return_dict=False)[0] for t in (999, 500, 1)]
    unet_fast.prepare_unet(unet, "fast")
    rows = unet_fast.time_table(unet, torch.tensor([999, 500, 1]))
    takers = [m for m in unet.modules() if hasattr(m, "time_emb_proj")]
    assert rows.shape == (3, sum(m.time_emb_proj.out_features * (1 + (m.conv1.bias is not None)) for m in takers))
    calls = []
    hooks = [m.time_emb_proj.register_forward_hook(lambda *a: calls.append(1)) for m in takers]
    hooks.append(unet.time_embedding.linear_1.register_forward_hook(lambda *a: calls.append(1)))
    with torch.inference_mode():
        for i, ref in enumerate(refs):
            out = unet(x, rows[i:i + 1].expand(2, -1), encoder_hidden_states=e, return_dict=False)[0]
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6, i
        assert not calls   # no time product ran
        again = unet(x, torch.tensor(500), encoder_hidden_states=e, return_dict=False)[0]
    assert calls and float((again - refs[1]).abs().max() / refs[1].abs().max()) < 1e-6
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="time-table rows for 1 samples, the UNet has 2"), torch.inference_mode():
        unet(x, rows[:1], encoder_hidden_states=e, return_dict=False)
    # compiled: every first convolution's bias comes from the table's folded columns (no bias, no
    # time product, no add of a bias in the graph), the same output
    with torch.inference_mode():
        got, nodes = _compiled_calls(lambda a, r: unet(a, r, encoder_hidden_states=e, return_dict=False)[0],
                                     x, rows[1:2].expand(2, -1))
    torch._dynamo.reset()
    assert float((got - refs[1]).abs().max() / refs[1].abs().max()) < 1e-5
    named = [" ".join(str(a) for a in n.args) for n in nodes]
    assert not [a for a in named if "time_emb" in a], named
    convs = [n for n, a in zip(nodes, named) if "conv1" in a and "conv" in str(n.target)]
    assert len(convs) == len(takers) and all(n.args[2] is None for n in convs)
    # each second norm's time term: columns of the rows as given, no arithmetic on them
    terms = [n.args[1] for n in nodes if "group_norm_act" in str(n.target) and n.args[1] is not None]
    assert len(terms) == len(takers), terms
    assert all(a.target is operator.getitem and a.args[0].op == "placeholder" for a in terms), terms


def test_fast_unet_kv_table_is_the_cross_attention():
    """``unet_fast.kv_table``: every cross-attention's keys and values of the encoder states, made
    once (``kv_rows``); the UNet handed the table computes what it computes from the states, its
    K/V projections take their columns (no product), and states still work; a UNet without the
    fused projections, or whose table would be as wide as an encoder state, is left as it is
    (``None``, and the reason). Compiled, the graph has one product fewer per cross-attention."""
    from diffusers import UNet2DConditionModel

    from mi300x_cert.workloads.optimized import unet_fast

    unet, _ = _tiny_unet_and_vae()
    first = next(n for n, m in unet.named_modules() if type(m).__name__ == "Attention" and m.is_cross_attention)
    assert unet_fast.kv_table_refusal(unet) == f"{first} runs AttnProcessor2_0, not the fused projections' processor"
    assert unet_fast.kv_table(unet) is None
    assert not [m for m in unet.modules() if "forward" in vars(m)]
    assert unet_fast.kv_table_refusal(torch.nn.Linear(2, 2)) == "not a UNet2DConditionModel (Linear)"
    unet.fuse_qkv_projections()
    takers = [m for m in unet.modules() if type(m).__name__ == "Attention" and m.is_cross_attention]
    width = sum(m.to_kv.out_features for m in takers)
    wide = UNet2DConditionModel(**{**unet.config, "cross_attention_dim": width}).eval()
    wide.fuse_qkv_projections()
    assert unet_fast.kv_table_refusal(wide) == f"the table's width ({width}) is an encoder state's"
    assert unet_fast.kv_table(wide) is None and not [m for m in wide.modules() if "forward" in vars(m)]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # the projections' own random weights, so a wrong column shows
        for m in takers:
            m.to_kv.weight.copy_(torch.randn(m.to_kv.weight.shape, generator=g) * 0.2)
    x = torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
    e = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
        layers = unet_fast.kv_table(unet)
        assert layers == [m.to_kv for m in takers]
        table = unet_fast.kv_rows(layers, e)
        assert table.shape == (2, 77, width)
        assert torch.equal(table[..., :layers[0].out_features], layers[0](e))   # its own product
        seen = []
        hooks = [lin.register_forward_hook(lambda mod, a, out: seen.append(int(a[0].shape[-1]))) for lin in layers]
        out = unet(x, t, encoder_hidden_states=table, return_dict=False)[0]
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6
        assert seen == [width] * len(layers)   # every projection handed the table, none computed
        seen.clear()
        again = unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
        assert seen == [unet.config.cross_attention_dim] * len(layers) and torch.equal(again, ref)
    for h in hooks:
        h.remove()
    # compiled: one linear fewer per cross-attention than with the states, the same output
    def products(states):
        with torch.inference_mode():
            got, nodes = _compiled_calls(lambda a, s: unet(a, t, encoder_hidden_states=s, return_dict=False)[0],
                                         x, states)
        torch._dynamo.reset()
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
        return sum("linear" in str(n.target) for n in nodes)

    assert products(e) - products(table) == len(layers)


@pytest.mark.parametrize("change,why", [
    (dict(encoder_hid_dim=16), "the UNet projects its encoder states"),
    (dict(addition_embed_type="text", addition_embed_type_num_heads=4),
     "the UNet's added embedding reads its encoder states"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
     "a block of mid_block is a UNetMidBlock2DSimpleCrossAttn, not one of SD's"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
     "a block of down_blocks is a SimpleCrossAttnDownBlock2D, not one of SD's"),
    ("wrapped", "'s K/V projection is a WrappedLinear, not a Linear"),
    ("no to_kv", " has no fused K/V projection"),
])
def test_fast_unet_kv_table_refuses_what_else_reads_the_encoder_states(change, why):
    """Where a module other than the cross-attentions' fused K/V projections reads the encoder
    states (an encoder projection, an added text embedding, blocks other than SD's), or a K/V
    projection is not a plain product (a wrapper whose scale may change per call) or not fused, the
    table is refused with the reason and no module is changed."""
    from diffusers import UNet2DConditionModel

    from mi300x_cert.workloads.optimized import unet_fast

    unet, _ = _tiny_unet_and_vae()
    if isinstance(change, dict):
        unet = UNet2DConditionModel(**{**unet.config, **change}).eval()
    else:
        unet.fuse_qkv_projections()
        name, attn = next((n, m) for n, m in unet.named_modules()
                          if type(m).__name__ == "Attention" and m.is_cross_attention)
        if change == "wrapped":
            class WrappedLinear(torch.nn.Linear):
                pass

            wrapped = WrappedLinear(attn.to_kv.in_features, attn.to_kv.out_features, bias=False)
            wrapped.load_state_dict(attn.to_kv.state_dict())
            attn.to_kv = wrapped
        else:
            del attn.to_kv
        why = name + why
    assert unet_fast.kv_table_refusal(unet) == why
    assert unet_fast.kv_table(unet) is None
    assert not [m for m in unet.modules() if "forward" in vars(m)]


def test_unet_forms_are_the_library_unet_eager_and_compiled(monkeypatch):
    """``prepare_unet``: each form computes the library UNet's and VAE's function — eagerly bit for
    bit at a batch of 64 (where diffusers' upsampler copies to channels-first), compiled in one graph
    with every norm through the operator (the size rule lowered to 0); which modules it changed;
    one clear error for an unknown form or a module in training mode."""
    from mi300x_cert.workloads.optimized import unet_fast

    unet, vae = _tiny_unet_and_vae()
    B = 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 4, 8, 8, generator=g).to(memory_format=torch.channels_last)
    e = torch.randn(B, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500.0)
    n_resnets = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
    n_ups = sum(1 for m in unet.modules() if type(m).__name__ == "Upsample2D")
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
        img = vae.decode(x[:2], return_dict=False)[0]
        for form, want in (("library", {"upsample": 0, "resnet": 0, "norm": 0}),
                           ("nhwc-up", {"upsample": n_ups, "resnet": 0, "norm": 0}),
                           ("fast", {"upsample": n_ups, "resnet": n_resnets,
                                     "norm": 1 + sum(1 for m in unet.modules() if type(m).__name__ == "Transformer2DModel")})):
            u = copy.deepcopy(unet)
            assert unet_fast.prepare_unet(u, form) == want, form
            assert torch.equal(u(x, t, encoder_hidden_states=e, return_dict=False)[0], ref), form
        v = copy.deepcopy(vae)
        vae_resnets = [m for m in v.modules() if type(m).__name__ == "ResnetBlock2D"]
        # the decoder's up blocks use diffusers' "group" time norm (no time projection): taken too
        assert any(m.time_embedding_norm == "group" for m in vae_resnets)
        assert unet_fast.prepare_unet(v, "fast")["resnet"] == len(vae_resnets)
        assert torch.equal(v.decode(x[:2], return_dict=False)[0], img)
        # a default-norm resnet without a time projection but given a temb keeps diffusers' forward
        # (which adds that temb as it is)
        r = next(m for m in v.modules() if type(m).__name__ == "ResnetBlock2D" and m.time_embedding_norm == "default")
        h = torch.randn(2, r.in_channels, 4, 4, generator=g)
        te = torch.randn(2, r.out_channels, 1, 1, generator=g)
        assert torch.equal(r(h, te), type(r).forward(r, h, te))
        monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", 0)
        u = copy.deepcopy(unet)
        unet_fast.prepare_unet(u, "fast")
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        got = torch.compile(u, fullgraph=True, dynamic=False)(x, t, encoder_hidden_states=e, return_dict=False)[0]
        assert not counters["graph_break"]
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
        # the VAE decoder compiled the same way, its up blocks' "group" resnets through the operator
        # (this tiny VAE has one channel per group, where a convolution's bias cancels in the norm:
        # the resnet test below checks the bias handed to a norm without a time embedding)
        v = copy.deepcopy(vae)
        unet_fast.prepare_unet(v, "fast")
        torch._dynamo.reset()
        got = torch.compile(lambda z: v.decode(z, return_dict=False)[0], fullgraph=True, dynamic=False)(x[:2])
        assert not counters["graph_break"]
        assert float((got - img).abs().max()) <= 1e-4 * float(img.abs().max())
    with pytest.raises(ValueError, match="UNet form must be one of .*got 'fastest'"):
        unet_fast.prepare_unet(copy.deepcopy(unet), "fastest")
    with pytest.raises(ValueError, match="eval mode"):
        unet_fast.prepare_unet(copy.deepcopy(unet).train(), "fast")


@pytest.mark.parametrize("conv", ["plain", "1x1", "subclass", "same-padding", "no-bias", "group-norm"])
def test_fast_resnet_compiled_with_any_first_convolution(monkeypatch, conv):
    """A ``fast`` resnet compiled (the size rule at 0, so its norms take the operator; 4 channels
    per group, so a per-channel bias changes the norm) computes diffusers' resnet whatever its first
    convolution: a 3×3 or 1×1 one hands its bias to the norm (with the time embedding, or alone in a
    resnet with the ``group`` time norm, as the VAE decoder's up blocks have), a subclass, a padding
    given as a string or a convolution without a bias keeps the convolution as it is; the output
    size the rule sees is the convolution's own."""
    from diffusers.models.resnet import ResnetBlock2D

    from mi300x_cert.workloads.optimized import unet_fast

    monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", 0)
    torch.manual_seed(3)
    if conv == "group-norm":
        block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=None, groups=4,
                              time_embedding_norm="group").eval()
    else:
        block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4).eval()

    class MyConv(torch.nn.Conv2d):
        pass

    make = {"plain": lambda: torch.nn.Conv2d(8, 16, 3, padding=1),
            "1x1": lambda: torch.nn.Conv2d(8, 16, 1),
            "subclass": lambda: MyConv(8, 16, 3, padding=1),
            "same-padding": lambda: torch.nn.Conv2d(8, 16, 3, padding="same"),
            "no-bias": lambda: torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
            "group-norm": lambda: torch.nn.Conv2d(8, 16, 3, padding=1)}[conv]
    block.conv1 = make()
    with torch.no_grad():
        if block.conv1.bias is not None:
            block.conv1.bias.normal_()
        for n in (block.norm1, block.norm2):
            n.weight.uniform_(0.5, 1.5)
            n.bias.normal_()
    x = torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last)
    temb = None if conv == "group-norm" else torch.randn(2, 12)
    assert unet_fast._conv_out_numel(block.conv1, x) == (None if conv == "same-padding" else 2 * 16 * 6 * 5)
    with torch.inference_mode():
        ref = block(x, temb)
        fast = copy.deepcopy(block)
        assert unet_fast.prepare_unet(fast, "fast")["resnet"] == 1
        torch._dynamo.reset()
        got = torch.compile(fast, fullgraph=True, dynamic=False)(x, temb)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), conv


def _compiled_calls(module, *args):
    """``module(*args)`` compiled in one graph (dynamo reset first) and the function calls of the
    graph dynamo hands over (a recording backend: the ops as traced, before Inductor)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=record, fullgraph=True, dynamic=False)(*args)
    return out, [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rule", ["every size", "above this resnet", "at its second norm", "the module's own"])
def test_fast_resnet_size_rule_decides_the_operator(monkeypatch, rule):
    """The size rule (``KERNEL_MIN_ELEMENTS``, 0 by default: every size since run 81; or the one
    ``prepare_unet`` was given, as for a model the host calls each step) sends a resnet's norms to
    the operator, and its first convolution's bias to the norm, only at or above it, the bias fold
    decided on the convolution's own output: above this resnet's activations the compiled graph has
    no operator and the convolution keeps its bias; at exactly its second norm's size (the first
    norm's input is half that) only the second takes it, with the bias; either way the output is
    diffusers' resnet."""
    from diffusers.models.resnet import ResnetBlock2D

    from mi300x_cert.workloads.optimized import unet_fast

    assert unet_fast.KERNEL_MIN_ELEMENTS == 0
    x = torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last)
    own = None
    if rule == "above this resnet":
        monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", 2 * 16 * 6 * 5 + 1)
    elif rule == "at its second norm":
        monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", 2 * 16 * 6 * 5)
    elif rule == "the module's own":
        own = 2 * 16 * 6 * 5 + 1
    torch.manual_seed(4)
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4).eval()
    with torch.no_grad():
        block.conv1.bias.normal_()
        for n in (block.norm1, block.norm2):
            n.weight.uniform_(0.5, 1.5)
            n.bias.normal_()
    temb = torch.randn(2, 12)
    with torch.inference_mode():
        ref = block(x, temb)
        fast = copy.deepcopy(block)
        unet_fast.prepare_unet(fast, "fast", min_elements=own)
        got, nodes = _compiled_calls(fast, x, temb)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    ops = [n for n in nodes if "group_norm_act" in str(n.target)]
    conv1 = [n for n in nodes if "conv" in str(n.target) and "conv1" in str(n.args[1])]
    assert len(conv1) == 1, [(str(n.target), [str(a) for a in n.args]) for n in nodes if "conv" in str(n.target)]
    if rule in ("every size", "at its second norm"):
        assert len(ops) == (2 if rule == "every size" else 1)
        assert conv1[0].args[2] is None   # its bias went to the second norm
    else:
        assert not ops
        assert "conv1" in str(conv1[0].args[2])
    if rule == "every size":
        with pytest.raises(ValueError, match="min_elements must be a whole number ≥ 0 or None, got -1"):
            unet_fast.prepare_unet(copy.deepcopy(block), "fast", min_elements=-1)


def test_fast_norm_module_takes_its_own_rule_and_a_new_one():
    """A transformer's input norm in the ``fast`` form (``GroupNormAct``) follows the size rule it
    was prepared with: above its input's size the compiled graph has no operator, and preparing the
    model again with another rule (here the module default, every size) sends it to the operator;
    the output is the library's norm either way."""
    from mi300x_cert.workloads.optimized import unet_fast

    class Transformer2DModel(torch.nn.Module):   # the name prepare_unet looks for
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.GroupNorm(4, 16, eps=1e-6)

        def forward(self, x):
            return self.norm(x)

    torch.manual_seed(6)
    model = Transformer2DModel().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    x = torch.randn(2, 16, 5, 3).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(x)

    def ops_after_prepare(**kw):
        counts = unet_fast.prepare_unet(model, "fast", **kw)
        with torch.inference_mode():
            got, nodes = _compiled_calls(model, x)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        return counts["norm"], sum(1 for n in nodes if "group_norm_act" in str(n.target))

    assert ops_after_prepare(min_elements=x.numel() + 1) == (1, 0)
    assert type(model.norm).__name__ == "GroupNormAct" and model.norm.min_elements == x.numel() + 1
    assert ops_after_prepare() == (0, 1)   # prepared again: the rule given now, nothing new wrapped
    assert model.norm.min_elements is None


def test_sd_optimized_unet_form_recorded_checked_and_the_same_latents(monkeypatch):
    """The optimized SD path with the ``fast`` UNet form forced (CPU: the modules rewired, run
    eagerly as the optimized path runs off the GPU) gives the stock latents and records the form,
    the modules it changed and its size rule (from 2²³ elements where the host calls the UNet each
    step, every size where the loop is replayed as a device graph); ``auto`` is the library form off
    the GPU; an unknown ``optimized_unet`` is one clear error before the workload is touched."""
    from mi300x_cert.workloads.optimized import sd_fast, unet_fast
    from mi300x_cert.workloads.optimized.sd_fast import attach_to_workload
    from mi300x_cert.workloads.optimized.unet_fast import kv_rows
    from mi300x_cert.workloads.sd import SDWorkload

    a = SDWorkload(dict(SD, path="stock"))
    b = SDWorkload(dict(SD, path="optimized", optimized_unet="fast"))
    ids = a.tokenize(a.select_prompts(2, 1))
    cond, uncond = a.encode_prompts(ids)
    lat0 = a.initial_latents(2, 1)
    la, lb = a.denoise(cond, uncond, lat0), b.denoise(cond, uncond, lat0)
    assert float((la - lb).norm() / la.norm()) < 1e-5
    opt = b.conditions()["optimized"]
    assert opt["unet_form"] == "fast" and opt["unet_form_modules"]["unet"]["resnet"] > 0, opt
    assert not opt["whole_loop_graph"] and opt["unet_form_min_elements"] == unet_fast.EAGER_KERNEL_MIN_ELEMENTS
    # the time table: made for the plan, its rows the only time input of the loop
    assert opt["time_table"] is True and b.fast._time_rows.shape[0] == b.fast.unet_evals
    # the K/V table: made once per batch, the loop's K/V projections handed only its rows
    assert opt["kv_table"] is True
    width = b.fast._kv_layers[0]._kv_cols[2]
    seen = []
    for lin in b.fast._kv_layers:
        lin.register_forward_hook(lambda mod, a, out: seen.append(int(a[0].shape[-1])))
    calls = []
    for m in b.unet.modules():
        if getattr(m, "time_emb_proj", None) is not None:
            m.time_emb_proj.register_forward_hook(lambda *a: calls.append(1))
    made = []
    monkeypatch.setattr(unet_fast, "kv_rows", lambda layers, states: made.append(1) or kv_rows(layers, states))
    assert float((b.denoise(cond, uncond, lat0) - la).norm() / la.norm()) < 1e-5 and not calls
    assert seen == [width] * (len(b.fast._kv_layers) * b.fast.unet_evals) and made == [1]   # once per batch
    monkeypatch.undo()
    b.fast._table_ts = b.fast._table_ts.flip(0)   # a scheduler's plan other than the table's
    with pytest.raises(RuntimeError, match="not the plan the time table was made for"):
        b.denoise(cond, uncond, lat0)
    rules = {m._gn_min_elements for m in b.unet.modules() if hasattr(m, "_gn_min_elements")}
    rules |= {m.min_elements for m in b.unet.modules() if type(m).__name__ == "GroupNormAct"}
    assert rules == {unet_fast.EAGER_KERNEL_MIN_ELEMENTS}, rules
    monkeypatch.setattr(sd_fast, "graphs_supported", lambda device: True)   # as on a GPU: the loop replayed
    d = SDWorkload(dict(SD, path="optimized", optimized_unet="fast"))
    opt = d.conditions()["optimized"]
    assert opt["whole_loop_graph"] and opt["unet_form_min_elements"] == unet_fast.KERNEL_MIN_ELEMENTS == 0
    assert {m._gn_min_elements for m in d.unet.modules() if hasattr(m, "_gn_min_elements")} == {None}
    monkeypatch.undo()
    c = SDWorkload(dict(SD, path="optimized"))
    assert c.conditions()["optimized"]["unet_form"] == "library"
    assert c.conditions()["optimized"]["time_table"] == "only the fast UNet form takes it"
    assert c.conditions()["optimized"]["kv_table"] is True   # any form
    e = SDWorkload(dict(SD, path="optimized"))
    unfused = sd_fast.FastSD(e.unet, e.vae, e.scheduler, steps=2, guidance=7.5, scaling_factor=0.18215,
                             device="cpu", compile=False, fuse_qkv=False)
    assert unfused.notes["kv_table"] == "the projections are not fused (fuse_qkv off)"

    with pytest.raises(ValueError, match="optimized_unet must be 'auto' or one of 'library', 'nhwc-up', 'fast', got 'quick'"):
        attach_to_workload(_Untouchable(), {"optimized_unet": "quick"})


def test_sd_profile_norm_settings_name_their_form():
    """The norms' settings the profile times: the first is the three kernels at every size (not the
    default's choice by size), the two- and one-kernel forms are named as such, each label once."""
    from bench.sd_profile import NORM_SETTINGS, norm_setting_label

    labels = [norm_setting_label(c) for c in NORM_SETTINGS]
    assert NORM_SETTINGS[0]["single"] is False and NORM_SETTINGS[0]["merge"] is False
    assert labels[0] == "r64 c64 w4 · s64 w4 lanes p2"
    assert [lb for lb in labels if lb.startswith("two kernels")] == ["two kernels · r64 c64 w4 · s64 w4 lanes p2"]
    assert [lb for lb in labels if lb.startswith("one kernel")] == ["one kernel t2048 w4", "one kernel t4096 w8"]
    assert len(set(labels)) == len(labels)
    assert all(c.get("single") is not None for c in NORM_SETTINGS)


def test_bench_rejects_an_unknown_unet_form_as_a_usage_error(capsys):
    """An unknown ``--sd-unet`` (the bench) or ``--unet-forms`` (the SD profile) is a usage error
    naming it, before any GPU work; the profile puts the norm kernels in their own class."""
    from bench import cli as bench
    from bench.sd_profile import bucket_of
    from bench.sd_profile import main as profile_main

    with pytest.raises(SystemExit) as ex:
        bench.main(["--workload", "sd", "--sd-unet", "auto,turbo"])
    assert ex.value.code == 2 and "--sd-unet: unknown turbo; known: auto, library, nhwc-up, fast" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        bench.main(["--workload", "sd", "--sd-unet", "auto,library,auto"])
    assert ex.value.code == 2 and "--sd-unet: name each form once" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        profile_main(["--unet-forms", "library,turbo"])
    assert ex.value.code == 2 and "--unet-forms" in capsys.readouterr().err
    assert bucket_of("_gn_partial") == bucket_of("_gn_apply") == bucket_of("_gn_single") == "norm-kernel"
