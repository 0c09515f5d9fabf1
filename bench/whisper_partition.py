"""Whisper large-v3 on one GPU, its multiprocessors shared out (CUDA green contexts): how the
cross-attention kernel, the encoder and a whole decode step (eager, and captured as a graph on the
share's own stream) scale with the number of multiprocessors they get, one share at a time; and,
from those rates, a model of a batch with its decoding on one share and the next batch's encoder
on another, against the same work in series on the whole card. (Two shares side by side are not
measured that way: torch's green contexts are each carved from the whole device, so two of them
overlap.)

``--side-by-side 80,96`` measures what the model only assumed: the device split ONCE by the
driver's SM split into a share of that many multiprocessors for decoding and the disjoint rest for
the encoder (two green contexts, a stream in each), the persistent cross-attention kernel launched
with one block per multiprocessor of its share, the decode step captured as a graph on the decode
share's stream; then a whole batch — every decode step of it beside the next batch's encoder, a
chunk every few steps as ``FastWhisper.generate_many`` launches them — timed against the same
batch in series on the whole card, in the same process. ``--only-side-by-side`` skips the
one-share-at-a-time parts. Each side-by-side and series batch also records the joules the card's
energy counter read over it.

``--energy`` measures what a batch costs the card in energy, then stops: a whole batch's decoding
alone (every decode step, replayed), its encoder alone (every chunk) and both in series, each on the
whole card, ``--energy-rounds`` times (the order reversed every other round), with NVML's energy
counter read around each and the power, SM clock and clock reasons sampled at 10 Hz. From the
joules per generated token and per clip it gives the tok/s the card's enforced power limit allows
for that work: where both parts already run at the limit on their own, no overlap of them can be
faster than series unless the work itself costs fewer joules (a second figure counts the idle
card's power once, as an overlapped schedule pays it).

    python bench/whisper_partition.py [--batch 1024] [--sms 112,96,80,64,48,32] [--out part.json]
    python bench/whisper_partition.py --only-side-by-side --side-by-side 80,88,96 [--out part.json]
    python bench/whisper_partition.py --energy [--energy-rounds 2] [--side-by-side 72] [--out energy.json]

Prints one JSON object per part as it goes; the whole result is written after each part, so a
killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def disjoint_streams(decode_sms: int, device: int = 0) -> tuple[Any, Any, int, int]:
    """Two device streams on disjoint shares of the multiprocessors: the device's SM resource split
    once by the driver (``cuDevSmResourceSplitByCount``) into a group of at least ``decode_sms``
    and the rest, a green context and a stream for each. Returns (decode stream, rest stream, SMs
    of each). The driver's resource struct is read only where the CUDA headers put it (type at
    byte 0, the SM count at byte 96), checked against the card's own count; a mismatch or a driver
    error raises ``RuntimeError`` naming the call."""
    import ctypes

    import torch

    cu = ctypes.CDLL("libcuda.so.1")

    def check(name: str, rc: int) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            cu.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{name}: CUDA driver error {rc} ({(msg.value or b'?').decode()})")

    def sms_of(buf: Any) -> tuple[int, int]:
        return int.from_bytes(buf.raw[0:4], "little"), int.from_bytes(buf.raw[96:100], "little")

    torch.cuda.init()
    dev = ctypes.c_int()
    check("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), int(device)))
    whole, group, rest = (ctypes.create_string_buffer(1024) for _ in range(3))  # ≥ sizeof(CUdevResource)
    check("cuDeviceGetDevResource", cu.cuDeviceGetDevResource(dev, whole, 1))  # 1: SM resource
    kind, total = sms_of(whole)
    card = torch.cuda.get_device_properties(device).multi_processor_count
    if kind != 1 or total != card:
        raise RuntimeError(f"cuDeviceGetDevResource: read type {kind} and {total} SMs, the card has {card}: "
                           "this driver's resource layout is not the one this bench reads")
    groups = ctypes.c_uint(1)
    check("cuDevSmResourceSplitByCount",
          cu.cuDevSmResourceSplitByCount(group, ctypes.byref(groups), whole, rest, 0, int(decode_sms)))
    cu.cuGreenCtxCreate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
    cu.cuGreenCtxStreamCreate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    streams = []
    for buf in (group, rest):
        desc, gctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check("cuDevResourceGenerateDesc", cu.cuDevResourceGenerateDesc(ctypes.byref(desc), buf, 1))
        check("cuGreenCtxCreate", cu.cuGreenCtxCreate(ctypes.byref(gctx), desc, dev, 1))  # 1: default stream
        check("cuGreenCtxStreamCreate", cu.cuGreenCtxStreamCreate(ctypes.byref(stream), gctx, 1, 0))  # non-blocking
        streams.append(torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device)))
    n_dec, n_rest = sms_of(group)[1], sms_of(rest)[1]
    if n_dec < 1 or n_rest < 1 or n_dec + n_rest > card:
        raise RuntimeError(f"cuDevSmResourceSplitByCount: {n_dec} + {n_rest} SMs of {card}: not a split")
    return streams[0], streams[1], n_dec, n_rest


def parse_shares(text: str, label: str) -> list[int]:
    """Multiprocessor counts from "80,96": positive integers, each named once; else ``ValueError``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise ValueError(f"{label}: expected distinct positive multiprocessor counts like 80,96, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:whisper-large-v3")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--encoder-chunk", type=int, default=128)
    ap.add_argument("--sms", default="112,96,80,64,48,32", help="multiprocessor counts to try")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--side-by-side", default=None,
                    help="decode shares (e.g. 80,96): the device split once per share, decoding beside the "
                         "encoder on the disjoint rest, a whole batch timed against series")
    ap.add_argument("--only-side-by-side", action="store_true", help="skip the one-share-at-a-time parts")
    ap.add_argument("--energy", action="store_true",
                    help="joules of a whole batch's decoding alone, its encoder alone and both in series "
                         "(after any --side-by-side), and the tok/s the power limit allows; then stop")
    ap.add_argument("--energy-rounds", type=int, default=2, help="rounds of the three --energy parts")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:  # usage errors before the card is touched
        parse_shares(a.sms, "--sms")
        side_shares = parse_shares(a.side_by_side, "--side-by-side") if a.side_by_side else []
    except ValueError as e:
        ap.error(str(e))
    if a.only_side_by_side and not side_shares:
        ap.error("--only-side-by-side needs --side-by-side")
    if a.energy_rounds < 1:
        ap.error(f"--energy-rounds {a.energy_rounds} must be at least 1")
    if a.batch < 1 or a.encoder_chunk < 1 or a.batch % a.encoder_chunk:
        ap.error(f"--batch {a.batch} must be a positive multiple of --encoder-chunk {a.encoder_chunk}")
    if a.energy:
        from bench.cli import energy_counter

        try:  # before the model is built: a card whose energy counter cannot be read is a usage error
            energy_counter()
        except Exception as e:
            ap.error(f"--energy: the card's energy counter cannot be read ({type(e).__name__}: {e})")
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
    sms = parse_shares(a.sms, "--sms")
    with torch.inference_mode():
        t0 = time.perf_counter()
        st = fw._ready(fw.prefill(feats), feats)
        torch.cuda.synchronize()
        ready_pos = st["pos"].clone()  # where a batch's first decode step starts
        emit("setup", {"s": time.perf_counter() - t0, "decode_step": fw.reason,
                       "attention": {k: v for k, v in (fw.attn_choice.get(B) or {}).items() if k != "rejected"}})
        if side_shares:
            emit("side_by_side", side_by_side(fw, st, ready_pos, feats, side_shares, a.steps, emit))
        if a.energy:
            emit("energy", energy_parts(fw, st, ready_pos, feats, a.energy_rounds, emit))
        if a.only_side_by_side or a.energy:
            return
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


