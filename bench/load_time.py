"""Time to build a synthetic workload on the GPU: weights initialised on the CPU vs on the device.

    python bench/load_time.py [--workloads sd,whisper]   # prints JSON
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="sd,whisper")
    a = ap.parse_args()
    import torch

    from mi300x_cert.workloads import load_workload

    models = {"sd": "synthetic:sd-v1-4", "whisper": "synthetic:whisper-large-v3"}
    out: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for kind in a.workloads.split(","):
        for where in ("cpu", "device", "cpu"):  # cpu twice: the first pays one-time imports/driver setup
            wl = load_workload(kind, {"model": models[kind], "dtype": "float16", "synthetic_init": where,
                                      "new_tokens": 8, "batch_size": 1}, "cuda")
            c = wl.conditions()
            out.setdefault(kind, []).append({"synthetic_init": c.get("synthetic_init"), "load_s": c.get("load_s")})
            r = wl.run_batch(1, 0)
            out[kind][-1]["batch1_latency_s"] = r.get("latency_s")
            wl.close()
            del wl
            torch.cuda.empty_cache()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
