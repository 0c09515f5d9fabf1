"""``python -m bench.cli`` (or ``mi300x-cert bench`` in a checkout): stock, usual compile recipe and optimized path side by side, on this card.

    python -m bench.cli [--workload sd|whisper|telemetry|gemm|all] [--batch 1,32] [--whisper-batch 64,128]
                      [--steps 50] [--repeats 3] [--out FILE.json] [--write-docs docs/performance.md]
                      [--from-json FILE.json ...]

Every number is measured in the same process on the same card: medians over ``--repeats`` timed
batches after one warm-up batch (warm-up, compilation and graph capture reported separately),
synchronized before the clock is read. TFLOP/s use a FLOP count made with
``torch.utils.flop_counter`` on the same modules; the card's ceilings — an 8192³ bf16 GEMM and a
4 GiB device-to-device copy — are measured in the same run, and every figure is also rendered as a
fraction of them. With ``--energy`` the timed batches of each SD row and each Whisper row (not the
``+overlap`` stream rows, nor the recipe row, which runs in a child process) are also measured by
the card's energy counter (NVML), with power, SM clock and clock reasons sampled at 10 Hz: joules
per image or per token over all the row's batches (their mean time beside them) and the card's
enforced power limit, the third ceiling. The JSON is written after
each measurement, so a killed run keeps what it finished. ``--write-docs`` renders the Markdown table from one or more JSON files.

Variants:
  SD       stock     = diffusers StableDiffusionPipeline, eager (the stock workload)
           recipe    = stock + channels-last + fuse_qkv_projections + torch.compile(UNet, fullgraph)
                       (mode "default"; "reduce-overhead" = CUDA graphs at batch 1)
           optimized = the workload's optimized path (mi300x_cert.workloads.optimized);
                       --sd-unet adds forced UNet forms (optimized-<form>-unet)
  Whisper  stock     = WhisperForConditionalGeneration.generate, eager, sdpa, greedy
           recipe    = stock generate with a static cache and forward compiled (reduce-overhead)
           optimized = FastWhisper (compiled encoder, hidden-form cross-attention, static cache,
                       graph-captured decode step); --whisper-cross adds forced forms,
                       --whisper-encoder forced encoder forms (optimized-<form>-encoder);
                       optimized+overlap = a stream of --whisper-overlap batches, the next batch's
                       encoder on a second stream during decoding (generate_many)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from mi300x_cert.workloads.optimized.unet_fast import UNET_FORMS  # no torch import
from mi300x_cert.workloads.optimized.whisper_fast import CROSS_FORMS, ENCODER_FORMS  # no torch import

__all__ = ["main", "render_markdown", "SD_UNET_PAIR_TFLOP", "SD_VAE_TFLOP"]

# FlopCounterMode on the SD v1-4 architecture at 512² (used when the count cannot be made in-run).
SD_UNET_PAIR_TFLOP = 1.607
SD_VAE_TFLOP = 2.515


# ----------------------------------------------------------------------------------------------
def _log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


class Results:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"conditions": {}, "gemm": None, "copy": None, "sd": [], "whisper": [], "telemetry": None,
                                     "notes": []}

    def save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            os.replace(tmp, self.path)

    def add(self, section: str, row: dict[str, Any], quiet: tuple[str, ...] = ("latencies_s",)) -> None:
        """Append a measured row, save at once (nothing lost on a crash) and log it without the
        bulky ``quiet`` keys."""
        self.data[section].append(row)
        self.save()
        _log(json.dumps({k: v for k, v in row.items() if k not in quiet}))


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for mod in ("diffusers", "transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["card"] = p.name
        env["card_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["multiprocessors"] = p.multi_processor_count
    try:
        import pynvml

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        env["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
        pynvml.nvmlShutdown()
    except Exception as e:
        env["driver"] = f"unknown ({type(e).__name__})"
    return env


def run_record(argv: list[str] | None = None) -> dict[str, Any]:
    """A bench run's conditions: :func:`environment`, the start time and the command line."""
    return environment() | {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "argv": list(sys.argv[1:] if argv is None else argv)}


def measure_gemm(n: int = 8192, reps: int = 20) -> dict[str, Any]:
    """bf16 n³ matrix product on random data: TFLOP/s (median of ``reps`` event-timed products)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(ts)
    return {"n": n, "dtype": "bfloat16", "median_s": t, "tflops": 2 * n**3 / t / 1e12}


def measure_copy(gib: float = 4.0, reps: int = 20) -> dict[str, Any]:
    """Device-to-device copy of ``gib`` GiB: TB/s counting bytes read plus bytes written (median of
    ``reps`` event-timed copies): the card's memory-bandwidth ceiling for this run."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    t = statistics.median(ts)
    del src, dst
    torch.cuda.empty_cache()
    return {"gib": gib, "median_s": t, "tb_per_s": 2 * n * 2 / t / 1e12}


