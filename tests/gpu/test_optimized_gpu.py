"""The optimized path on a real GPU: device graphs captured, same function as stock (opt-in: -m gpu)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]


@pytest.mark.parametrize("unet_form", ["auto", "fast"])
def test_sd_tiny_optimized_matches_stock_with_graphs(tmp_path, monkeypatch, unet_form):
    """``fast``: the norm kernels called in the captured loop, the time table's rows as its time input;
    either form: the K/V table's rows as its encoder states."""
    monkeypatch.setenv("MI300X_CERT_COMPILE_CACHE", str(tmp_path / "cc"))
    from mi300x_cert.workloads.sd import SDWorkload

    p = dict(model="synthetic:sd-tiny", height=64, width=64, steps=10, guidance=7.5, dtype="float16",
             seed=0, device="cuda", optimized_compile=False, optimized_unet=unet_form)
    a = SDWorkload(dict(p, path="stock"))
    b = SDWorkload(dict(p, path="optimized"))
    assert (b.fast.notes["time_table"] is True) is (unet_form == "fast")
    assert b.fast.notes["kv_table"] is True
    ids = a.tokenize(a.select_prompts(2, 0))
    cond, uncond = a.encode_prompts(ids)
    lat0 = a.initial_latents(2, 0)
    la = a.denoise(cond, uncond, lat0)
    for _ in range(2):  # first call captures, second replays
        lb = b.denoise(cond, uncond, lat0)
    assert b.fast.notes["denoise_graph"] == "captured"
    for _ in range(2):  # the text encoder: captured, then replayed, the eager module's bits
        cb, ub = b.encode_prompts(ids)
    assert b.fast.notes["encode_graph"] == "captured"
    with torch.inference_mode():
        ref = b.text_encoder(ids)[0]
    assert torch.equal(torch.cat([cb, ub]), ref)
    g = torch.Generator().manual_seed(1)   # other token ids through the same graph
    ids2 = torch.randint(1, b.vocab_size, tuple(ids.shape), generator=g).to(ids.device)
    assert not torch.equal(ids2, ids)
    with torch.inference_mode():
        assert torch.equal(torch.cat(b.encode_prompts(ids2)), b.text_encoder(ids2)[0])
    assert torch.equal(torch.cat([cb, ub]), ref)   # the first batch's embeddings are its own, not the graph's buffer
    rel = float((la.float() - lb.float()).norm() / la.float().norm())
    assert rel < 2e-2, rel
    ia, ib = a.decode(la), b.decode(lb)
    assert float((ia.float() - ib.float()).abs().max()) < 5e-2
    row = b.run_batch(2, 0)
    assert row["unet_evals"] == 11 and b.conditions()["path"] == "optimized"


def test_whisper_smoke_graph_decode_same_tokens():
    from mi300x_cert.workloads.whisper import WhisperWorkload

    p = dict(model="synthetic:whisper-smoke", new_tokens=24, dtype="float16", device="cuda", clips=4)
    a = WhisperWorkload(dict(p, path="stock"))
    b = WhisperWorkload(dict(p, path="optimized"))
    ra, rb = a.run_batch(4, 0), b.run_batch(4, 0)
    assert b.fast.use_graphs and "captured" in b.fast.reason
    assert ra["tokens"] == rb["tokens"] == 4 * 24
    assert torch.equal(a.last_ids, b.last_ids)


