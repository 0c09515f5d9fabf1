"""The SD v1-4 UNet's building blocks, level by level, at the batch of one image (2 with CFG) and of
32 images (64): what rate the card's libraries reach on each shape.

    python bench/sd_levels.py [--out levels.json]

Per UNet level (latent 64², 32², 16², 8² with 320/640/1280/1280 channels): the 3×3 convolution of
the ResNet blocks (cuDNN, channels-last fp16), the transformer blocks' projection (C→C) and GEGLU
(C→8C) matrix products (cuBLAS), and self-attention (SDPA, the kernel the optimized path puts
first). FLOPs counted as 2·MACs; medians of event-timed repeats; inputs rotate so the L2 does not
hold them across repeats. The UNet spends about the same convolution FLOPs on each of the first
three levels, so a level that runs at a fraction of the rate costs a level's worth of time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any


# (latent side, channels, transformer blocks per UNet evaluation) of SD v1-4's four levels
LEVELS = ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1))


def _time_ms(fn: Any, n: int = 30) -> float:
    import torch

    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    meds = []
    for _ in range(5):
        ev[0].record()
        for i in range(n):
            fn(i)
        ev[1].record()
        ev[1].synchronize()
        meds.append(ev[0].elapsed_time(ev[1]) / n)
    return statistics.median(meds)


def gemm_tflops(dtype: Any, n: int = 8192, reps: int = 10) -> float:
    """The card's n³ matrix-product rate in ``dtype`` on random data (:func:`_time_ms`): the ceiling
    the SD level benches set their figures against."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / (_time_ms(lambda i: a @ b, reps) * 1e-3) / 1e12


def parse_configs(text: str | None, default: Any) -> list[tuple[int, ...]]:
    """``a,b,…;c,d,…`` → launch configurations (``default`` when not given)."""
    return [tuple(int(v) for v in c.split(",")) for c in text.split(";") if c] if text else list(default)