def release_gpu_memory(torch: Any) -> float:
    """Before each variant: free what the last one held, then start the peak counter again.
    Compiled modules and captured graphs sit in reference cycles, so their memory pools go back
    only once the cycles are collected: collect first, then empty the allocator's cache. Called
    before every variant, the first included (the run's copy ceiling has just held 8 GiB). Returns
    the GiB still allocated (what the variant's peak stands on; recorded as ``held_gib``)."""
    import gc as _gc

    _gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def whisper_bound(row: dict[str, Any], gemm: dict[str, Any] | None, copy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The tokens/s this run's measured ceilings allow a Whisper row: per generated token, the
    cross-attention bytes over the copy rate and the encoder's FLOPs (per clip ÷ new tokens) over
    the GEMM rate; summed when the encoder runs in series, the larger of the two when it overlaps
    decoding. None without the ceilings or the row's counts."""
    b, f = row.get("xattn_bytes_per_token"), row.get("encoder_tflop_per_clip")
    if not (gemm and copy and b and f and row.get("new_tokens")):
        return None
    if row.get("cross_form") == "kv":  # every layer's K and V instead of the encoder output once
        b = 2 * b
    t_x = b / (copy["tb_per_s"] * 1e12)
    t_e = f / row["new_tokens"] / gemm["tflops"]
    t = max(t_x, t_e) if row.get("overlap") else t_x + t_e
    return {"tokens_per_s": 1 / t, "fraction": row["tokens_per_s"] * t, "xattn_us_per_token": t_x * 1e6,
            "encoder_us_per_token": t_e * 1e6, "overlapped": bool(row.get("overlap"))}


# ----------------------------------------------------------------------------------------------
SD_VARIANTS = ("stock", "recipe", "optimized")


def split_variant(raw: str, names: Any) -> tuple[str, str, dict[str, Any]]:
    """One ``--variants`` item ``name+key=value+…`` (spaces around parts ignored): its name (one of
    ``names``), its label as written without the spaces, and its own Inductor settings (checked
    like ``--sd-inductor``). An unknown name, an empty setting or a bad one raises ``ValueError``
    naming the item. Serves ``sd_variants`` here and ``bench/sd_profile.py``'s variants."""
    from mi300x_cert.workloads.optimized.common import parse_inductor_settings

    name, *extra = (part.strip() for part in raw.split("+"))
    item = "+".join((name, *extra))
    if name not in names:
        raise ValueError(f"--variants: unknown variant {name!r} in {item!r} (one of {', '.join(names)})")
    if any(not part for part in extra):
        raise ValueError(f"--variants: an empty setting in {item!r} (expected {name}+key=value+…)")
    return name, item, parse_inductor_settings(",".join(extra), source=f"--variants {item!r}")


def sd_variants(spec: str, base: dict[str, Any] | None = None) -> list[tuple[str, str, dict[str, Any] | None]]:
    """The SD rows ``--variants`` asks for: (label, path, Inductor settings) per item. An item is
    ``stock``, ``recipe`` or ``optimized``; ``optimized+key=value+…`` is the optimized path with
    Inductor settings over ``base`` (``--sd-inductor``), so settings are measured beside the
    default in one run. An unknown name, a setting on another path, a bad setting or a repeated
    item raises ``ValueError`` naming it."""
    out: list[tuple[str, str, dict[str, Any] | None]] = []
    seen: dict[tuple[str, str], str] = {}
    for raw in spec.split(","):
        if not raw.strip():
            continue
        name, item, own = split_variant(raw, SD_VARIANTS)
        if own and name != "optimized":
            raise ValueError(f"--variants: Inductor settings ({item!r}) apply to the optimized path only")
        settings = {**(base or {}), **own} if name == "optimized" else None
        key = (name, json.dumps(settings or {}, sort_keys=True))
        if key in seen:  # the same configuration twice, by name or by settings in another order
            raise ValueError(f"--variants: {item!r} measures the same as {seen[key]!r}")
        seen[key] = item
        out.append((item, "optimized" if name == "optimized" else "stock", settings or None))
    if not out:
        raise ValueError(f"--variants: no variant in {spec!r}")
    return out


def _sd_params(args: argparse.Namespace, path: str, inductor: dict[str, Any] | None = None,
               unet_form: str = "auto") -> dict[str, Any]:
    return {"optimized_unet": unet_form, "model": args.sd_model, "height": 512, "width": 512, "steps": args.steps, "guidance": 7.5,
            "scheduler": "pndm", "dtype": args.dtype, "seed": 0, "device": "cuda", "path": path,
            "prompts": "include/prompts/prompts.txt" if Path("include/prompts/prompts.txt").exists() else None,
            "optimized_inductor": inductor if inductor is not None else getattr(args, "sd_inductor", None)}


def sd_flops(wl: Any) -> dict[str, float]:
    """TFLOP of one CFG-pair UNet evaluation and one VAE decode at batch 1 (FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = wl.height // wl.vae_scale_factor, wl.width // wl.vae_scale_factor
    lat = torch.randn(2, wl.latent_channels, h, w, device=wl.device, dtype=wl.dtype)
    emb = torch.randn(2, 77, wl.unet.config.cross_attention_dim, device=wl.device, dtype=wl.dtype)
    t = torch.tensor(500, device=wl.device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            wl.unet(lat, t, encoder_hidden_states=emb, return_dict=False)
        unet = fc.get_total_flops() / 1e12
        with FlopCounterMode(display=False) as fc:
            wl.vae.decode(lat[:1] / wl.scaling_factor, return_dict=False)
        vae = fc.get_total_flops() / 1e12
    return {"unet_pair_tflop": unet, "vae_decode_tflop": vae}


def _apply_recipe(wl: Any, batch: int) -> str:
    import torch

    hook = getattr(wl, "_hook", None)
    if hook is not None:
        hook.remove()
        wl._hook = None
    wl.unet.to(memory_format=torch.channels_last)
    wl.vae.to(memory_format=torch.channels_last)
    wl.pipe.fuse_qkv_projections()
    mode = "reduce-overhead" if batch == 1 else "default"
    wl.pipe.unet = torch.compile(wl.unet, mode=mode, fullgraph=True)
    wl.compile_mode = f"torch.compile({mode}, fullgraph=True)"
    return mode


def bench_sd(args: argparse.Namespace, res: Results, deadline: float) -> None:
    import torch

    from mi300x_cert.workloads.sd import SDWorkload

    batches = [int(x) for x in args.batch.split(",")]
    flops: dict[str, float] | None = None
    unet_forms = [f.strip() for f in getattr(args, "sd_unet", "auto").split(",") if f.strip()] or ["auto"]
    rows = [(variant if form == "auto" else f"{variant}-{form}-unet", path, inductor, form)
            for variant, path, inductor in sd_variants(args.variants, getattr(args, "sd_inductor", None))
            for form in (unet_forms if path == "optimized" else ["auto"])]
    for variant, path, inductor, unet_form in rows:
        for b in batches:
            if time.time() > deadline:
                res.data["notes"].append(f"sd {variant} b{b}: skipped (time limit)")
                res.save()
                continue
            _log(f"[sd] {variant} batch {b}")
            held = release_gpu_memory(torch)  # the peak counter starts here, for the first variant too
            t0 = time.perf_counter()
            wl = SDWorkload(_sd_params(args, path, inductor, unet_form))
            load_s = time.perf_counter() - t0
            if flops is None:
                try:
                    flops = sd_flops(wl)
                except Exception as e:  # pragma: no cover - count from constants instead
                    flops = {"unet_pair_tflop": SD_UNET_PAIR_TFLOP, "vae_decode_tflop": SD_VAE_TFLOP,
                             "note": f"constants ({type(e).__name__})"}
                res.data["sd_flops"] = flops
            rec_mode = _apply_recipe(wl, b) if variant == "recipe" else None
            row: dict[str, Any] = {"variant": variant, "batch": b, "load_s": load_s, "steps": args.steps,
                                   "dtype": wl.dtype_name, "compile": wl.compile_mode, "held_gib": held}
            try:
                row["warmup_s"] = wl.warmup(b)
                lats = []
                with _row_energy(args, torch) as card:
                    for i in range(args.repeats):
                        r = wl.run_batch(b, i)
                        lats.append(r["latency_s"])
                        row["unet_evals"] = r.get("unet_evals")
                if card:
                    row["energy"] = energy_row(card, b * args.repeats, "image", statistics.mean(lats))
                _sd_extras(row, wl, b, args, path, deadline)
                med = statistics.median(lats)
                evals = row.get("unet_evals") or 51
                tflop_img = flops["unet_pair_tflop"] * evals + flops["vae_decode_tflop"]
                row.update({"latencies_s": lats, "batch_latency_s": med, "per_image_s": med / b,
                            "tflop_per_image": tflop_img, "tflops": tflop_img * b / med,
                            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
                if path == "optimized":
                    row["optimized"] = wl.conditions().get("optimized")
                    row["inductor"] = inductor or {}
                if rec_mode:
                    row["recipe_mode"] = rec_mode
                # equality: same seeded inputs through this variant vs stock, compared once per batch
                if args.check and b == batches[0]:
                    row["latents"] = _sd_latent_digest(wl, b)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                _log(f"[sd] {variant} b{b} failed: {row['error']}")
            wl.close()
            del wl
            torch._dynamo.reset()  # its memory goes back at the next variant's release_gpu_memory
            res.add("sd", row, quiet=("latencies_s", "optimized", "latents"))
    _sd_equality(res)


def _sd_extras(row: dict[str, Any], wl: Any, b: int, args: argparse.Namespace, path: str, deadline: float) -> None:
    """The row's phases and (``--sd-profile``, optimized rows) its profile, each in its own try: a
    failure there is recorded beside the row's timed figures (``phases_error``, ``profile_error``),
    and past the run's time limit they are left out (``phases_skipped``)."""
    if time.time() > deadline:
        row["phases_skipped"] = "time limit"
        return
    try:
        row["phases_s"] = sd_phases(wl, b, args.repeats)
    except Exception as e:
        row["phases_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if getattr(args, "sd_profile", False) and path == "optimized":
        try:
            row["profile"] = sd_batch_profile(wl, b)
        except Exception as e:
            row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def sd_phases(wl: Any, b: int, repeats: int) -> dict[str, float]:
    """Where a batch's time goes: the medians over ``repeats`` more batches (after the timed ones,
    outside the energy window) of the text encoder, the denoising loop and the VAE decode, each
    synchronised (``SDWorkload.time_phases``), in seconds per batch."""
    runs = [wl.time_phases(b, i) for i in range(max(1, repeats))]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def sd_batch_profile(wl: Any, b: int) -> dict[str, Any]:
    """One more batch (text encoder, loop, VAE, as timed) under the profiler: device ms per batch by
    kernel class (``bench/sd_profile.py``'s classes; ``other`` holds the scheduler's, the
    guidance's and the batch's own element-wise kernels, copies and memsets) and its largest
    kernels."""
    from bench.sd_profile import profile_buckets

    inputs = wl.prepare(b, 0)
    return profile_buckets(lambda: wl.compute(inputs), reps=1)


def _sd_latent_digest(wl: Any, b: int) -> dict[str, Any]:
    """Final latents of batch index 0 (seeded) as a small float list for cross-variant comparison."""
    import torch

    ids = wl.tokenize(wl.select_prompts(b, 0))
    cond, uncond = wl.encode_prompts(ids)
    lat0 = wl.initial_latents(b, 0)
    lat = wl.denoise(cond, uncond, lat0)
    img = wl.decode(lat)
    torch.cuda.synchronize()
    flat = lat.float().flatten().cpu()
    return {"latents": flat[:4096].tolist(), "norm": float(flat.norm()),
            "image_sample": img.float().flatten()[:4096].cpu().tolist()}


def _sd_equality(res: Results) -> None:
    import torch

    rows = [r for r in res.data["sd"] if "latents" in r]
    ref = next((r for r in rows if r["variant"] == "stock"), None)
    if ref is None:
        return
    a = torch.tensor(ref["latents"]["latents"])
    ai = torch.tensor(ref["latents"]["image_sample"])
    for r in rows:
        if r is ref:
            continue
        b = torch.tensor(r["latents"]["latents"])
        bi = torch.tensor(r["latents"]["image_sample"])
        r["vs_stock"] = {"latent_rel_err": float((a - b).norm() / a.norm()),
                         "image_rel_err": float((ai - bi).norm() / ai.norm()),
                         "image_max_abs": float((ai - bi).abs().max())}
    res.save()


# ----------------------------------------------------------------------------------------------
def _whisper_model(name: str, dtype: Any) -> Any:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from mi300x_cert.config import resolve_model_source

    _, d = resolve_model_source(name)
    torch.manual_seed(0)
    cfg = WhisperConfig.from_pretrained(d)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        m = WhisperForConditionalGeneration(cfg)
    m = m.to(dtype).eval()
    m.generation_config = GenerationConfig.from_pretrained(d)
    return m


def _whisper_logit_gap(m: Any, fast: Any, x: Any, full: Any) -> dict[str, Any]:
    """Where the optimized path chose a token, how far below stock's best that token is in STOCK's
    own logits given the same prefix (teacher-forced stock forward over the optimized tokens, the
    same generation masks applied): 0 where the tokens agree; a small gap means a near-tie
    resolved differently in fp16, a large one would mean a different function."""
    import torch

    P = len(fast.prompt)
    with torch.inference_mode():
        lg = m(input_features=x, decoder_input_ids=full[:, :-1]).logits[:, P - 1:].float()  # predicts P..T-1
        masks = fast.masks.float()
        lg[:, 0] += masks[0]
        lg[:, 1:] += masks[1]
        if fast.suppress_eos:
            lg[:, : fast.min_new, fast.eos] = float("-inf")
        chosen = full[:, P:]
        best = lg.max(dim=-1).values
        got = lg.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        gap = (best - got)
        finite = torch.isfinite(lg)
        scale = float(lg[finite].std()) if bool(finite.any()) else float("nan")
    return {"max_stock_logit_gap": float(gap.max()), "mean_stock_logit_gap": float(gap.mean()),
            "positions_off_stock_argmax": float((gap > 0).float().mean()), "stock_logit_std": scale}


def _token_agreement(ref: Any, got: Any) -> dict[str, float]:
    """Share of generated tokens, and of whole clips, equal to the stock path's."""
    return {"token_agreement": float((ref == got).float().mean()),
            "clips_identical": float((ref == got).all(dim=1).float().mean())}


def _whisper_recipe_in_child(args: argparse.Namespace, b: int, ref: Any, deadline: float) -> dict[str, Any]:
    """The Whisper compile recipe at batch ``b`` in a child process (same inputs: features seeded
    by the batch size); its row, compared with the parent's stock tokens, or an error row naming
    how the child ended."""
    import signal
    import subprocess
    import tempfile

    import torch

    row: dict[str, Any] = {"variant": "recipe", "batch": b, "new_tokens": args.new_tokens, "dtype": args.dtype,
                           "model": args.whisper_model}
    with tempfile.TemporaryDirectory(prefix="mi300x-cert-bench-") as td:
        out = Path(td) / "recipe.json"
        argv = [sys.executable, "-m", "bench.cli", "--workload", "whisper", "--whisper-recipe-child",
                "--variants", "recipe", "--whisper-batch", str(b), "--whisper-stock-batch", str(b),
                "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
                "--whisper-model", args.whisper_model, "--whisper-cross", "", "--out", str(out)]
        left = deadline - time.time() if deadline != float("inf") else 3600.0
        try:
            checkout = str(Path(__file__).resolve().parent.parent)  # `-m bench.cli` resolves from the checkout
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (checkout, os.environ.get("PYTHONPATH")) if x)}
            r = subprocess.run(argv, capture_output=True, text=True, timeout=max(60.0, left), env=env)
        except subprocess.TimeoutExpired:
            row["error"] = f"recipe child process did not finish within {max(60.0, left):.0f} s"
            return row
        got = json.loads(out.read_text()).get("whisper", []) if out.is_file() else []
        if got and "tokens_per_s" in got[0]:
            row = got[0]
            tok = Path(str(out) + ".tokens.pt")
            if ref is not None and tok.is_file():
                row["vs_stock"] = _token_agreement(ref, torch.load(tok))
            return row
        if r.returncode < 0:
            how = f"killed by signal {signal.Signals(-r.returncode).name}"
        else:
            how = f"exit status {r.returncode}"
        err = (got[0].get("error") if got else None) or " | ".join(
            ln for ln in r.stderr.strip().splitlines()[-3:] if ln.strip())[-300:]
        row["error"] = f"recipe child process ended ({how}) without a measurement: {err}"
        return row