@pytest.mark.parametrize("only", [None, "persistent", "unit ring", "lazy"])
def test_whisper_hidden_form_on_gpu_is_the_stock_function(only, monkeypatch):
    """Large-v3 architecture in fp16 on the card: each layer's cross-attention through the hidden
    form and the kernel chosen for it against the stock module (fresh random inputs), and greedy
    tokens of the whole optimized path (hidden form, compiled encoder off to keep the test short)
    against stock ``generate``. ``persistent``: the persistent CUDA kernel is the only candidate,
    on 3 blocks for the 8 clips, so clips are cut between blocks inside the captured decode step;
    ``unit ring``: the same with its ring of 16-row units; ``lazy``: the persistent staged form with the
    lazy rescale and the last warp's refill (the candidate chosen at b1024 on the H200)."""
    from bench.cli import _whisper_model
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized import whisper_fast as wf
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    if only:
        ok, why = hc.cuda_hidden_available("cuda")
        if not ok or torch.cuda.get_device_capability()[0] < 9:
            pytest.skip(why or "bulk copies need compute capability 9.0")
        monkeypatch.setattr(wf, "HIDDEN_ATTN_CONFIGS", ())
        cfg = {"persistent": (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2), "unit ring": (8, 5, 1, 32, 0, 0, 1, 1, 0, 1, 1, 1),
               "lazy": (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1)}[only]
        monkeypatch.setattr(hc, "CUDA_HIDDEN_CONFIGS", (cfg,))
        monkeypatch.setattr(hc, "persist_blocks", lambda device: 3)

    m = _whisper_model("synthetic:whisper-large-v3", torch.float16)
    cfg, gc = m.config, m.generation_config
    B, n = 8, 16
    g = torch.Generator(device="cuda").manual_seed(1)
    feats = torch.randn(B, cfg.num_mel_bins, 3000, device="cuda", generator=g).half()
    fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=n, suppress_tokens=gc.suppress_tokens,
                     begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id,
                     device="cuda", compile_encoder=False)
    assert fw.cross == "hidden"
    got = fw.generate(feats)[:, -n:]
    assert fw.attn_choice[B]["cross"].startswith(("triton shared-hidden", "cuda shared-hidden")), fw.attn_choice[B]
    if only:
        assert "persistent: 3 blocks" in fw.attn_choice[B]["cross"], fw.attn_choice[B]
        assert ("16-row units" in fw.attn_choice[B]["cross"]) == (only == "unit ring"), fw.attn_choice[B]
        assert ("lazy rescale" in fw.attn_choice[B]["cross"]) == (only == "lazy"), fw.attn_choice[B]
        assert ("the last warp done with a stage refills it" in fw.attn_choice[B]["cross"]) == (only == "lazy")
    # self-attention: the launch configuration chosen by timing (the fastest of those that passed
    # the check against SDPA)
    rec = fw.attn_choice[B]
    assert rec["self"].startswith("triton decode"), rec
    ok = {k: v for k, v in rec["self_us_per_layer"].items() if v == v}
    assert ok, rec
    best = min(ok, key=ok.get)
    blk, spl, wrp = (int(t[1:]) for t in best.split()[1:])
    assert rec["self"] == f"triton decode attention (block {blk}, splits {spl}, warps {wrp})", (best, rec)
    with torch.inference_mode():
        enc = m.model.encoder(feats).last_hidden_state
        kernel = fw._states[B]["xattn"]
        for li in (0, 15, 31):
            x = torch.randn(B, 1, cfg.d_model, device="cuda", generator=g).half()
            ref = m.model.decoder.layers[li].encoder_attn(x, key_value_states=enc)[0].float()
            out = fw.hidden_cross_attention(li, x, enc, kernel).float()
            rel = float((out - ref).norm() / ref.norm())
            assert rel < 5e-3, (li, rel)
        want = m.generate(feats, max_new_tokens=n, min_new_tokens=n, language="en", task="transcribe")[:, -n:]
    agree = float((want == got).float().mean())
    assert agree >= 0.9, agree


