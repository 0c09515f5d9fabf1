"""Whisper large-v3 on one GPU with its multiprocessors split between decoding and the next
batch's encoder (CUDA green contexts): how the cross-attention kernel, the encoder and a whole
decode step scale with the number of multiprocessors they get, and what the two achieve side by
side, each on its own share, against the same work in series.

    python bench/whisper_partition.py [--batch 1024] [--sms 112,96,80,64,48,32] [--splits 48,64,80,96] [--out part.json]

Prints one JSON object per part as it goes; the whole result is written after each part, so a
killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:whisper-large-v3")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--encoder-chunk", type=int, default=128)
    ap.add_argument("--sms", default="112,96,80,64,48,32", help="multiprocessor counts to try")
    ap.add_argument("--splits", default="48,64,80,96", help="decode's share of multiprocessors, side by side")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from torch.cuda import green_contexts as gcx

    from bench.cli import _whisper_model, environment
    from mi300x_cert.workloads.optimized import whisper_fast as wf
    from mi300x_cert.workloads.optimized.common import setup_compile_cache

    res: dict[str, Any] = {"conditions": environment(), "model": a.model, "dtype": "float16", "batch": a.batch}

    def emit(key: str, val: Any) -> None:
        res[key] = val
        print(json.dumps({key: val}, default=str), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1, default=str))

    api = {"supported": bool(getattr(gcx, "SUPPORTED", False)),
           "methods": [n for n in dir(gcx.GreenContext) if not n.startswith("__")]}
    emit("green_context_api", api)
    sm_total = torch.cuda.get_device_properties(0).multi_processor_count
    ctxs: dict[int, Any] = {}
    streams: dict[int, Any] = {}

    def stream_for(n: int) -> Any:
        """A device stream whose kernels run on ``n`` multiprocessors (the whole card for n ≥ all)."""
        if n >= sm_total:
            return torch.cuda.current_stream()
        if n not in streams:
            try:
                ctx = gcx.GreenContext.create(num_sms=n, device_id=0)
            except TypeError:
                ctx = gcx.GreenContext.create(n, 0)
            ctxs[n] = ctx
            if hasattr(ctx, "Stream"):
                streams[n] = ctx.Stream()
            else:
                ctx.set_context()
                streams[n] = torch.cuda.current_stream()
                ctx.pop_context()
        return streams[n]

    @contextmanager
    def on(n: int) -> Iterator[Any]:
        s = stream_for(n)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            yield s
        torch.cuda.current_stream().wait_stream(s)

    def timed_ms(n: int, fn: Any, reps: int) -> float:
        with on(n) as s:
            fn()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(s)
            for _ in range(reps):
                fn()
            e1.record(s)
        e1.synchronize()
        return e0.elapsed_time(e1) / reps

    setup_compile_cache()
    m = _whisper_model(a.model, torch.float16)
    cfg, gc = m.config, m.generation_config
    fw = wf.FastWhisper(m, prompt_ids=wf.whisper_prompt_ids(gc), new_tokens=128,
                        suppress_tokens=getattr(gc, "suppress_tokens", None),
                        begin_suppress_tokens=getattr(gc, "begin_suppress_tokens", None),
                        eos_token_id=gc.eos_token_id, device="cuda", encoder_chunk=a.encoder_chunk)
    B, C = a.batch, a.encoder_chunk
    feats = torch.randn(B, cfg.num_mel_bins, 3000, device="cuda", dtype=torch.float16)
    sms = [int(s) for s in a.sms.split(",") if s]
    with torch.inference_mode():
        t0 = time.perf_counter()
        st = fw._ready(fw.prefill(feats), feats)
        torch.cuda.synchronize()
        emit("setup", {"s": time.perf_counter() - t0, "decode_step": fw.reason,
                       "attention": {k: v for k, v in (fw.attn_choice.get(B) or {}).items() if k != "rejected"}})
        # -- the chosen cross-attention kernel against the multiprocessor count --------------------
        kern, X = st["xattn"], st["enc"]
        qp = (torch.randn(B, fw.H, fw.E, device="cuda") * fw.E ** -0.5).half()
        gb = X.numel() * X.element_size() / 1e9
        xa: dict[str, Any] = {"kernel": kern.label(), "gb_per_call": gb, "by_sms": {}}
        for n in [sm_total] + sms:
            try:
                ms = timed_ms(n, lambda: kern(qp, X), 10)
                xa["by_sms"][str(n)] = {"us": ms * 1e3, "tb_s": gb / (ms * 1e-3) / 1e3}
            except Exception as e:
                xa["by_sms"][str(n)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit("cross_attention", xa)
        # -- the compiled encoder, one chunk ----------------------------------------------------
        xc = feats[:C]
        flop = 2.27377152e12 * C
        en: dict[str, Any] = {"chunk": C, "encoder": fw.encoder_label, "by_sms": {}}
        for n in [sm_total] + sms:
            try:
                ms = timed_ms(n, lambda: fw._encode(xc), 2)
                en["by_sms"][str(n)] = {"ms_per_clip": ms / C, "tflops": flop / (ms * 1e-3) / 1e12}
            except Exception as e:
                en["by_sms"][str(n)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit("encoder", en)
        # -- a whole decode step: the captured graph on the whole card (a graph replay runs on every
        # multiprocessor whatever context its stream belongs to), eager steps on each share -------
        g = st["graph"]
        steps = a.steps

        def replay() -> None:
            for _ in range(steps):
                g.replay()
            st["pos"].sub_(steps)

        def eager() -> None:
            for _ in range(steps):
                fw._step(st)
            st["pos"].sub_(steps)

        st["pos"].fill_(60)
        ds: dict[str, Any] = {"graph_ms_per_step": timed_ms(sm_total, replay, 2) / steps, "by_sms": {}}
        for n in [sm_total] + sms:
            try:
                ds["by_sms"][str(n)] = {"ms_per_step": timed_ms(n, eager, 2) / steps}
            except Exception as e:
                ds["by_sms"][str(n)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit("decode_step", ds)
        # -- side by side: eager decode steps on one share, the encoder on the rest; launches
        # interleaved (a chunk, then a few steps) so neither waits on the host behind the other ---
        side: dict[str, Any] = {}
        T = fw.total - 1
        for nd in [int(x) for x in a.splits.split(",") if x]:
            ne = (sm_total - nd) // 8 * 8
            row: dict[str, Any] = {"decode_sms": nd, "encoder_sms": ne}
            try:
                torch.cuda.synchronize()
                sd, se = stream_for(nd), stream_for(ne)
                sd.wait_stream(torch.cuda.current_stream())
                se.wait_stream(torch.cuda.current_stream())
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                ev[0].record(sd)
                ev[2].record(se)
                for _ in range(2):
                    with torch.cuda.stream(se):
                        fw._encode(xc)
                    with torch.cuda.stream(sd):
                        eager()
                ev[3].record(se)
                ev[1].record(sd)
                torch.cuda.synchronize()
                dec_ms = ev[0].elapsed_time(ev[1]) / (2 * steps)
                enc_ms = ev[2].elapsed_time(ev[3]) / (2 * C)
                row.update({"decode_ms_per_step": dec_ms, "encoder_ms_per_clip": enc_ms})
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            # a batch of B clips with its decoding on nd multiprocessors and the next batch's encoder
            # on ne, from the rates each share reached alone, against the whole card in series
            try:
                d1, e1 = ds["by_sms"][str(sm_total)]["ms_per_step"], en["by_sms"][str(sm_total)]["ms_per_clip"]
                dn, en_ = ds["by_sms"][str(nd)]["ms_per_step"], en["by_sms"][str(ne)]["ms_per_clip"]
                row["model_batch_s"] = {"series": (T * d1 + B * e1) / 1e3, "split": max(T * dn, B * en_) / 1e3}
            except Exception as e:
                row["model_batch_s"] = f"not modelled: {type(e).__name__}: {e}"
            side[str(nd)] = row
            emit("side_by_side", side)
        # -- the decode step captured on a share's own stream (its kernels then keep to the share),
        # alone and beside the encoder on the rest: all replays launched first, then the encoder ----
        gs: dict[str, Any] = {}
        for nd in [int(x) for x in a.splits.split(",") if x]:
            ne = (sm_total - nd) // 8 * 8
            row = {"decode_sms": nd, "encoder_sms": ne}
            try:
                sd, se = stream_for(nd), stream_for(ne)
                torch.cuda.synchronize()
                saved = st["pos"].clone()
                gg = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gg, stream=sd):
                    fw._step(st)
                torch.cuda.synchronize()
                st["pos"].copy_(saved)

                def greplay(n: int = steps) -> None:
                    for _ in range(n):
                        gg.replay()
                    st["pos"].sub_(n)

                sd.wait_stream(torch.cuda.current_stream())
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                with torch.cuda.stream(sd):
                    greplay(1)
                    ev[0].record(sd)
                    greplay()
                    ev[1].record(sd)
                torch.cuda.synchronize()
                row["alone_ms_per_step"] = ev[0].elapsed_time(ev[1]) / steps
                sd.wait_stream(torch.cuda.current_stream())
                se.wait_stream(torch.cuda.current_stream())
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                with torch.cuda.stream(sd):
                    ev[0].record(sd)
                    greplay(3 * steps)
                    ev[1].record(sd)
                with torch.cuda.stream(se):
                    ev[2].record(se)
                    for _ in range(2):
                        fw._encode(xc)
                    ev[3].record(se)
                torch.cuda.synchronize()
                row["beside_ms_per_step"] = ev[0].elapsed_time(ev[1]) / (3 * steps)
                row["encoder_beside_ms_per_clip"] = ev[2].elapsed_time(ev[3]) / (2 * C)
                row["encoder_alone_ms_per_clip"] = en["by_sms"].get(str(ne), {}).get("ms_per_clip")
                del gg
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            gs[str(nd)] = row
            emit("graph_on_share", gs)
        # -- where a decode step's time goes (eager step, profiled) ---------------------------------
        from torch.profiler import ProfilerActivity, profile

        st["pos"].fill_(60)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                fw._step(st)
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t and t > 0:
                rows.append((t / 2.0, e.count // 2, e.key[:90]))
        rows.sort(reverse=True)
        emit("decode_step_kernels_us", [list(r) for r in rows[:25]])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fw._encode(xc)
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t and t > 0:
                rows.append((t / C, e.count, e.key[:90]))
        rows.sort(reverse=True)
        emit("encoder_kernels_us_per_clip", [list(r) for r in rows[:25]])


if __name__ == "__main__":
    sys.exit(main())