def _whisper_counts(m: Any, nmel: int) -> dict[str, Any]:
    """What one generated token costs the optimized path at least: the encoder output read by every
    decoder layer's cross-attention (hidden form: L × S × E elements) and the encoder's FLOPs per
    30 s clip (FlopCounterMode on one clip)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    p = next(m.parameters())
    x = torch.randn(1, nmel, 3000, device=p.device, dtype=p.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        S = int(m.model.encoder(x).last_hidden_state.shape[1])
    L, E = int(m.config.decoder_layers), int(m.config.d_model)
    return {"encoder_tflop_per_clip": fc.get_total_flops() / 1e12,
            "xattn_bytes_per_token": L * S * E * p.element_size()}


def _whisper_overlap_row(args: argparse.Namespace, fast: Any, variant: str, b: int, feats: list[Any],
                         tokens: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """``--whisper-overlap`` batches of size ``b`` through ``generate_many`` (the next batch's encoder
    on a second stream during decoding): tokens/s over the whole stream (the first batch's encoder
    in series included), the steady per-batch time between batch completions (device events), and
    the tokens against the same path in series and against stock."""
    import torch

    n, N = int(args.whisper_overlap), args.new_tokens
    row: dict[str, Any] = {"variant": f"{variant}+overlap", "batch": b, "new_tokens": N, "dtype": args.dtype,
                           "model": args.whisper_model, "batches": n, "cross_form": fast.cross, **counts,
                           "held_gib": release_gpu_memory(torch)}  # its own peak, not the row's before
    try:
        xs = [feats[i % 2] for i in range(n)]
        fast.generate_many(xs[:2])  # warm: the side stream's first use
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = fast.generate_many(xs)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ev = fast.batch_events
        # time between batch completions; batch i (0 < i < n-1) decoded while the encoder of batch
        # i+1 ran beside it: those are the steady state (the last batch has no encoder beside it)
        steps = [ev[i - 1].elapsed_time(ev[i]) / 1e3 for i in range(1, len(ev)) if ev[i] is not None]
        steady = steps[:-1]
        row.update({"overlap": bool(fast.notes.get("batches", {}).get("overlap")), "overlap_note": fast.notes.get("batches"),
                    "stream_s": dt, "batch_latency_s": dt / n, "tokens": n * b * N, "tokens_per_s": n * b * N / dt,
                    "between_batches_s": steps,
                    "steady_batch_s": statistics.median(steady) if steady else None,
                    "steady_tokens_per_s": b * N / statistics.median(steady) if steady else None,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
        got = outs[0][:, -N:].cpu()
        serial = tokens.get(f"{variant}-{b}")
        if serial is not None:
            row["vs_serial"] = _token_agreement(serial, got)
        ref = tokens.get(f"stock-{b}")
        if ref is not None:
            row["vs_stock"] = _token_agreement(ref, got)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        _log(f"[whisper] {variant}+overlap b{b} failed: {row['error']}")
    torch.cuda.empty_cache()
    return row


def bench_whisper(args: argparse.Namespace, res: Results, deadline: float) -> None:
    import torch

    from mi300x_cert.workloads.optimized.common import setup_compile_cache
    from mi300x_cert.workloads.optimized.whisper_fast import FastWhisper, whisper_prompt_ids

    setup_compile_cache()
    dtype = getattr(torch, args.dtype)
    m = _whisper_model(args.whisper_model, dtype)
    gc = m.generation_config
    N = args.new_tokens
    nmel = m.config.num_mel_bins
    # one optimized variant per cross-attention form asked for: "optimized" is the default form
    # (hidden where the triton kernel runs), "optimized-kv" / "optimized-hidden" force one
    # and per encoder form asked for ("optimized-<form>-encoder" forces one)
    crosses = [c.strip() for c in args.whisper_cross.split(",") if c.strip()]
    encoders = [e.strip() for e in args.whisper_encoder.split(",") if e.strip()] or ["auto"]
    fasts: dict[str, Any] = {}
    for c in crosses:
        for e in encoders:
            name = ("optimized" if c == "auto" else f"optimized-{c}") + ("" if e == "auto" else f"-{e.replace('+', '-')}-encoder")
            fasts[name] = FastWhisper(m, prompt_ids=whisper_prompt_ids(gc), new_tokens=N,
                                      suppress_tokens=getattr(gc, "suppress_tokens", None),
                                      begin_suppress_tokens=getattr(gc, "begin_suppress_tokens", None),
                                      eos_token_id=gc.eos_token_id, device="cuda", cross=c, encoder=e)
    counts = _whisper_counts(m, nmel)
    stock_batches = [int(x) for x in args.whisper_stock_batch.split(",")]
    batches = sorted(set(stock_batches) | {int(x) for x in args.whisper_batch.split(",")})
    child = bool(getattr(args, "whisper_recipe_child", False))
    tokens: dict[str, Any] = {}  # "<variant>-<batch>" -> first repeat's tokens (CPU), for agreement with stock
    for b in batches:
        gen = torch.Generator(device="cpu").manual_seed(b)  # the same inputs in a child process
        feats = [torch.randn(b, nmel, 3000, generator=gen).to("cuda", dtype) for _ in range(2)]
        recipe = ["recipe"] if "recipe" in (v.strip() for v in args.variants.split(",")) else []
        for variant in (("recipe",) if child else ("stock", *fasts, *recipe)):
            if variant in ("stock", "recipe") and b not in stock_batches:
                continue
            if variant == "recipe" and not child:
                # torch.compile of the whole model under generate can take the process down (a
                # segmentation fault was measured on an H100): it runs in a child process
                res.add("whisper", _whisper_recipe_in_child(args, b, tokens.get(f"stock-{b}"), deadline))
                continue
            fast = fasts.get(variant)
            if time.time() > deadline:
                res.data["notes"].append(f"whisper {variant} b{b}: skipped (time limit)")
                continue
            _log(f"[whisper] {variant} batch {b}")
            # the peak counter starts here, for the first variant too; held: the model, the batch's
            # inputs and the optimized variants' graphs and caches of this batch size
            row: dict[str, Any] = {"variant": variant, "batch": b, "new_tokens": N, "dtype": args.dtype,
                                   "model": args.whisper_model, "held_gib": release_gpu_memory(torch)}

            def run(x: Any) -> Any:
                if variant in ("stock", "recipe"):
                    kw = {"cache_implementation": "static"} if variant == "recipe" else {}
                    with torch.inference_mode():
                        return m.generate(x, max_new_tokens=N, min_new_tokens=N, language="en", task="transcribe",
                                          **kw)[:, -N:]
                return fast.generate(x)[:, -N:]

            stock_forward = m.forward
            if variant == "recipe":
                # the usual recipe for Whisper: a static KV cache and the model's forward compiled
                # with CUDA graphs (reduce-overhead), through stock generate
                m.forward = torch.compile(stock_forward, mode="reduce-overhead", fullgraph=True)
                row["recipe_mode"] = "static cache + torch.compile(forward, reduce-overhead, fullgraph)"

            try:
                t0 = time.perf_counter()
                run(feats[0])
                torch.cuda.synchronize()
                row["warmup_s"] = time.perf_counter() - t0
                lats, outs = [], []
                with _row_energy(args, torch) as card:
                    for i in range(args.repeats):
                        x = feats[i % 2]
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        out = run(x)
                        torch.cuda.synchronize()
                        lats.append(time.perf_counter() - t0)
                        outs.append(out)
                if card:
                    row["energy"] = energy_row(card, b * N * args.repeats, "token", statistics.mean(lats))
                med = statistics.median(lats)
                row.update({"latencies_s": lats, "batch_latency_s": med, "tokens": b * N,
                            "tokens_per_s": b * N / med, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                            "tokens_shape": list(outs[0].shape)})
                tokens[f"{variant}-{b}"] = outs[0][:, -N:].cpu()
                if child and res.path is not None:
                    torch.save(outs[0][:, -N:].cpu(), str(res.path) + ".tokens.pt")
                if fast is not None:
                    row["graph"] = fast.reason
                    row["cross_form"] = fast.cross
                    row["attention"] = fast.attn_choice.get(b)
                    row["capture_s"] = fast.capture_s.get(b)
                    ref = tokens.get(f"stock-{b}")
                    if ref is not None:
                        got = outs[0][:, -N:].cpu()  # both variants' first repeat ran on feats[0]
                        row["vs_stock"] = _token_agreement(ref, got)
                        row["vs_stock"]["first_token_agreement"] = float((ref[:, 0] == got[:, 0]).float().mean())
                        row["vs_stock"].update(_whisper_logit_gap(m, fast, feats[0], fast.generate(feats[0])))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                _log(f"[whisper] {variant} b{b} failed: {row['error']}")
            m.forward = stock_forward
            if fast is not None:  # saved before the overlap row, which reuses its caches and graph
                row.update(counts)
                res.add("whisper", row)
            if fast is not None and args.whisper_overlap > 1 and "error" not in row:
                if time.time() > deadline:
                    res.data["notes"].append(f"whisper {variant}+overlap b{b}: skipped (time limit)")
                else:
                    res.add("whisper", _whisper_overlap_row(args, fast, variant, b, feats, tokens, counts))
            for other in fasts.values():  # peak memory of the next variant starts from no caches
                other._states.clear()
            if fast is None:
                res.add("whisper", row)


# ----------------------------------------------------------------------------------------------
class _NvmlPoller:
    """Samples one card (NVML's index ``card``) at ``rate_hz`` through the project's NVML telemetry
    backend on a thread, counting the thread's own CPU time."""

    def __init__(self, rate_hz: float, card: int = 0) -> None:
        self.rate_hz = rate_hz
        self.card = card
        self.samples = 0
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.backend_name = "?"

    def _loop(self) -> None:
        from mi300x_cert.config import TelemetrySpec
        from mi300x_cert.telemetry import open_backend

        spec = TelemetrySpec(backend="nvml", rate_hz=self.rate_hz)
        c0, w0 = time.thread_time(), time.perf_counter()
        with open_backend(spec, cards=[self.card]) as be:
            self.backend_name = type(be).__name__
            period = 1.0 / self.rate_hz
            nxt = time.perf_counter()
            while not self._stop.is_set():
                self.rows.extend(be.sample())
                self.samples += 1
                nxt += period
                self._stop.wait(max(0.0, nxt - time.perf_counter()))
        self.cpu_s = time.thread_time() - c0
        self.wall_s = time.perf_counter() - w0

    def __enter__(self) -> "_NvmlPoller":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)