def test_whisper_overlapped_encoder_same_tokens_as_series():
    """A stream of batches with the next batch's encoder on a second stream during decoding (the
    hidden form, graphs captured): the same tokens as each batch through ``generate`` alone."""
    from bench.cli import _whisper_model
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    m = _whisper_model("synthetic:whisper-large-v3", torch.float16)
    cfg, gc = m.config, m.generation_config
    B, n = 8, 12
    g = torch.Generator(device="cuda").manual_seed(2)
    xs = [torch.randn(B, cfg.num_mel_bins, 3000, device="cuda", generator=g).half() for _ in range(3)]
    fw = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=n, suppress_tokens=gc.suppress_tokens,
                     begin_suppress_tokens=gc.begin_suppress_tokens, eos_token_id=gc.eos_token_id,
                     device="cuda", compile_encoder=False, encoder_chunk=4)
    series = [fw.generate(x) for x in xs]
    got = fw.generate_many(xs)
    assert fw.notes["batches"]["overlap"] is True, fw.notes["batches"]
    assert all(e is not None for e in fw.batch_events) and len(fw.batch_events) == 3
    for a, b in zip(series, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("H,S,E,B,cfg", [
    (20, 1500, 1280, 6, (8, 3, 1, 16, 0, 0, 0, 0)),
    (20, 1500, 1280, 5, (8, 3, 2, 16, 0, 0, 0, 0)),
    (20, 1500, 1280, 3, (8, 3, 1, 16, 1, 1, 0, 0)),
    (20, 1500, 1280, 3, (8, 2, 1, 32, 0, 0, 0, 0)),
    (20, 1500, 1280, 3, (8, 3, 1, 16, 0, 0, 1, 1)),
    (20, 1500, 1280, 4, (8, 3, 3, 16, 1, 0, 1, 0)),
    (6, 77, 384, 4, (8, 3, 3, 16, 0, 1, 0, 1)),
    (16, 1500, 1024, 2, (8, 3, 1, 16, 0, 0, 1, 1)),
    (20, 1500, 1280, 3, (8, 2, 1, 32, 0, 0, 1, 1)),
    (20, 1500, 1280, 5, (8, 2, 2, 32, 0, 0, 1, 0)),
    (6, 77, 384, 4, (8, 2, 3, 32, 0, 0, 1, 1)),
    (20, 1500, 1280, 3, (8, 4, 1, 32, 0, 0, 1, 1, 0, 2)),
    (20, 1500, 1280, 5, (8, 3, 2, 32, 0, 0, 1, 1, 0, 2)),
    (6, 77, 384, 4, (4, 3, 3, 32, 0, 0, 1, 1, 0, 2)),
    (16, 1500, 1024, 2, (8, 4, 1, 32, 0, 0, 1, 1, 0, 2)),
    (20, 1500, 1280, 3, (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 0, 0, 1)),   # lazy rescale: bulk copies
    (20, 1500, 1280, 5, (8, 2, 2, 32, 0, 0, 1, 1, 0, 1, 0, 0, 1)),   # … splits (merged on the host side)
    (6, 77, 384, 4, (8, 3, 3, 16, 0, 0, 0, 1, 0, 1, 0, 0, 1)),        # … cp.async loads, tail tile, 6 heads
])
def test_cuda_hidden_attention_matches_reference(H, S, E, B, cfg):
    """The hand-written CUDA kernel against the float32 reference: a tail tile (S not a multiple
    of 16), heads not a multiple of 8, splits, q' read in place from a head-major buffer, every
    kernel form (shared-memory q', pipelined, 32-row tiles, bulk-copy loads, scores summed once, a
    cluster of two blocks per clip)."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized.whisper_fast import hidden_attention_reference

    ok, why = hc.cuda_hidden_available("cuda")
    if not ok:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(B, S, E, device="cuda", generator=g).half()
    qp = (torch.randn(H, B, E, device="cuda", generator=g) * E ** -0.5 * 4).half().transpose(0, 1)
    k = hc.CudaHiddenAttention.from_config(B, H, S, E, cfg, device="cuda", dtype=torch.float16)
    got = k(qp, x).float()
    want = hidden_attention_reference(qp, x).float()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 5e-3, (cfg, rel)
    assert got.shape == (B, H, E) and got.stride(1) == B * E  # head-major buffer, as the per-head W_v reads it


@pytest.mark.parametrize("H,S,E,B,blocks,stages,rows,persist,ur,opts", [  # opts: 1 lazy rescale, 2 last-warp refill
    (20, 1500, 1280, 7, 5, 2, 32, 1, 0, 0),       # clips cut between blocks (ranges of 65–66 tiles of 47)
    (20, 1500, 1280, 7, 5, 2, 32, 2, 0, 0),       # … the output staged in shared memory
    (20, 1500, 1280, 300, None, 2, 32, 1, 0, 0),  # one block per multiprocessor, 2–3 clips each
    (20, 1500, 1280, 300, None, 2, 32, 2, 0, 0),
    (20, 1500, 1280, 300, "2x", 2, 32, 2, 0, 0),  # twice the multiprocessors: blocks not all resident at once
    (20, 1500, 1280, 5, None, 2, 32, 1, 0, 0),    # fewer clips than multiprocessors: a whole clip per block
    (6, 77, 384, 9, 4, 3, 32, 1, 0, 0),           # a last tile overlapping the one before, 6 heads, 3 stages
    (6, 77, 384, 9, 4, 3, 32, 2, 0, 0),
    (16, 1500, 1024, 6, 4, 3, 16, 1, 0, 0),       # 16-row tiles, 16 heads
    (16, 1500, 1024, 6, 4, 3, 16, 2, 0, 0),       # … staging larger than the partial-score buffers
    (20, 1500, 1280, 7, 5, 5, 32, 1, 1, 0),       # the unit ring (five 16-row units: real heads only), cut clips
    (20, 1500, 1280, 300, "2x", 5, 32, 1, 1, 0),  # … blocks not all resident at once
    (20, 1500, 1280, 300, None, 4, 32, 1, 1, 0),  # … four units (slots {0, 1} and {2, 3} in turn), padded heads
    (6, 77, 384, 9, 4, 3, 32, 1, 1, 0),           # … three units (one on its way, a tile's units wrap), 6 heads
    (16, 1500, 1024, 6, 4, 5, 32, 1, 1, 0),       # … 16 heads (no padded heads)
    (20, 1500, 1280, 7, 5, 2, 32, 2, 0, 1),       # lazy rescale: cut clips merged, output staged
    (20, 1500, 1280, 300, "2x", 2, 32, 2, 0, 1),  # … blocks not all resident at once
    (6, 77, 384, 9, 4, 3, 32, 1, 0, 1),           # … overlapping last tile, 6 heads, direct stores
    (20, 1500, 1280, 7, 5, 2, 32, 2, 0, 2),       # the last warp done with a stage refills it: cut clips
    (20, 1500, 1280, 300, "2x", 2, 32, 2, 0, 2),  # … blocks not all resident at once
    (6, 77, 384, 9, 4, 3, 32, 1, 0, 2),           # … three stages, overlapping last tile, direct stores
    (16, 1500, 1024, 6, 4, 3, 16, 2, 0, 3),       # … with the lazy rescale, 16-row tiles, 16 heads
])
def test_cuda_hidden_attention_persistent(H, S, E, B, blocks, stages, rows, persist, ur, opts):
    """The persistent form (a range of the batch's tiles per block, a clip cut between two blocks
    finished by the one that ends second) against the float32 reference: with the hand-over slots
    poisoned with NaN before the first launch, and on two inputs alternated, called directly and
    replayed from a device graph, so a stale or missed hand-over (the counters not reset, a part
    read before it was written) cannot pass on the previous launch's identical bits; the same bits
    on repeated calls; every counter back at zero."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized.whisper_fast import hidden_attention_reference

    ok, why = hc.cuda_hidden_available("cuda")
    if not ok:
        pytest.skip(why)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk copies need compute capability 9.0")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if blocks == "2x":
        blocks = min(B, 2 * sms)
    g = torch.Generator(device="cuda").manual_seed(5)
    xs = [torch.randn(B, S, E, device="cuda", generator=g).half() for _ in range(2)]
    qp = (torch.randn(H, B, E, device="cuda", generator=g) * E ** -0.5 * 4).half().transpose(0, 1)
    k = hc.CudaHiddenAttention(B, H, S, E, warps=8, stages=stages, rows=rows, bulk=True, red2=True, persist=persist,
                               unit_ring=bool(ur), lazy=bool(opts & 1), last_refills=bool(opts & 2), blocks=blocks,
                               device="cuda", dtype=torch.float16)
    assert k.grid == min(B, blocks or sms)
    assert "persistent" in k.label() and ("16-row units" in k.label()) == bool(ur)
    assert ("lazy rescale" in k.label()) == bool(opts & 1)
    assert ("the last warp done with a stage refills it" in k.label()) == bool(opts & 2)
    wants = [hidden_attention_reference(qp, x).float() for x in xs]

    def check(got, j):
        rel = float((got.float() - wants[j]).abs().max() / wants[j].abs().max())
        assert rel < 5e-3, (j, rel)

    k.parts.fill_(float("nan"))
    outs = []
    for j in (0, 1, 0, 1):
        out = k(qp, xs[j]).clone()
        check(out, j)
        outs.append(out)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    x_in = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        k(qp, x_in)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        k(qp, x_in)
    for j in (1, 0, 1):
        x_in.copy_(xs[j])
        graph.replay()
        torch.cuda.synchronize()
        check(k.out, j)
        assert torch.equal(k.out, outs[j])
    assert int(k.flags.abs().sum()) == 0


def _cuda_source(hc, H, S, E, cfg):
    """The kernel source of a CUDA_HIDDEN_CONFIGS-style tuple, as build_kernel makes it."""
    kw = hc.CudaHiddenAttention.config_kwargs(cfg)
    kw.pop("splits")
    return hc.kernel_source(H, E, seq=S, **kw)


@pytest.mark.parametrize("cfg,B,blocks", [
    ((8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1), 7, 5),     # the candidate: two stages, clips cut
    ((8, 4, 1, 16, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1), 300, None),  # four 16-row stages, direct stores, every SM
])
def test_cuda_hidden_attention_last_refill_waits_for_a_slow_warp(cfg, B, blocks):
    """The last warp's refill with one warp made to read every tile late (a test-only sleep of 4 µs
    before its second product, ``STALL_WARP``): a stage refilled before every warp is done with it
    would hand that warp rows of a later tile. The same bits as without the sleep, and the float32
    reference."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized.whisper_fast import hidden_attention_reference

    ok, why = hc.cuda_hidden_available("cuda")
    if not ok or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip(why or "bulk copies need compute capability 9.0")
    H, S, E = 20, 1500, 1280
    g = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(B, S, E, device="cuda", generator=g).half()
    qp = (torch.randn(H, B, E, device="cuda", generator=g) * E ** -0.5 * 4).half().transpose(0, 1)
    k = hc.CudaHiddenAttention.from_config(B, H, S, E, cfg, blocks=blocks, device="cuda", dtype=torch.float16)
    fast = k(qp, x).clone()
    slow = "#define STALL_WARP 5\n#define STALL_NS 4000\n" + _cuda_source(hc, H, S, E, cfg)
    assert "#define LASTW 1" in slow
    k.kernel = torch.cuda._compile_kernel(slow, "hidden_attn_cuda", nvcc_options=["-std=c++17"])
    hc._set_smem(k.kernel, k.smem)
    got = k(qp, x).float()
    torch.cuda.synchronize()
    assert torch.equal(got.half(), fast)
    want = hidden_attention_reference(qp, x).float()
    assert float((got - want).abs().max() / want.abs().max()) < 5e-3
    assert int(k.flags.abs().sum()) == 0


@pytest.mark.parametrize("cfg", [
    (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 0, 0, 1),  # lazy rescale, a block per clip
    (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1),  # … persistent, staged, clips cut between 3 blocks
    (8, 2, 2, 32, 0, 0, 1, 1, 0, 1, 0, 0, 1),  # … two splits per clip, merged
    (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 2),  # … with the next two tiles asked into L2 ahead
    (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1),  # … the last warp done with a stage refills it
    (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2),        # the same data without it
])
def test_cuda_hidden_attention_lazy_rescale_rising_scores(cfg):
    """Scores that grow along the clip, so that every head's running max passes itself by more
    than 2^8 several times, in different tiles for different heads (counted here on the float32
    scores with the kernel's rule): the lazy rescale's moves and skipped tiles both happen, and the
    output still matches the float32 reference."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized.whisper_fast import hidden_attention_reference

    ok, why = hc.cuda_hidden_available("cuda")
    if not ok or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip(why or "bulk copies need compute capability 9.0")
    B, H, S, E, rows = 7, 20, 1500, 1280, 32
    g = torch.Generator(device="cuda").manual_seed(11)
    ramp = 1 + 30 * torch.arange(S, device="cuda").float() / S
    x = (torch.randn(B, S, E, device="cuda", generator=g) * ramp[None, :, None]).half()
    qp = (torch.randn(H, B, E, device="cuda", generator=g) * E ** -0.5).half().transpose(0, 1)
    scores = torch.einsum("bhe,bse->bhs", qp.float(), x.float())
    tiles = torch.stack([scores[..., max(0, min(t * rows, S - rows)):min(S, (t + 1) * rows)].amax(-1)
                         for t in range(-(-S // rows))], -1)
    moves = torch.zeros(B, H, dtype=torch.int64)
    run = torch.full((B, H), -1e30, device="cuda")
    for t in range(tiles.shape[-1]):
        up = (tiles[..., t] - run) * 1.4426950408889634 > hc.LAZY_LOG2
        run = torch.where(up, tiles[..., t], run)
        moves += up.cpu()
    assert int(moves.min()) >= 3 and int(moves.max()) < tiles.shape[-1] // 2, moves
    kw = {"blocks": 3} if len(cfg) > 10 and cfg[10] else {}
    k = hc.CudaHiddenAttention.from_config(B, H, S, E, cfg, device="cuda", dtype=torch.float16, **kw)
    assert ("lazy rescale" in k.label()) == (len(cfg) > 12 and bool(cfg[12]))
    assert ("asked into L2" in k.label()) == (len(cfg) > 13 and bool(cfg[13]))
    got = k(qp, x).float()
    want = hidden_attention_reference(qp, x).float()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 5e-3, (cfg, rel)


def test_cuda_hidden_attention_with_blocks_is_the_same_kernel_on_another_grid():
    """``with_blocks`` (a share of the card's multiprocessors gets one block for each) builds the
    same kernel — every setting kept, the same source — on the asked grid with its own buffers,
    and its output is the float32 reference's; the per-clip forms refuse it, naming why."""
    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized.whisper_fast import hidden_attention_reference

    ok, why = hc.cuda_hidden_available("cuda")
    if not ok or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip(why or "bulk copies need compute capability 9.0")
    H, S, E, B = 20, 1500, 1280, 12
    cfg = (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1)  # the shipped candidate: lazy, last warp refills
    k = hc.CudaHiddenAttention.from_config(B, H, S, E, cfg, device="cuda", dtype=torch.float16)
    k5 = k.with_blocks(5)
    assert k5.grid == 5 and k.grid == min(B, torch.cuda.get_device_properties(0).multi_processor_count)
    assert k5._settings == k._settings and k5.smem == k.smem
    assert k5.label() == k.label().replace(f"persistent: {k.grid} blocks", "persistent: 5 blocks")
    assert k5.out.data_ptr() != k.out.data_ptr() and k5.flags.numel() == 6
    g = torch.Generator(device="cuda").manual_seed(17)
    x = torch.randn(B, S, E, device="cuda", generator=g).half()
    qp = (torch.randn(H, B, E, device="cuda", generator=g) * E ** -0.5 * 4).half().transpose(0, 1)
    want = hidden_attention_reference(qp, x).float()
    for kern in (k, k5):
        got = kern(qp, x).float()
        torch.cuda.synchronize()
        assert float((got - want).abs().max() / want.abs().max()) < 5e-3
        assert int(kern.flags.abs().sum()) == 0
    per_clip = hc.CudaHiddenAttention.from_config(B, H, S, E, cfg[:10], device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="per-clip forms"):
        per_clip.with_blocks(5)


@pytest.mark.parametrize("M,K,N,cfg", [
    (3 * 1500, 1280, 5120, None),                    # the encoder's first MLP product, 3 clips
    (1000, 1280, 5120, (128, 128, 64, 8, 4, 8)),     # rows not a multiple of the tile
    (777, 384, 1544, (128, 128, 64, 4, 4, 8)),       # whisper-tiny's width, columns cut in a tile
    (300, 96, 200, (256, 128, 64, 8, 3, 8)),
])
def test_linear_gelu_kernel_is_the_librarys_product_and_gelu(M, K, N, cfg):
    """The fused product + bias + exact GELU against the library's (cuBLAS with the bias, then the
    GELU in float32): equal but for the rounding of reordered float sums (≤ 2 float16 units in the
    last place of the largest values)."""
    import torch.nn.functional as F

    from mi300x_cert.workloads.optimized.encoder_fast import fused_mlp_supported, linear_gelu_triton

    ok, why = fused_mlp_supported("cuda")
    if not ok:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K, device="cuda", generator=g).half()
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).half()
    ref = F.gelu(F.linear(x, w, b))
    got = linear_gelu_triton(x.view(1, M, K), w, b, cfg).view(M, N)
    err = float((got.float() - ref.float()).abs().max())
    assert err <= 2 * float(ref.float().abs().max()) * 2.0 ** -10, err
    assert float((got.float() - ref.float()).abs().mean()) < 1e-4


@pytest.mark.parametrize("rows,N,per,warps,clamp", [(3 * 1500, 1280, 4, 4, True), (1001, 1280, 1, 8, False),
                                                     (777, 384, 2, 4, True)])
def test_add_layer_norm_kernel_is_the_librarys_add_and_norm(rows, N, per, warps, clamp):
    """The add (+ clamp) + LayerNorm kernel against the library's ops on the card: the sum bit for
    bit (a value past the bound and inf clamped, NaN kept), the norm to float16 rounding (NaN in
    the same rows)."""
    from mi300x_cert.workloads.optimized.encoder_fast import add_layer_norm_reference, add_layer_norm_triton

    g = torch.Generator(device="cuda").manual_seed(rows)
    r = (torch.randn(rows, N, device="cuda", generator=g) * 4).half()
    y = torch.randn(rows, N, device="cuda", generator=g).half()
    w = (torch.rand(N, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).half()
    if clamp:  # past the bound, inf and NaN: clamped, clamped, kept (as torch.clamp does)
        r[0, :3] = torch.tensor([65000.0, float("inf"), float("nan")], device="cuda").half()
        y[0, :3] = 400.0
    h0, o0 = add_layer_norm_reference(r, y, w, b, 1e-5, clamp)
    h, o = add_layer_norm_triton(r.view(1, rows, N), y.view(1, rows, N), w, b, 1e-5, clamp, per, warps)
    h, o = h.view(rows, N), o.view(rows, N)
    assert torch.equal(h.isnan(), h0.isnan()) and torch.equal(h.nan_to_num(), h0.nan_to_num())
    assert torch.equal(o.isnan(), o0.isnan())
    ok = ~o0.isnan()
    err = float((o[ok].float() - o0[ok].float()).abs().max())
    assert err <= 2 * float(o0[ok].float().abs().max()) * 2.0 ** -10, err


@pytest.mark.parametrize("form", ["fast", "fast+mlp", "fast+norm", "fast+mlp+norm"])
def test_fast_encoder_compiled_is_the_library_encoder(form):
    """Large-v3's encoder in its fast form (attention without layout copies; ``+mlp``: the MLP's
    first product and GELU in one kernel; ``+norm``: each residual add with the next LayerNorm in
    one), compiled as the optimized path runs it, against the library encoder: the same last hidden
    state up to float16 rounding; and the attention's projections reach the fused kernel without
    the copies (no layout kernel in the profile), in one compiled graph."""
    from bench.cli import _whisper_model
    from mi300x_cert.workloads.optimized.common import compile_module
    from mi300x_cert.workloads.optimized.encoder_fast import FastEncoder, fused_mlp_supported

    if form == "fast+mlp":
        ok, why = fused_mlp_supported("cuda")
        if not ok:
            pytest.skip(why)
    m = _whisper_model("synthetic:whisper-large-v3", torch.float16)
    enc = m.model.encoder
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, m.config.num_mel_bins, 3000, device="cuda", generator=g).half()
    from torch._dynamo.utils import counters

    fe = FastEncoder(enc, mlp="fused" if "mlp" in form else "library", norm="fused" if "norm" in form else "library")
    fn, _label = compile_module(fe, device="cuda", fullgraph=False)
    counters.clear()
    with torch.inference_mode():
        ref = enc(x).last_hidden_state.float()
        got = fn(x).float()
        assert not counters["graph_break"], dict(counters["graph_break"])  # one graph, the operator inside it
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 5e-3, rel
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(x)
            torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert not [n for n in names if "clone" in n and "attention" in n], names
    if "norm" in form:  # Inductor's norm kernels only for the first layer's first norm (with the front end)
        calls = {e.key: e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA")}
        assert sum(c for n, c in calls.items() if "add_ln_kernel" in n) == 2 * len(enc.layers), calls
        norms = {n: c for n, c in calls.items() if "layer_norm" in n}
        assert sum(norms.values()) <= 3, norms


@pytest.mark.parametrize("N,C,H,W,G,silu,time_add,eps,cfg", [
    (64, 320, 64, 64, 32, True, True, 1e-5, (64, 64, 4)),     # SD's largest norm, with the time embedding
    (3, 960, 31, 33, 32, True, False, 1e-5, (64, 64, 4)),     # 30 channels per group, a tail of pixels
    (2, 640, 16, 16, 32, False, False, 1e-6, (32, 128, 8)),   # a transformer's input norm, another launch
    (5, 96, 7, 9, 8, True, True, 1e-5, (16, 64, 4)),          # tails in both the pixels and the channels
    # the statistics summed per tile, more programs, other tiles (bench/sd_profile.py's settings)
    (64, 640, 32, 32, 32, True, True, 1e-5, (64, 64, 4, dict(stat_rows=128, stat_tile_sum=True, stat_programs=4))),
    (3, 960, 31, 33, 32, True, False, 1e-5, (64, 64, 4, dict(stat_rows=32, stat_warps=8, stat_programs=8))),
    # the one-kernel form (a program per sample and group): one image's largest norm with the time
    # embedding, a tail of pixels with 30 channels per group, 80 channels per group in a larger tile
    (2, 320, 64, 64, 32, True, True, 1e-5, (64, 64, 4, dict(single=True))),
    (3, 960, 31, 33, 32, True, False, 1e-5, (64, 64, 4, dict(single=True))),
    (2, 2560, 8, 8, 32, False, False, 1e-6, (64, 64, 4, dict(single=True, single_tile=4096, single_warps=8))),
    # two kernels (statistics per whole group, merged by the normalizing pass): one image's largest
    # norm with the time embedding, 40 channels per group (128 lanes), 30 with a tail of pixels, and
    # 32 images' largest norm (more programs than the rule gives it)
    (2, 320, 64, 64, 32, True, True, 1e-5, (64, 64, 4, dict(merge=True))),
    (2, 1280, 32, 32, 32, True, True, 1e-5, (64, 64, 4, dict(merge=True))),
    (3, 960, 31, 33, 32, True, False, 1e-5, (64, 64, 4, dict(merge=True))),
    (64, 320, 64, 64, 32, True, True, 1e-5, (64, 64, 4, dict(merge=True))),
])
def test_group_norm_act_kernel_is_the_librarys_norm(N, C, H, W, G, silu, time_add, eps, cfg):
    """The GroupNorm (+ time embedding, + SiLU) kernels on the card against float64 and against the
    library's ops: no further from float64 than the library's float16 result (plus one float16
    unit), activations with a large common offset included (the variance's cancellation), the
    output in the input's channels-last layout."""
    import torch.nn.functional as F

    from mi300x_cert.workloads.optimized.unet_fast import group_norm_act_reference, group_norm_act_triton

    g = torch.Generator(device="cuda").manual_seed(N * C)
    x = (torch.randn(N, C, H, W, device="cuda", generator=g) * 2 + 30).half().to(memory_format=torch.channels_last)
    t = torch.randn(N, C, device="cuda", generator=g).half() if time_add else None
    w = (torch.rand(C, device="cuda", generator=g) + 0.5).half()
    b = torch.randn(C, device="cuda", generator=g).half()
    br, bc, warps, *stat = cfg
    # the three kernels unless a case asks for the one- or two-kernel form (small shapes would take
    # them by default)
    form = {"single": False, "merge": False, **(stat[0] if stat else {})}
    got = group_norm_act_triton(x, t, w, b, G, eps, silu, block_rows=br, block_c=bc, warps=warps, **form)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float16
    lib = group_norm_act_reference(x, t, w, b, G, eps, silu)
    h = x if t is None else x + t[:, :, None, None]          # the library's add, in float16
    ref = F.group_norm(h.double(), G, w.double(), b.double(), eps)
    if silu:
        ref = F.silu(ref.half().double())
    err_got = float((got.double() - ref).abs().max())
    err_lib = float((lib.double() - ref).abs().max())
    unit = float(ref.abs().max()) * 2.0 ** -10
    assert err_got <= err_lib + unit, (err_got, err_lib, unit)
    if t is not None:   # t read in place: a time-table row expanded over the batch, the same bits
        row = t[:1].expand(N, -1)
        same = group_norm_act_triton(x, row, w, b, G, eps, silu, block_rows=br, block_c=bc, warps=warps, **form)
        assert torch.equal(same, group_norm_act_triton(x, row.contiguous(), w, b, G, eps, silu, block_rows=br,
                                                       block_c=bc, warps=warps, **form))


def _kernel_calls(fn):
    """{kernel name: launches} on the card for one call of ``fn``, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA")}


def test_fast_unet_compiled_is_the_library_unet(monkeypatch):
    """The tiny SD UNet and VAE decoder in the ``fast`` form (upsampling kept channels-last, every
    GroupNorm by the kernels: the size rule lowered to 0 so the tiny model's norms all take them),
    compiled in one graph as the optimized path compiles them, against the library's modules compiled
    the same way: the same output up to float16 rounding, the kernels in the profile, no norm of
    Inductor's left in the UNet's kernels."""
    import copy

    from mi300x_cert.workloads.optimized import unet_fast
    from mi300x_cert.workloads.sd import SDWorkload

    monkeypatch.setattr(unet_fast, "KERNEL_MIN_ELEMENTS", 0)
    wl = SDWorkload(dict(model="synthetic:sd-tiny", height=64, width=64, steps=2, guidance=7.5, dtype="float16",
                         seed=0, device="cuda", path="stock"))
    if getattr(wl, "_hook", None) is not None:
        wl._hook.remove()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():  # each norm its own weights (a synthetic model's are ones and zeros)
        for m in (*wl.unet.modules(), *wl.vae.modules()):
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, device="cuda", generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, device="cuda", generator=g))
    unet = wl.unet.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(unet)
    counts = unet_fast.prepare_unet(fast, "fast")
    assert counts["resnet"] > 0 and counts["norm"] > 0 and counts["upsample"] > 0, counts
    B = 64   # diffusers' channels-first copy in Upsample2D happens from a batch of 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, 4, 16, 16, device="cuda", generator=g).half().to(memory_format=torch.channels_last)
    e = torch.randn(B, 77, unet.config.cross_attention_dim, device="cuda", generator=g).half()
    t = torch.tensor(500.0, device="cuda")
    torch._dynamo.reset()
    lib_fn = torch.compile(unet, fullgraph=True, dynamic=False)
    fast_fn = torch.compile(fast, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        ref = lib_fn(x, t, encoder_hidden_states=e, return_dict=False)[0].float()
        got = fast_fn(x, t, encoder_hidden_states=e, return_dict=False)[0].float()
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 5e-3, rel
        calls = _kernel_calls(lambda: fast_fn(x, t, encoder_hidden_states=e, return_dict=False))
    n_norms = sum(1 for m in fast.modules() if isinstance(m, torch.nn.GroupNorm))
    # each norm normalized once: by the three kernels' last or by the one-kernel form
    assert sum(c for n, c in calls.items() if n.startswith(("_gn_apply", "_gn_single"))) == n_norms, calls
    # Inductor names its own kernels after the ops they feed too ("…_group_norm_act_…"): a library
    # norm would be "native_group_norm"
    assert not [n for n in calls if "native_group_norm" in n], calls

    # the VAE decoder: its resnets (the up blocks' "group" time norm among them) and its output norm
    # by the kernels, the mid block's attention norm the library's
    vae = wl.vae.to(memory_format=torch.channels_last)
    fast_vae = copy.deepcopy(vae)
    counts = unet_fast.prepare_unet(fast_vae, "fast")
    dec = fast_vae.decoder
    dec_resnets = [m for m in dec.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert any(m.time_embedding_norm == "group" for m in dec_resnets), "the up blocks' norm"
    z = torch.randn(4, 4, 16, 16, device="cuda", generator=g).half().to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    lib_dec = torch.compile(lambda z: vae.decode(z, return_dict=False)[0], fullgraph=True, dynamic=False)
    fast_dec = torch.compile(lambda z: fast_vae.decode(z, return_dict=False)[0], fullgraph=True, dynamic=False)
    with torch.inference_mode():
        ref = lib_dec(z).float()
        got = fast_dec(z).float()
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 5e-3, rel
        calls = _kernel_calls(lambda: fast_dec(z))
    assert sum(c for n, c in calls.items()
               if n.startswith(("_gn_apply", "_gn_single"))) == 2 * len(dec_resnets) + 1, (counts, calls)
