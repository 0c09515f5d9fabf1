"""Whisper large-v3 on one GPU, its multiprocessors shared out (CUDA green contexts): how the
cross-attention kernel, the encoder and a whole decode step (eager, and captured as a graph on the
share's own stream) scale with the number of multiprocessors they get, one share at a time; and,
from those rates, a model of a batch with its decoding on one share and the next batch's encoder
on another, against the same work in series on the whole card. (Two shares side by side are not
measured: torch's green contexts are each carved from the whole device, so two of them overlap.)

    python bench/whisper_partition.py [--batch 1024] [--sms 112,96,80,64,48,32] [--out part.json]

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
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from torch.cuda import green_contexts as gcx

    from bench.cli import _whisper_counts, _whisper_model, run_record
    from bench.whisper_parts import kernel_rows, step_kernel_rows
    from mi300x_cert.workloads.optimized import whisper_fast as wf
    from mi300x_cert.workloads.optimized.common import setup_compile_cache

    res: dict[str, Any] = {"conditions": run_record(),
                           "model": a.model, "dtype": "float16", "batch": a.batch}

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
        try:
            with torch.cuda.stream(s):
                yield s
        finally:
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

    def by_share(shares: list[int], measure: Any) -> dict[str, Any]:
        """{share: measure(share)} for each multiprocessor count, an error recorded where it fails."""
        out: dict[str, Any] = {}
        for n in shares:
            try:
                out[str(n)] = measure(n)
            except Exception as e:
                out[str(n)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return out

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

        def kernel_rate(n: int) -> dict[str, float]:
            ms = timed_ms(n, lambda: kern(qp, X), 10)
            return {"us": ms * 1e3, "tb_s": gb / (ms * 1e-3) / 1e3}

        emit("cross_attention", {"kernel": kern.label(), "gb_per_call": gb,
                                 "by_sms": by_share([sm_total] + sms, kernel_rate)})
        # -- the compiled encoder, one chunk ----------------------------------------------------
        xc = feats[:C]
        flop = _whisper_counts(m, cfg.num_mel_bins)["encoder_tflop_per_clip"] * 1e12 * C

        def encoder_rate(n: int) -> dict[str, float]:
            ms = timed_ms(n, lambda: fw._encode(xc), 2)
            return {"ms_per_clip": ms / C, "tflops": flop / (ms * 1e-3) / 1e12}

        en: dict[str, Any] = {"chunk": C, "encoder": fw.encoder_label,
                              "by_sms": by_share([sm_total] + sms, encoder_rate)}
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
        ds: dict[str, Any] = {"graph_ms_per_step": timed_ms(sm_total, replay, 2) / steps,
                              "by_sms": by_share([sm_total] + sms,
                                                 lambda n: {"ms_per_step": timed_ms(n, eager, 2) / steps})}
        emit("decode_step", ds)
        # -- the decode step captured as a graph on a share's own stream (its kernels then keep to
        # the share; one captured on the whole card's stream runs everywhere), alone ------------
        def graph_on_share(n: int) -> dict[str, float]:
            sd = stream_for(n)
            torch.cuda.synchronize()
            saved = st["pos"].clone()
            gg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gg, stream=sd):
                fw._step(st)
            torch.cuda.synchronize()
            st["pos"].copy_(saved)

            def greplay() -> None:
                for _ in range(steps):
                    gg.replay()
                st["pos"].sub_(steps)

            return {"ms_per_step": timed_ms(n, greplay, 2) / steps}

        gs = by_share(sms, graph_on_share)
        emit("graph_on_share", gs)
        # -- a model, not a measurement: a batch of B clips with its decoding on nd multiprocessors
        # and the next batch's encoder on ne others, from the rates each share reached alone
        # (disjoint shares that do not disturb each other assumed), against the whole card in
        # series. Two shares side by side cannot be measured with this API: every green context
        # is carved from the whole device, so two of them overlap. ------------------------------
        T = fw.total - 1
        model: dict[str, Any] = {}
        try:
            series = (T * ds["graph_ms_per_step"] + B * en["by_sms"][str(sm_total)]["ms_per_clip"]) / 1e3
            model["series_s"] = series
            for nd in sms:
                for ne in sms:
                    if nd + ne > sm_total or "ms_per_step" not in gs.get(str(nd), {}) \
                            or "ms_per_clip" not in en["by_sms"].get(str(ne), {}):
                        continue
                    t = max(T * gs[str(nd)]["ms_per_step"], B * en["by_sms"][str(ne)]["ms_per_clip"]) / 1e3
                    model[f"{nd}+{ne}"] = {"batch_s": t, "tokens_per_s": B * (T + 1 - len(fw.prompt)) / t}
            splits = {k: v for k, v in model.items() if "+" in k}
            if splits:
                model["best"] = min(splits, key=lambda k: splits[k]["batch_s"])
        except Exception as e:
            model["error"] = f"{type(e).__name__}: {e}"
        emit("split_model", model)
        # -- where a decode step's time goes (eager step, profiled) ---------------------------------
        emit("decode_step_kernels_us", step_kernel_rows(fw, st, 2, top=25))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fw._encode(xc)
            torch.cuda.synchronize()
        emit("encoder_kernels_us_per_clip", kernel_rows(prof, C, top=25))


if __name__ == "__main__":
    sys.exit(main())