class _EnergyCounter:
    """The card's total-energy counter through NVML (millijoules since the driver loaded) and its
    enforced power limit. The card is torch's current device, found among NVML's by its UUID (NVML
    does not follow ``CUDA_VISIBLE_DEVICES``); where NVML has one device only, that one. Raises
    RuntimeError, naming the cause, where the counter cannot be read."""

    def __init__(self) -> None:
        import pynvml
        import torch

        pynvml.nvmlInit()
        self._nvml = pynvml
        n = pynvml.nvmlDeviceGetCount()
        if n == 1:
            self.index, self.matched = 0, "the only NVML device"
        else:
            want = str(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", "") or "")
            found = [i for i in range(n) if want and _bare_uuid(pynvml.nvmlDeviceGetUUID(
                pynvml.nvmlDeviceGetHandleByIndex(i))) == _bare_uuid(want)]
            if len(found) != 1:
                raise RuntimeError(f"cannot tell which of the {n} NVML devices is torch's card (UUID {want or '?'}); "
                                   "make one GPU visible")
            self.index, self.matched = found[0], f"NVML device {found[0]} by UUID"
        self._h = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        self.limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(self._h) / 1e3
        self.joules()  # a card without the counter fails here, before anything is measured

    def joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h) / 1e3


def _bare_uuid(u: Any) -> str:
    u = u.decode() if isinstance(u, bytes) else str(u)
    return u[4:].lower() if u.upper().startswith("GPU-") else u.lower()