def sampled(fn: Any, settle: Any) -> tuple[Any, dict[str, Any]]:
    """``fn()`` measured on the card (``bench.cli.card_energy``: ``settle`` waits for the device;
    seconds, joules, power, SM clock and clock reasons): (fn's result, the card's figures)."""
    from bench.cli import card_energy

    with card_energy(settle) as card:
        res = fn()
    return res, card


def interleaved(fw: Any, st: dict[str, Any], feats: Any, graph: Any, stream_dec: Any = None,
                stream_enc: Any = None) -> None:
    """Launch one whole batch (the caller sets its first decode step): every replay of ``graph`` on
    ``stream_dec``, and a chunk of the encoder on ``stream_enc`` every few steps, as
    ``generate_many`` launches them (None: the current stream; the same stream is series)."""
    import torch

    B, C = int(st["tokens"].shape[0]), fw.encoder_chunk
    T, chunks = fw.total - 1, B // C
    every = max(1, T // chunks)
    done = 0
    for i in range(T):
        if i % every == 0 and done < chunks:
            with torch.cuda.stream(stream_enc):
                fw._encode(feats[done * C:(done + 1) * C])
            done += 1
        with torch.cuda.stream(stream_dec):
            graph.replay()
    while done < chunks:
        with torch.cuda.stream(stream_enc):
            fw._encode(feats[done * C:(done + 1) * C])
        done += 1


def energy_parts(fw: Any, st: dict[str, Any], ready_pos: Any, feats: Any, rounds: int, emit: Any) -> dict[str, Any]:
    """A whole batch's decoding alone, its encoder alone and both in series (a chunk every few
    steps, as ``generate_many`` launches them, on one stream), each on the whole card, timed by the
    host around a device synchronization and measured by the energy counter; ``rounds`` rounds,
    every other one in reverse order. Then the power bound: the batch's joules (decoding's plus
    the encoder's, medians of the rounds) at the card's enforced power limit. That bound holds for
    any schedule of the two parts only where each runs at the limit on its own (each part's joules
    then include the idle card's power for its own time, which a schedule that overlaps them pays
    once); ``power_bound_batch_s_idle_once`` counts the idle card's power once, for the batch's
    time: (parts' joules − idle watts × parts' seconds) / (limit − idle watts)."""
    import torch

    B, C = int(st["tokens"].shape[0]), fw.encoder_chunk
    T, chunks = fw.total - 1, B // C
    new_tokens = B * (T + 1 - len(fw.prompt))
    graph = st["graph"]

    def decoding() -> None:
        st["pos"].copy_(ready_pos)
        for _ in range(T):
            graph.replay()

    def encoder() -> None:
        for i in range(chunks):
            fw._encode(feats[i * C:(i + 1) * C])

    def series() -> None:
        st["pos"].copy_(ready_pos)
        interleaved(fw, st, feats, graph)

    parts = {"decoding": decoding, "encoder": encoder, "series": series}
    out: dict[str, Any] = {"batch": B, "decode_steps": T, "encoder_chunks": chunks, "chunk": C,
                           "new_tokens_per_batch": new_tokens, "rounds": [],
                           "idle": sampled(lambda: time.sleep(2.0), torch.cuda.synchronize)[1]}
    for r in range(rounds):
        names = list(parts) if r % 2 == 0 else list(reversed(parts))
        row: dict[str, Any] = {}
        for name in names:
            _, card = sampled(parts[name], torch.cuda.synchronize)
            row[name] = card
        out["rounds"].append(row)
        emit("energy", out)
    med = {n: {k: statistics.median([rw[n][k] for rw in out["rounds"]])
               for k in ("s", "joules", "mean_power_w")} for n in parts}
    limit = out["rounds"][0]["series"]["power_limit_w"]
    e_dec, e_enc = med["decoding"]["joules"], med["encoder"]["joules"]
    power_s = (e_dec + e_enc) / limit
    if e_dec + e_enc <= 0:  # a counter that did not advance: no bound, the rounds are kept
        out["summary"] = {"median_of_rounds": med, "error": "the energy counter did not advance"}
        return out
    idle_w = out["idle"].get("mean_power_w") or 0.0
    idle_once_s = (e_dec + e_enc - idle_w * (med["decoding"]["s"] + med["encoder"]["s"])) / (limit - idle_w)
    out["summary"] = {
        "median_of_rounds": med,
        "joules_per_token_decoding": e_dec / new_tokens,
        "joules_per_clip_encoder": e_enc / B,
        "joules_per_token": (e_dec + e_enc) / new_tokens,
        "series_joules_vs_parts": med["series"]["joules"] / (e_dec + e_enc),
        "power_limit_w": limit,
        "power_bound_batch_s": power_s,
        "power_bound_tokens_per_s": new_tokens / power_s,
        "idle_w": idle_w,
        "power_bound_batch_s_idle_once": idle_once_s,
        "power_bound_tokens_per_s_idle_once": new_tokens / idle_once_s,
        "series_tokens_per_s": new_tokens / med["series"]["s"],
        "parts_in_series_tokens_per_s": new_tokens / (med["decoding"]["s"] + med["encoder"]["s"]),
        "joules_per_token_for_13000_at_limit": limit / 13000.0,
    }
    return out


def side_by_side(fw: Any, st: dict[str, Any], ready_pos: Any, feats: Any, shares: list[int], steps: int,
                 emit: Any) -> dict[str, Any]:
    """A batch's decoding on a share beside the next batch's encoder on the disjoint rest, against
    the same batch in series on the whole card, each a whole batch (every decode step from the
    batch's start, every encoder chunk), timed by the host around a device synchronization."""
    import torch

    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc

    B, C = int(st["tokens"].shape[0]), fw.encoder_chunk
    T, chunks = fw.total - 1, B // C
    every = max(1, T // chunks)  # an encoder chunk every few decode steps, as generate_many does
    kern = st["xattn"]
    new_tokens = B * (T + 1 - len(fw.prompt))

    def batch(stream_dec: Any, stream_enc: Any, graph: Any) -> dict[str, Any]:
        """One batch, the card sampled through NVML at 10 Hz meanwhile (power, SM clock, throttle
        reasons: what the two shares contend for)."""
        out, card = sampled(lambda: one_batch(stream_dec, stream_enc, graph), lambda: settle(stream_dec, stream_enc))
        out.update(card)
        return out

    def one_batch(stream_dec: Any, stream_enc: Any, graph: Any) -> dict[str, float]:
        """One batch: T replays of ``graph`` on ``stream_dec``, a chunk of the encoder on
        ``stream_enc`` every ``every`` steps (the same stream for series)."""
        st["pos"].copy_(ready_pos)
        settle(stream_dec, stream_enc)
        t0 = time.perf_counter()
        interleaved(fw, st, feats, graph, stream_dec, stream_enc)
        settle(stream_dec, stream_enc)
        s = time.perf_counter() - t0
        return {"batch_s": s, "tokens_per_s": new_tokens / s}

    def settle(*streams: Any) -> None:
        """Wait for each stream itself (a green context's stream is not the primary context's) and
        for the device."""
        for s in streams:
            s.synchronize()
        torch.cuda.synchronize()

    def alone(stream: Any, fn: Any, reps: int) -> float:
        with torch.cuda.stream(stream):
            fn()
        settle(stream)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(reps):
                fn()
        settle(stream)
        return (time.perf_counter() - t0) / reps

    def replay_steps(graph: Any) -> Any:
        def run() -> None:
            st["pos"].copy_(ready_pos)
            for _ in range(steps):
                graph.replay()
        return run

    whole = torch.cuda.current_stream()
    out: dict[str, Any] = {"batch": B, "decode_steps": T, "encoder_chunks": chunks, "chunk": C,
                           "chunk_every_steps": every, "new_tokens_per_batch": new_tokens,
                           "cross_attention": kern.label() if hasattr(kern, "label") else type(kern).__name__}
    series = batch(whole, whole, st["graph"])
    series.update({"decode_ms_per_step": alone(whole, replay_steps(st["graph"]), 2) * 1e3 / steps,
                   "encoder_ms_per_clip": alone(whole, lambda: fw._encode(feats[:C]), 1) * 1e3 / C})
    out["series_whole_card"] = series
    emit("side_by_side", out)
    for n in shares:
        row: dict[str, Any] = {"asked_decode_sms": n}
        out[f"decode_{n}"] = row
        try:
            sd, se, nd, ne = disjoint_streams(n)
            row.update({"decode_sms": nd, "encoder_sms": ne})
            # the persistent kernel launches one block per multiprocessor of the whole card; on a
            # share it gets one per multiprocessor of the share (a second wave would idle the rest)
            if isinstance(kern, hc.CudaHiddenAttention) and kern.persist:
                st["xattn"] = kern.with_blocks(nd)
                row["cross_attention_blocks"] = st["xattn"].grid
            torch.cuda.synchronize()
            st["pos"].copy_(ready_pos)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=sd):
                fw._step(st)
            settle(sd)
            row["decode_alone_ms_per_step"] = alone(sd, replay_steps(g), 2) * 1e3 / steps
            # control: the same step (the kernel with the share's blocks) captured on the whole
            # card's side; slower on the share means the share's graph keeps to its multiprocessors
            gw = torch.cuda.CUDAGraph()
            st["pos"].copy_(ready_pos)
            with torch.cuda.graph(gw):
                fw._step(st)
            settle(whole)
            row["control_same_step_whole_card_ms_per_step"] = alone(whole, replay_steps(gw), 2) * 1e3 / steps
            del gw
            row["encoder_alone_ms_per_clip"] = alone(se, lambda: fw._encode(feats[:C]), 1) * 1e3 / C
            row["model_batch_s"] = max(T * row["decode_alone_ms_per_step"], B * row["encoder_alone_ms_per_clip"]) / 1e3
            row.update(batch(sd, se, g))
            row["vs_series"] = series["batch_s"] / row["batch_s"]
            del g
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            st["xattn"] = kern
            st["pos"].copy_(ready_pos)
            torch.cuda.synchronize()
        emit("side_by_side", out)
    return out


if __name__ == "__main__":
    sys.exit(main())
