"""Whisper large-v3 on one GPU, part by part: the encoder (eager, cuDNN attention first, compiled)
and one decoder layer's cross-attention for one step in both forms (K/V through SDPA and the decode
kernel; the shared-hidden form through each HiddenAttention launch configuration).

    python bench/whisper_parts.py [--batch 256] [--encoder-chunk 128] [--out parts.json]

Prints one JSON object per part as it goes and the whole result at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _events_ms(fn: Any, n: int, warm: int = 2) -> float:
    import torch

    for _ in range(warm):
        fn(0)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for i in range(n):
        ev[0].record()
        fn(i)
        ev[1].record()
        ev[1].synchronize()
        ts.append(ev[0].elapsed_time(ev[1]))
    return statistics.median(ts)


def kernel_rows(prof: Any, per: float, count_div: int = 1, top: int | None = 30) -> list[list[Any]]:
    """The device kernels of a ``torch.profiler`` run, heaviest first: [µs / ``per``, calls /
    ``count_div``, name (90 characters)] for the ``top`` heaviest (all for None)."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and t > 0:
            rows.append((t / per, e.count // count_div, e.key[:90]))
    rows.sort(reverse=True)
    return [list(r) for r in rows[:top]]


def step_kernel_rows(fw: Any, st: dict[str, Any], steps: int, top: int | None = 30) -> list[list[Any]]:
    """:func:`kernel_rows` of ``steps`` eager decode steps of ``fw`` on the prefilled state ``st`` at
    position 60, per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    st["pos"].fill_(60)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fw._step(st)
        torch.cuda.synchronize()
    return kernel_rows(prof, float(steps), steps, top=top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:whisper-large-v3")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--encoder-chunk", type=int, default=128)
    ap.add_argument("--time-limit", type=float, default=240.0)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(encoder)")
    ap.add_argument("--profile-batch", type=int, default=0, help="profile one decode step at this batch")
    ap.add_argument("--skip-encoder", action="store_true", help="only the cross-attention (and the step profile)")
    ap.add_argument("--extra-configs", default="sweep", choices=["sweep", "none"],
                    help="also time launch configurations beyond the chooser's candidates")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.cli import _whisper_model, environment
    from mi300x_cert.workloads.optimized import whisper_fast as wf

    t_end = time.time() + a.time_limit
    res: dict[str, Any] = {"conditions": environment(), "model": a.model, "dtype": "float16"}

    def emit(key: str, val: Any) -> None:
        res[key] = val
        print(json.dumps({key: val}), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))

    m = _whisper_model(a.model, torch.float16)
    enc = m.model.encoder
    cfg = m.config
    E, H = cfg.d_model, cfg.decoder_attention_heads
    D = E // H
    # -- one layer's cross-attention for one decode step --------------------------------------------
    B, S = a.batch, 1500
    g = torch.Generator(device="cuda").manual_seed(0)
    nrot = 2  # rotate over buffers so each timed call reads from memory (they exceed the L2)
    ks = [torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(nrot)]
    vs = [torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(nrot)]
    q = torch.randn(B, H, D, device="cuda", dtype=torch.float16, generator=g) * D ** -0.5
    xa: dict[str, Any] = {"batch": B, "S": S, "E": E, "H": H,
                          "kv_gb": 2 * B * S * E * 2 / 1e9, "hidden_gb": B * S * E * 2 / 1e9}
    with torch.inference_mode():
        ms = _events_ms(lambda i: F.scaled_dot_product_attention(q.view(B, H, 1, D), ks[i % nrot], vs[i % nrot],
                                                                  scale=1.0), 20)
        xa["kv_sdpa_us"] = ms * 1e3
        da = wf.DecodeAttention(B, H, S, D, block_n=64, splits=1, num_warps=4, device="cuda", dtype=torch.float16)
        ms = _events_ms(lambda i: da(q, ks[i % nrot], vs[i % nrot]), 20)
        xa["kv_triton_us"] = ms * 1e3
    del ks, vs
    torch.cuda.empty_cache()
    X = [torch.randn(B, S, E, device="cuda", dtype=torch.float16, generator=g) for _ in range(nrot)]
    qp = (torch.randn(B, H, E, device="cuda", dtype=torch.float32, generator=g) * E ** -0.5 * 4).half()
    ref = wf.hidden_attention_reference(qp[:4], X[0][:4]).float()
    ref_last = wf.hidden_attention_reference(qp[-4:], X[0][-4:]).float()
    cfgs: dict[str, Any] = {}
    with torch.inference_mode():
        # beyond the chooser's candidates: fewer rows per block (less shared memory, so a second
        # program or another kernel fits on a multiprocessor), more warps, deeper pipelines
        extra = ((16, 1, 4, 2, 16), (16, 1, 4, 4, 16), (16, 1, 8, 3, 16), (16, 1, 8, 4, 16), (32, 1, 8, 2, 16),
                 (32, 1, 8, 3, 16), (64, 1, 8, 2, 16), (16, 1, 2, 3, 16), (32, 1, 4, 3, 32), (16, 1, 8, 3, 32))
        if a.extra_configs == "none":
            extra = ()
        for c in wf.HIDDEN_ATTN_CONFIGS + extra:
            key = "b{} s{} w{} st{} h{}".format(*c)
            try:
                ha = wf.HiddenAttention(B, H, S, E, block_n=c[0], splits=c[1], num_warps=c[2], num_stages=c[3],
                                        head_tile=c[4], device="cuda", dtype=torch.float16)
                ha.out.fill_(float("nan"))
                o = ha(qp, X[0]).float()
                e1 = float((o[:4] - ref).norm() / ref.norm())
                e2 = float((o[-4:] - ref_last).norm() / ref_last.norm())
                ms = _events_ms(lambda i: ha(qp, X[i % nrot]), 20)
                cfgs[key] = {"us": ms * 1e3, "tb_s": xa["hidden_gb"] / (ms * 1e-3) / 1e3, "rel_err": max(e1, e2)}
            except Exception as e:
                cfgs[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(key, cfgs[key], flush=True)
    xa["hidden_triton"] = cfgs
    emit("cross_attention", xa)
    del X
    torch.cuda.empty_cache()
    # -- one whole decode step (hidden form), graph-replayed and profiled eagerly --------------------
    if a.profile_batch:
        Bp = a.profile_batch
        gc = m.generation_config
        fw = wf.FastWhisper(m, prompt_ids=wf.whisper_prompt_ids(gc), new_tokens=128,
                            suppress_tokens=getattr(gc, "suppress_tokens", None),
                            begin_suppress_tokens=getattr(gc, "begin_suppress_tokens", None),
                            eos_token_id=gc.eos_token_id, device="cuda")
        feats = torch.randn(Bp, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16)
        prof_out: dict[str, Any] = {"batch": Bp, "cross_form": fw.cross}
        with torch.inference_mode():
            fw.prefill(feats)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            st = fw.prefill(feats)
            torch.cuda.synchronize()
            prof_out["prefill_s"] = time.perf_counter() - t0
            fw._choose_attention(st)
            fw._capture(st)
            prof_out["attention"] = fw.attn_choice.get(Bp)
            st["pos"].fill_(10)
            ms = _events_ms(lambda i: st["graph"].replay(), 20)
            prof_out["graph_step_ms"] = ms
            rows = step_kernel_rows(fw, st, 3, top=None)
            prof_out["kernels_us_per_step"] = rows[:30]
            prof_out["kernel_total_us_per_step"] = sum(r[0] for r in rows)
        emit("decode_step", prof_out)
        del fw, st, feats
        torch.cuda.empty_cache()
    if a.skip_encoder:
        if not a.out:
            print(json.dumps(res, indent=1))
        return
    # -- encoder ----------------------------------------------------------------------------------
    from torch.utils.flop_counter import FlopCounterMode

    x1 = torch.randn(1, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        enc(x1)
    tflop_clip = fc.get_total_flops() / 1e12
    C = a.encoder_chunk
    xs = [torch.randn(C, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16) for _ in range(2)]
    out_enc: dict[str, Any] = {"tflop_per_clip": tflop_clip, "chunk": C}

    def run_enc(fn: Any) -> dict[str, float]:
        with torch.inference_mode():
            ms = _events_ms(lambda i: fn(xs[i % 2]), 3)
        return {"ms_per_chunk": ms, "ms_per_clip": ms / C, "tflops": tflop_clip * C / (ms * 1e-3)}

    out_enc["eager_default"] = run_enc(lambda x: enc(x).last_hidden_state)
    emit("encoder", out_enc)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        out_enc["eager_cudnn_first"] = run_enc(lambda x: enc(x).last_hidden_state)
    emit("encoder", out_enc)
    if a.compile and time.time() < t_end - 120:
        from mi300x_cert.workloads.optimized.common import setup_compile_cache

        setup_compile_cache()
        cenc = torch.compile(enc, mode="default", dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            cenc(xs[0])
        torch.cuda.synchronize()
        out_enc["compile_s"] = time.perf_counter() - t0
        out_enc["compiled_default"] = run_enc(lambda x: cenc(x).last_hidden_state)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH], set_priority=True):
            out_enc["compiled_cudnn_first"] = run_enc(lambda x: cenc(x).last_hidden_state)
        emit("encoder", out_enc)
    del xs
    torch.cuda.empty_cache()
    # the copy rate of the card, for reference
    big = torch.empty(int(2e9) // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(big)
    ms = _events_ms(lambda i: dst.copy_(big), 10)
    emit("copy_tb_s", 2 * big.numel() * 2 / (ms * 1e-3) / 1e12)
    if not a.out:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