_COUNTER: list[_EnergyCounter] = []


def energy_counter() -> _EnergyCounter:
    """The one energy counter of this process (opened on first use)."""
    if not _COUNTER:
        _COUNTER.append(_EnergyCounter())
    return _COUNTER[0]


@contextmanager
def card_energy(settle: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """The block's work measured on the card: ``settle()`` (wait for the device) before and after,
    the energy counter read around it, power, SM clock and clock reasons sampled at 10 Hz on the
    counter's card meanwhile. The yielded dict is filled when the block ends: seconds, joules, mean
    power (joules over seconds), the samples' medians, the clock reason seen most and the power
    limit."""
    counter = energy_counter()
    card: dict[str, Any] = {}
    settle()
    with _NvmlPoller(10.0, card=counter.index) as poll:
        j0, t0 = counter.joules(), time.perf_counter()
        yield card
        settle()
        s, j1 = time.perf_counter() - t0, counter.joules()

    def med(key: str) -> float | None:
        vals = [r[key] for r in poll.rows if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    reasons = [str(r["throttle_reasons"]) for r in poll.rows if r.get("throttle_reasons")]
    card.update({"s": s, "joules": j1 - j0, "mean_power_w": (j1 - j0) / s if s > 0 else None,
                 "power_w_median": med("power_w"), "sm_clock_mhz_median": med("sclk_mhz"),
                 "sm_clock_mhz_min": min((r["sclk_mhz"] for r in poll.rows
                                          if isinstance(r.get("sclk_mhz"), (int, float))), default=None),
                 "clock_reasons_most_seen": max(set(reasons), key=reasons.count) if reasons else None,
                 "samples": len(poll.rows), "power_limit_w": counter.limit_w, "counter": counter.matched})


def _row_energy(args: argparse.Namespace, torch: Any) -> Any:
    """``card_energy`` around a row's timed batches with ``--energy``, else nothing measured."""
    return card_energy(torch.cuda.synchronize) if getattr(args, "energy", False) else nullcontext({})


def energy_row(card: dict[str, Any], items: int, unit: str, mean_s: float) -> dict[str, Any]:
    """A row's ``energy``: the meter's figures for its timed batches, joules per ``unit`` over all
    ``items`` of them, and the batches' mean time beside it (the joules follow the mean, the row's
    latency is the median)."""
    return {**card, f"joules_per_{unit}": card["joules"] / items, "mean_batch_s": mean_s}


def bench_telemetry(args: argparse.Namespace, res: Results, deadline: float) -> None:
    """SD throughput with and without 10 Hz NVML sampling (alternating), and the sampler's CPU."""
    import torch

    from mi300x_cert.workloads.sd import SDWorkload

    b = int(args.telemetry_batch)
    wl = SDWorkload(_sd_params(args, "optimized"))
    wl.warmup(b)
    per = {"off": [], "on": []}
    cpu, wall, samples, util, power = 0.0, 0.0, 0, [], []
    for rnd in range(args.telemetry_rounds):
        for state in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
            if time.time() > deadline:
                break
            if state == "on":
                with _NvmlPoller(args.rate_hz) as p:
                    time.sleep(0.3)
                    t0 = time.perf_counter()
                    for i in range(args.telemetry_batches):
                        wl.run_batch(b, i)
                    per["on"].append((time.perf_counter() - t0) / (args.telemetry_batches * b))
                cpu += p.cpu_s
                wall += p.wall_s
                samples += p.samples
                util += [r.get("util_pct") for r in p.rows if r.get("util_pct") is not None]
                power += [r.get("power_w") for r in p.rows if r.get("power_w") is not None]
            else:
                t0 = time.perf_counter()
                for i in range(args.telemetry_batches):
                    wl.run_batch(b, i)
                per["off"].append((time.perf_counter() - t0) / (args.telemetry_batches * b))
    off, on = statistics.median(per["off"]), statistics.median(per["on"])
    res.data["telemetry"] = {
        "workload": f"sd optimized batch {b}", "rate_hz": args.rate_hz, "per_image_off_s": per["off"],
        "per_image_on_s": per["on"], "throughput_change_pct": (off / on - 1) * 100,
        "sampler_cpu_pct_of_core": 100 * cpu / wall if wall else None, "samples": samples,
        "achieved_rate_hz": samples / wall if wall else None,
        "util_pct_median": statistics.median(util) if util else None,
        "power_w_median": statistics.median(power) if power else None,
    }
    wl.close()
    torch.cuda.empty_cache()
    res.save()
    _log(json.dumps(res.data["telemetry"]))


# ----------------------------------------------------------------------------------------------
def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_markdown(datas: list[dict[str, Any]]) -> str:
    """The performance page from one or more bench JSON files (each from one run on one card)."""
    out = ["# Performance: stock, compile recipe and optimized path", "",
           "Generated by `mi300x-cert bench --write-docs docs/performance.md` from measured runs; every figure "
           "below was measured, each ratio against the stock path measured in the same run on the same card.", ""]
    for d in datas:
        c = d.get("conditions", {})
        out += [f"## Run: {c.get('card', '?')} (driver {c.get('driver', '?')})", "",
                f"torch {c.get('torch')} (CUDA {c.get('cuda')}, HIP {c.get('hip')}), triton {c.get('triton')}, "
                f"diffusers {c.get('diffusers')}, transformers {c.get('transformers')}, python {c.get('python')}; "
                f"started {c.get('started')}.", ""]
        g = d.get("gemm")
        cp = d.get("copy")
        if g:
            out += [f"Reference matrix rate: {g['n']}³ {g['dtype']} GEMM = **{g['tflops']:.0f} TFLOP/s** (median of timed products).", ""]
        if cp:
            out += [f"Reference memory rate: {cp['gib']:g} GiB device-to-device copy = **{cp['tb_per_s']:.2f} TB/s** "
                    "(bytes read + written, median of timed copies).", ""]
        sd = [r for r in d.get("sd", []) if "per_image_s" in r]
        if sd:
            fl = d.get("sd_flops", {})
            out += ["### Stable Diffusion v1-4 architecture (synthetic: random weights, identical compute)", "",
                    f"512×512, {sd[0].get('steps')} steps PNDM = {sd[0].get('unet_evals')} UNet evaluations, CFG 7.5, "
                    f"{sd[0].get('dtype')}; latency = text encoder + denoising + VAE decode (synchronized). "
                    f"FLOP count (FlopCounterMode): UNet {fl.get('unet_pair_tflop', 0):.3f} TFLOP per CFG pair, VAE decode "
                    f"{fl.get('vae_decode_tflop', 0):.3f} TFLOP → {sd[0].get('tflop_per_image', 0):.1f} TFLOP per image.", "",
                    "| batch | path | s / image | × stock | TFLOP/s | % of GEMM rate | warm-up s (compile incl.) | peak GiB | vs stock (latent / image rel. err) |",
                    "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            stock = {r["batch"]: r for r in sd if r["variant"] == "stock"}
            for r in sorted(sd, key=lambda r: (r["batch"], SD_VARIANTS.index(r["variant"].split("+")[0].split("-")[0]), r["variant"])):
                s = stock.get(r["batch"])
                ratio = s["per_image_s"] / r["per_image_s"] if s else None
                frac = 100 * r["tflops"] / g["tflops"] if g else None
                vs = r.get("vs_stock")
                vs_s = f"{vs['latent_rel_err']:.1e} / {vs['image_rel_err']:.1e}" if vs else ("reference" if r["variant"] == "stock" else "–")
                label = r["variant"] + (f" ({r['recipe_mode']})" if r.get("recipe_mode") else "")
                out.append(f"| {r['batch']} | {label} | {r['per_image_s']:.3f} | {_fmt(ratio, 2)} | {r['tflops']:.0f} | "
                           f"{_fmt(frac, 0)} | {_fmt(r.get('warmup_s'), 0)} | {_fmt(r.get('peak_mem_gib'), 1)} | {vs_s} |")
            out.append("")
            out += _energy_lines(sd, "image")
            out += _phase_lines(sd)
        wh = [r for r in d.get("whisper", []) if "tokens_per_s" in r]
        if wh:
            out += ["### Whisper large-v3 architecture (synthetic weights), greedy, forced new tokens", "",
                    f"{wh[0].get('dtype')}, {wh[0].get('new_tokens')} new tokens per clip (EOS suppressed), 30 s log-mel "
                    "input; latency = encoder + decoding of the whole batch (synchronized).", "",
                    "Bound: the tokens/s this run's ceilings allow (cross-attention bytes per token at the copy rate "
                    "plus — or, overlapped, beside — the encoder's FLOPs per token at the GEMM rate). `+overlap`: "
                    "a stream of batches, the next batch's encoder on a second stream (tokens/s over the whole stream, "
                    "first encoder in series included; steady: between batch completions).", "",
                    "| batch | path | tokens/s | × stock (b same) | batch s | warm-up s | peak GiB | bound tok/s | % of bound | token agreement with stock |",
                    "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            stock = {r["batch"]: r for r in wh if r["variant"] == "stock"}
            best_stock = max((r["tokens_per_s"] for r in stock.values()), default=None)
            for r in sorted(wh, key=lambda r: (r["batch"], r["variant"] != "stock")):
                s = stock.get(r["batch"])
                ratio = r["tokens_per_s"] / s["tokens_per_s"] if s else (r["tokens_per_s"] / best_stock if best_stock else None)
                vs = r.get("vs_stock")
                vs_s = (f"{100 * vs['token_agreement']:.1f}% tokens, {100 * vs['clips_identical']:.0f}% clips identical"
                        if vs else ("reference" if r["variant"] == "stock" else "–"))
                rs = _fmt(ratio, 2) + ("" if s or r["variant"] == "stock" else " (vs best stock)")
                bd = whisper_bound(r, g, cp) if r["variant"] not in ("stock", "recipe") else None
                tps = f"{r['tokens_per_s']:.0f}"
                if r.get("steady_tokens_per_s"):
                    tps += f" (steady {r['steady_tokens_per_s']:.0f})"
                out.append(f"| {r['batch']} | {r['variant']} | {tps} | {rs} | {r['batch_latency_s']:.2f} | "
                           f"{_fmt(r.get('warmup_s'), 1)} | {_fmt(r.get('peak_mem_gib'), 1)} | "
                           f"{_fmt(bd and bd['tokens_per_s'], 0)} | {_fmt(bd and 100 * bd['fraction'], 0)} | {vs_s} |")
            out.append("")
            kern = []
            for r in wh:
                us = {k: v for k, v in ((r.get("attention") or {}).get("us_per_layer") or {}).items() if v == v and v}
                tb = (r.get("attention") or {}).get("tb_per_s") or {}
                if us and r["variant"] != "stock":
                    k = min(us, key=us.get)
                    frac = f" = {100 * tb[k] / cp['tb_per_s']:.0f}% of the copy rate" if cp and tb.get(k) else ""
                    kern.append(f"b{r['batch']} {r['variant']}: {k} {us[k]:.0f} µs per layer, "
                                f"{_fmt(tb.get(k), 2)} TB/s{frac}")
            if kern:
                out += ["Cross-attention kernel chosen per batch (timed on the batch's own data): " + "; ".join(kern) + ".", ""]
            out += _energy_lines(wh, "token")
            modes = {r["variant"]: r["recipe_mode"] for r in wh if r.get("recipe_mode")}
            for v, mode in modes.items():
                out += [f"`{v}`: {mode}.", ""]
        failed = [r for r in d.get("whisper", []) if r.get("error")]
        if failed:
            out += ["Whisper rows that did not finish: " + "; ".join(
                f"{r['variant']} b{r['batch']}: {r['error'][:160]}" for r in failed), ""]
        t = d.get("telemetry")
        if t:
            out += ["### Telemetry overhead", "",
                    f"{t['workload']}, NVML sampled at {t['rate_hz']} Hz (achieved {_fmt(t.get('achieved_rate_hz'), 1)} Hz), "
                    f"alternating rounds with and without sampling: throughput change **{t['throughput_change_pct']:+.2f}%**, "
                    f"sampler thread CPU **{_fmt(t.get('sampler_cpu_pct_of_core'), 2)}% of one core**; median utilization "
                    f"{_fmt(t.get('util_pct_median'), 0)}%, power {_fmt(t.get('power_w_median'), 0)} W during sampling.", ""]
        if d.get("notes"):
            out += ["Notes: " + "; ".join(d["notes"]), ""]
    return "\n".join(out) + "\n"


POWER_BOUND_FRACTION = 0.9  # rows drawing at least this share of the power limit get its bound


def power_bound(joules_per_unit: float | None, limit_w: float | None, mean_power_w: float | None) -> float | None:
    """Seconds per unit (image, token) the card's power limit allows for the same joules per unit:
    joules / limit. Only for work drawn near the limit — at least ``POWER_BOUND_FRACTION`` of it,
    as the rendered whole percent shows it — else None (a row far below the limit spent part of
    its joules waiting on the host), and None without a positive energy, limit and mean power. A
    bound for that work at that clock: energy per operation falls a little at lower clocks."""
    if not joules_per_unit or not limit_w or not mean_power_w or min(joules_per_unit, limit_w, mean_power_w) <= 0:
        return None
    if round(100 * mean_power_w / limit_w) < round(100 * POWER_BOUND_FRACTION):
        return None
    return joules_per_unit / limit_w


def _energy_lines(rows: list[dict[str, Any]], unit: str) -> list[str]:
    """One sentence for the rows measured with ``--energy``: joules per unit, the mean power
    against the card's power limit, the SM clock and the clock reason seen most, and for rows near
    the limit the rate it allows for those joules (:func:`power_bound`)."""
    parts, bounded = [], False
    for r in rows:
        e = r.get("energy") or {}
        per = e.get(f"joules_per_{unit}")
        if per is None:
            continue
        lim = e.get("power_limit_w")
        frac = f" = {100 * e['mean_power_w'] / lim:.0f}% of the {lim:.0f} W limit" if lim and e.get("mean_power_w") else ""
        bound = power_bound(per, lim, e.get("mean_power_w"))
        at_limit = ""
        if bound is not None:
            bounded = True
            at_limit = f", at the limit ≤ {1 / bound:.0f} tok/s" if unit == "token" else f", at the limit ≥ {bound:.4f} s per {unit}"
        parts.append(f"b{r['batch']} {r['variant']}: {_fmt(per * (1e3 if unit == 'token' else 1), 1 if unit == 'token' else 2)} "
                     f"{'mJ' if unit == 'token' else 'J'} per {unit}, {_fmt(e.get('mean_power_w'), 0)} W{frac}, "
                     f"SM clock {_fmt(e.get('sm_clock_mhz_median'), 0)} MHz ({e.get('clock_reasons_most_seen') or 'no clock reason'})"
                     + at_limit)
    head = "Energy of the timed batches (the card's energy counter; `--energy`" + (
        f"; \"at the limit\", for rows at ≥ {100 * POWER_BOUND_FRACTION:.0f}% of the power limit: the rate that limit "
        f"allows for the same joules per {unit}" if bounded else "") + ")"
    return [head + ": " + "; ".join(parts) + ".", ""] if parts else []


def _phase_lines(rows: list[dict[str, Any]]) -> list[str]:
    parts = [f"b{r['batch']} {r['variant']}: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in r["phases_s"].items())
             for r in rows if r.get("phases_s")]
    return ["Where a batch's time goes (ms per batch; medians of more batches, the device synchronised "
            "between the text encoder, the denoising loop and the VAE decode): " + "; ".join(parts) + ".", ""] if parts else []


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mi300x-cert bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="all", choices=["sd", "whisper", "telemetry", "gemm", "all", "none"])
    p.add_argument("--batch", default="1,32", help="SD batch sizes (comma-separated)")
    p.add_argument("--variants", default="stock,recipe,optimized",
                   help="stock, recipe, optimized (comma-separated); for SD also optimized+key=value+…: "
                        "the optimized path with those Inductor settings, beside the default in the same run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--sd-model", default="synthetic:sd-v1-4")
    p.add_argument("--sd-inductor", default=None,
                   help="extra Inductor settings for the SD optimized path, e.g. coordinate_descent_tuning=true,freezing=true")
    p.add_argument("--sd-unet", default="auto",
                   help="UNet forms of the SD optimized path, comma-separated: auto," + ",".join(UNET_FORMS))
    p.add_argument("--whisper-model", default="synthetic:whisper-large-v3")
    p.add_argument("--whisper-batch", default="64,128")
    p.add_argument("--whisper-stock-batch", default="64")
    p.add_argument("--whisper-recipe-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--whisper-cross", default="auto",
                   help="cross-attention forms of the optimized path, comma-separated: " + ",".join(CROSS_FORMS))
    p.add_argument("--whisper-encoder", default="auto",
                   help="encoder forms of the optimized path, comma-separated: " + ",".join(ENCODER_FORMS))
    p.add_argument("--whisper-overlap", type=int, default=3,
                   help="batches per optimized overlap measurement (next encoder on a second stream); 0 or 1: none")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--telemetry-batch", default="1")
    p.add_argument("--telemetry-batches", type=int, default=6)
    p.add_argument("--telemetry-rounds", type=int, default=4)
    p.add_argument("--rate-hz", type=float, default=10.0)
    p.add_argument("--sd-profile", action="store_true",
                   help="profile one more batch of each SD optimized row: device ms per batch by kernel class "
                        "(profile in the row's JSON)")
    p.add_argument("--energy", action="store_true",
                   help="measure the timed batches of each SD and Whisper row (not +overlap or recipe rows) with the "
                        "card's energy counter (NVML): joules per image or token, mean power against the enforced "
                        "limit, SM clock and clock reasons")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the stock-equality check")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; later measurements are skipped past it")
    p.add_argument("--out", default=None, help="JSON file to write (updated after each measurement)")
    p.add_argument("--write-docs", default=None, help="render Markdown to this file")
    p.add_argument("--from-json", nargs="*", default=None, help="render from these JSON files instead of measuring")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sd_inductor:  # a bad setting is a usage error before the card is touched
        from mi300x_cert.workloads.optimized.common import parse_inductor_settings

        try:
            args.sd_inductor = parse_inductor_settings(args.sd_inductor, source="--sd-inductor")
        except ValueError as e:
            parser.error(str(e))
    if args.workload in ("sd", "all") and args.from_json is None:
        try:  # an unknown variant or a bad setting on one is a usage error before the card is touched
            sd_variants(args.variants, args.sd_inductor)
        except ValueError as e:
            parser.error(str(e))
    if args.workload in ("sd", "all") and args.from_json is None:
        forms = [v.strip() for v in args.sd_unet.split(",") if v.strip()]
        bad = [v for v in forms if v not in ("auto", *UNET_FORMS)]
        if bad:
            parser.error(f"--sd-unet: unknown {', '.join(bad)}; known: auto, {', '.join(UNET_FORMS)}")
        if len(set(forms)) != len(forms):
            parser.error(f"--sd-unet: name each form once, got {args.sd_unet!r}")
    if args.workload in ("whisper", "all") and args.from_json is None:
        # an unknown cross-attention or encoder form is a usage error before the card is touched
        for flag, val, known in (("--whisper-cross", args.whisper_cross, CROSS_FORMS),
                                 ("--whisper-encoder", args.whisper_encoder, ENCODER_FORMS)):
            bad = [v.strip() for v in val.split(",") if v.strip() and v.strip() not in known]
            if bad:
                parser.error(f"{flag}: unknown {', '.join(bad)}; known: {', '.join(known)}")
    if args.from_json is not None:
        datas = [json.loads(Path(f).read_text()) for f in args.from_json]
        text = render_markdown(datas)
        if args.write_docs:
            Path(args.write_docs).write_text(text)
        else:
            print(text)
        return 0
    import torch

    from mi300x_cert.errors import WorkerError

    if not torch.cuda.is_available():
        raise WorkerError("mi300x-cert bench measures a GPU: torch sees none (CUDA/ROCm)")
    if args.energy:
        try:  # before anything is measured: a card whose energy counter cannot be read is a usage error
            energy_counter()
        except Exception as e:
            parser.error(f"--energy: the card's energy counter cannot be read ({type(e).__name__}: {e})")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    deadline = time.time() + args.time_limit if args.time_limit else float("inf")
    res = Results(Path(args.out) if args.out else None)
    res.data["conditions"] = run_record(argv)
    res.save()
    w = args.workload
    if not args.whisper_recipe_child:
        res.data["gemm"] = measure_gemm()
        res.data["copy"] = measure_copy()
        res.save()
    _log(json.dumps(res.data["conditions"]), json.dumps(res.data["gemm"]), json.dumps(res.data.get("copy")))
    if w in ("sd", "all"):
        bench_sd(args, res, deadline)
    if w in ("whisper", "all"):
        bench_whisper(args, res, deadline)
    if w in ("telemetry", "all"):
        bench_telemetry(args, res, deadline)
    if args.write_docs:
        Path(args.write_docs).write_text(render_markdown([res.data]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
