"""The hidden-form cross-attention kernels side by side on one card: the Triton kernel's launch
configurations and the CUDA kernel's (``mi300x_cert/workloads/optimized/hidden_attn_cuda.py``),
each checked against the float32 reference first, then event-timed on Whisper large-v3 shapes
(20 heads, 1500 encoder positions, d_model 1280, fp16, random data; two X buffers alternated so
every call reads X from memory). The same run measures the card's device-to-device copy rate,
the ceiling every TB/s figure is a fraction of.

    python bench/hidden_attn_cuda.py --batch 64 512 1024 --out bench/results/h200-hidden-attn.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 512, 1024])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cuda", default=None, help="CUDA configs warps,stages,splits,rows,qsmem,pipe,bulk,red2[,mode[,cluster[,persist[,unit_ring[,lazy]]]]];… (default: the candidates)")
    ap.add_argument("--triton", default="32,1,4,3,16", help="Triton configs block_n,splits,warps,stages,head_tile;…")
    a = ap.parse_args()
    import torch

    from mi300x_cert.workloads.optimized import hidden_attn_cuda as hc
    from mi300x_cert.workloads.optimized import whisper_fast as wf
    from mi300x_cert.workloads.optimized.common import event_time_us

    H, S, E = 20, 1500, 1280
    dev = "cuda"
    res: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "python": platform.python_version(), "shapes": {"heads": H, "seq": S, "d_model": E, "dtype": "fp16"},
                 "reps": a.reps, "batches": {}}
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception:
        pass
    n = 1 << 31
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    us = event_time_us(lambda i: dst.copy_(src), 10)
    res["copy_tb_s"] = 2 * n / (us * 1e-6) / 1e12
    del src, dst
    ok, why = hc.cuda_hidden_available(dev)
    res["cuda_kernel"] = "available" if ok else why
    tri = [tuple(int(v) for v in c.split(",")) for c in a.triton.split(";") if c]
    for B in a.batch:
        g = torch.Generator(device=dev).manual_seed(0)
        X = [torch.randn(B, S, E, device=dev, dtype=torch.float16, generator=g) for _ in range(2)]
        # q' as the decode step makes it: a [B, H, E] view of an [H, B, E] buffer
        qp = (torch.randn(H, B, E, device=dev, generator=g) * E ** -0.5 * 4).half().transpose(0, 1)
        nref = min(B, 4)
        ref = wf.hidden_attention_reference(qp[:nref], X[0][:nref]).float()
        gb = B * S * E * 2 / 1e9
        row: dict = {"gb_per_call": gb, "kernels": {}}
        cands = [(f"triton b{c[0]} s{c[1]} w{c[2]} st{c[3]} h{c[4]}",
                  lambda c=c: wf.HiddenAttention(B, H, S, E, block_n=c[0], splits=c[1], num_warps=c[2],
                                                 num_stages=c[3], head_tile=c[4], device=dev, dtype=torch.float16))
                 for c in tri]
        if ok:
            cfgs = ([tuple(int(v) for v in c.split(",")) for c in a.cuda.split(";") if c] if a.cuda
                    else list(hc.CUDA_HIDDEN_CONFIGS))
            cands += [(hc.CudaHiddenAttention.config_key(c),
                       lambda c=c: hc.CudaHiddenAttention.from_config(B, H, S, E, c, device=dev, dtype=torch.float16))
                      for c in cfgs]
        for name, build in cands:
            rec: dict = {}
            k = None
            try:
                t0 = time.perf_counter()
                k = build()
                out = k(qp, X[0])
                torch.cuda.synchronize()
                rec["build_s"] = time.perf_counter() - t0
                err = float((out[:nref].float() - ref).abs().max() / ref.abs().max())
                rec["max_rel_err"] = err
                if isinstance(k, hc.CudaHiddenAttention):
                    rec.update(hc.kernel_attributes(k.kernel))
                    rec["smem_kb"] = k.smem / 1024
                if len(name.split(" mode")) > 1:
                    rec["note"] = "diagnostic variant (1: loads only, 2: arithmetic only): output not checked"
                    err = 0.0
                if not err < 2e-2:
                    rec["rejected"] = "error"
                else:
                    t = event_time_us(lambda i: k(qp, X[i % 2]), a.reps)
                    rec["us"] = t
                    rec["tb_s"] = gb / (t * 1e-6) / 1e3
                    rec["of_copy"] = rec["tb_s"] / res["copy_tb_s"]
            except Exception as e:
                rec["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            key, k_rep = name, 2
            while key in row["kernels"]:  # the same configuration again in one run: kept beside the first
                key, k_rep = f"{name} (#{k_rep})", k_rep + 1
            row["kernels"][key] = rec
            print(B, key, json.dumps(rec), flush=True)
            del k
        res["batches"][str(B)] = row
        del X, qp
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
