"""One launch configuration of the hidden-form cross-attention kernel on its own, for a profiler:

    ncu --clock-control none -k regex:_hidden_part -c 1 --section SpeedOfLight --section Occupancy \
        python bench/hidden_attn_probe.py --batch 256 --config 32,1,4,3,16
    ncu --clock-control none -k regex:hidden_attn_cuda -c 1 --section WarpStateStats \
        python bench/hidden_attn_probe.py --batch 1024 --cuda 8,2,1,32,0,0,1,1,0,1,2

(``--cuda``: the hand-written CUDA kernel in that configuration of ``CUDA_HIDDEN_CONFIGS``' form
instead of the Triton kernel.)

Whisper large-v3 shapes (20 heads, 1500 encoder positions, d_model 1280), fp16, random data; two
launches (the profiler takes the one it is told to); prints the event-timed µs and TB/s.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--config", default="32,1,4,3,16", help="block_n,splits,num_warps,num_stages,head_tile")
    ap.add_argument("--cuda", default=None, help="a CUDA kernel configuration (warps,stages,splits,rows,…) instead")
    a = ap.parse_args()
    import torch

    from mi300x_cert.workloads.optimized import whisper_fast as wf
    from mi300x_cert.workloads.optimized.common import event_time_us

    B, H, S, E = a.batch, 20, 1500, 1280
    c = [int(v) for v in (a.cuda or a.config).split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    X = [torch.randn(B, S, E, device="cuda", dtype=torch.float16, generator=g) for _ in range(2)]
    qp = (torch.randn(B, H, E, device="cuda", generator=g) * E ** -0.5 * 4).half()
    if a.cuda:
        from mi300x_cert.workloads.optimized.hidden_attn_cuda import CudaHiddenAttention

        ha = CudaHiddenAttention.from_config(B, H, S, E, tuple(c), device="cuda", dtype=torch.float16)
    else:
        ha = wf.HiddenAttention(B, H, S, E, block_n=c[0], splits=c[1], num_warps=c[2], num_stages=c[3],
                                head_tile=c[4], device="cuda", dtype=torch.float16)
    us = event_time_us(lambda i: ha(qp, X[i % 2]), 4, warmup=1)
    print(json.dumps({"config": c, "batch": B, "us": us, "tb_s": B * S * E * 2 / (us * 1e-6) / 1e12}))


if __name__ == "__main__":
    main()
