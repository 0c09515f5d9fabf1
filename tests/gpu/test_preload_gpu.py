"""On a real card: workers forked from the preloader (which imported torch, diffusers and
transformers but touched no device) each initialize the card themselves and run their workload.
Opt-in: ``pytest -m gpu``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mi300x_cert.config import load_profile  # noqa: E402
from mi300x_cert.experiments.sd_throughput import sd_params  # noqa: E402
from mi300x_cert.launcher import launch  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def _specs(prof, device: str) -> list[dict]:
    sd = {"proc": 0, "card": 0, "device": device, "kind": "sd", "params": sd_params(prof), "warmup_batches": 1,
          "plan": {"mode": "fixed", "batch_size": 1, "n_batches": 2}}
    resnet = {"proc": 1, "card": 0, "device": device, "kind": "resnet50", "warmup_batches": 1,
              "params": {"model": "synthetic:resnet-tiny", "dtype": prof.dtype, "path": "stock", "seed": 0,
                         "image_size": 64, "mode": "eager",
                         "compile": {"enabled": False, "backend": "inductor", "mode": "default"}},
              "plan": {"mode": "fixed", "batch_size": 2, "n_batches": 2}}
    return [sd, resnet]


def test_gpu_workers_are_spawned_fresh_and_use_the_card(tmp_path):
    prof = load_profile("smoke", overrides={"device": "cuda", "dtype": "float16"})
    res = launch(_specs(prof, "cuda"), timeout_s=300, log_dir=tmp_path, vendor="nvidia")
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert res.ok, (res.reason, logs)
    assert [w.start for w in res.workers] == ["spawned", "spawned"] and not (tmp_path / "preloader.log").exists()
    assert [w.device for w in res.workers] == ["cuda", "cuda"] and [w.rows for w in res.workers] == [2, 2]
    assert all(str(w.conditions.get("backend", "")).startswith("cuda-") for w in res.workers)


def test_cpu_workers_on_a_gpu_host_are_forked_only_when_the_preloader_is_safe(tmp_path):
    """The smoke profile's CPU workers on a GPU host: the preloader forks them only if its imports
    left one thread and no initialized driver; otherwise it refuses, naming why, and they are
    spawned. Either way the workers run."""
    prof = load_profile("smoke")
    res = launch(_specs(prof, "cpu"), timeout_s=300, log_dir=tmp_path, vendor="nvidia")
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert res.ok, (res.reason, logs)
    starts = [w.start for w in res.workers]
    print("cpu workers on this GPU host:", starts)
    assert starts == ["preloaded", "preloaded"] or all(
        s.startswith("spawned (no preloader: the preloader is not ready: RuntimeError: ")
        and ("threads after the imports" in s or "initialized the GPU driver" in s) for s in starts), starts
    assert [w.device for w in res.workers] == ["cpu", "cpu"] and [w.rows for w in res.workers] == [2, 2]


def test_a_preloader_whose_imports_initialized_the_driver_refuses_to_fork():
    """diffusers asks at import whether a GPU exists; without the NVML count that initializes the
    CUDA driver, and the preloader's probe must see that a forked worker could not use the card."""
    import os
    import subprocess
    import sys

    code = ("import torch; torch.cuda.is_available()\n"
            "from mi300x_cert.preload import _check_fork_safe\n"
            "try:\n    _check_fork_safe()\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused: an import initialized the GPU driver" in out.stdout, (out.stdout, out.stderr[-2000:])