def unet_flops_by_level(config_dir: str = "include/models/sd-v1-4/unet") -> dict[str, Any]:
    """TFLOP per CFG pair (UNet batch 2) of the UNet, by op class and latent level, counted with
    FlopCounterMode on the meta device (no memory, no GPU): convolution, matrix products
    (addmm + mm) and attention (bmm of the attention's math path) per level 64/32/16 (down and up
    block of that resolution); the rest (conv_in/out, the 8² blocks, the mid block) apart."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = UNet2DConditionModel.load_config(config_dir)
    with torch.device("meta"):
        u = UNet2DConditionModel.from_config(cfg)
        x, t, e = torch.empty(2, 4, 64, 64), torch.tensor([10.0]), torch.empty(2, 77, 768)
    with FlopCounterMode(display=False) as fc:
        u(x, t, encoder_hidden_states=e)
    counts = fc.get_flop_counts()

    def cls(ops: dict[Any, int]) -> dict[str, float]:
        got = {str(k): v / 1e12 for k, v in ops.items()}
        return {"conv": got.get("aten.convolution", 0.0), "mm": got.get("aten.addmm", 0.0) + got.get("aten.mm", 0.0),
                "attn": got.get("aten.bmm", 0.0)}

    total = cls(counts["Global"])
    levels: dict[str, dict[str, float]] = {}
    for side, down, up in ((64, 0, 3), (32, 1, 2), (16, 2, 1)):
        a = cls(counts.get(f"UNet2DConditionModel.down_blocks.{down}", {}))
        b = cls(counts.get(f"UNet2DConditionModel.up_blocks.{up}", {}))
        levels[str(side)] = {k: a[k] + b[k] for k in a}
    levels["rest"] = {k: total[k] - sum(v[k] for v in levels.values()) for k in total}
    return {"total": total, "levels": levels, "total_tflop": fc.get_total_flops() / 1e12}


def bound(rows: list[dict[str, Any]], flops: dict[str, Any], batch: int) -> dict[str, Any]:
    """Time of one UNet evaluation at ``batch`` if every convolution, product and attention ran at
    the rate measured for its level's shape and everything else took no time. Products: each
    transformer block spends 1/3 of its product FLOPs in C→C-wide projections and 2/3 in the
    wide GEGLU/FF products, so their rates are blended harmonically in that proportion; the rest
    (conv_in/out, 8² and mid blocks) at the 8² convolution and 16² product/attention rates."""
    r = {(x["level"].split("²")[0], x["op"].split(" ")[0]): x["tflops"] for x in rows if x["batch"] == batch}
    parts: dict[str, float] = {}
    pairs = batch / 2
    for lv, f in flops["levels"].items():
        src = "8" if lv == "rest" else lv
        mm_lv = "16" if lv == "rest" else lv
        mm_rate = 1.0 / (1 / 3 / r[(mm_lv, "proj")] + 2 / 3 / r[(mm_lv, "GEGLU")])
        attn_lv = "16" if lv == "rest" else lv
        parts[f"conv {lv}"] = f["conv"] / r[(src, "conv3x3")] * pairs * 1e3
        parts[f"products {lv}"] = f["mm"] / mm_rate * pairs * 1e3
        parts[f"attention {lv}"] = f["attn"] / r[(attn_lv, "self-attention")] * pairs * 1e3
    ms = sum(parts.values())
    return {"batch": batch, "ms_per_unet_eval": ms, "s_per_image_51_evals": ms * 51 / pairs / 1e3,
            "parts_ms": parts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="2,64", help="UNet batch sizes (2 = one image with CFG)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    levels = [(side, C) for side, C, _ in LEVELS]
    rows = []
    m = 8192
    A = torch.randn(m, m, device=dev, dtype=torch.bfloat16, generator=g)
    ms = _time_ms(lambda i: A @ A, 10)
    ref = 2 * m ** 3 / (ms * 1e-3) / 1e12
    del A
    for N in [int(x) for x in a.batches.split(",")]:
        for side, C in levels:
            # 3x3 convolution C -> C (ResNet block), channels-last
            xs = [torch.randn(N, C, side, side, device=dev, dtype=dt, generator=g).to(memory_format=torch.channels_last)
                  for _ in range(2)]
            w = torch.randn(C, C, 3, 3, device=dev, dtype=dt, generator=g).to(memory_format=torch.channels_last) * 0.02
            fl = 2 * N * side * side * C * C * 9
            ms = _time_ms(lambda i: F.conv2d(xs[i % 2], w, padding=1))
            rows.append({"batch": N, "level": f"{side}²×{C}", "op": "conv3x3", "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12})
            del xs, w
            if side == 8:
                continue
            T = N * side * side
            xs = [torch.randn(T, C, device=dev, dtype=dt, generator=g) for _ in range(2)]
            for name, n_out in (("proj C→C", C), ("GEGLU C→8C", 8 * C)):
                w = torch.randn(n_out, C, device=dev, dtype=dt, generator=g) * 0.02
                ms = _time_ms(lambda i: F.linear(xs[i % 2], w))
                rows.append({"batch": N, "level": f"{side}²×{C}", "op": name, "ms": ms,
                             "tflops": 2 * T * C * n_out / (ms * 1e-3) / 1e12})
                del w
            del xs
            heads, S = 8, side * side
            d = C // heads
            qs = [torch.randn(N, heads, S, d, device=dev, dtype=dt, generator=g) for _ in range(3)]
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.MATH], set_priority=True):
                ms = _time_ms(lambda i: F.scaled_dot_product_attention(qs[i % 3], qs[(i + 1) % 3], qs[(i + 2) % 3]))
            rows.append({"batch": N, "level": f"{side}²×{C}", "op": f"self-attention d={d}", "ms": ms,
                         "tflops": 4 * N * heads * S * S * d / (ms * 1e-3) / 1e12})
            del qs
            torch.cuda.empty_cache()
    out = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "gemm_bf16_8192_tflops": ref, "rows": rows}
    try:
        out["unet_flops"] = unet_flops_by_level()
        out["bounds"] = [bound(rows, out["unet_flops"], int(x)) for x in a.batches.split(",")]
    except Exception as e:  # the rates stand on their own
        out["bounds_error"] = f"{type(e).__name__}: {e}"
    print(f"8192³ bf16 GEMM: {ref:.0f} TFLOP/s")
    print("| UNet batch | level | op | ms | TFLOP/s | % of GEMM |")
    for r in rows:
        print(f"| {r['batch']} | {r['level']} | {r['op']} | {r['ms']:.3f} | {r['tflops']:.0f} | {100 * r['tflops'] / ref:.0f} |")
    for bd in out.get("bounds", []):
        print(f"UNet batch {bd['batch']}: {bd['ms_per_unet_eval']:.1f} ms per evaluation at these rates, "
              f"{bd['s_per_image_51_evals']:.3f} s per image (51 evaluations), nothing memory-bound counted")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
