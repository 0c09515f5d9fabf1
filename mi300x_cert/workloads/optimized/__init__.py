"""The optimized path (profile ``path: optimized``): same functions as the stock workloads, less
harness. Each ``optimize_<kind>(workload, params)`` mutates a loaded stock workload in place and
records what it changed in the workload's conditions (``optimized`` key).

* SD: channels-last + fused QKV + ``torch.compile`` of UNet and VAE decoder + the whole denoising
  loop (UNet × scheduler steps × CFG) as one device graph per batch size (:mod:`.sd_fast`).
* Whisper: compiled encoder, cross-attention over the encoder output itself (projections folded
  into query and output; K/V once per batch where the triton kernel does not run), static KV cache,
  fixed-shape decode step captured as a device graph (:mod:`.whisper_fast`).
* ResNet-50: channels-last + ``torch.compile`` + one device graph per input shape.

The compile cache is persistent (:func:`.common.setup_compile_cache`), so a recertification of the
same host does not pay compilation again.
"""

from __future__ import annotations

import time
from typing import Any

from .common import GraphCache, compile_module, setup_compile_cache

__all__ = ["optimize_sd", "optimize_whisper", "optimize_resnet", "OPTIMIZED_VERSION"]

OPTIMIZED_VERSION = "4"  # 2: Whisper hidden-form cross-attention, compiled encoder; 3: SD frozen weights;
# 4: the Whisper encoder's fast form (attention without layout copies)


def _record(workload: Any, info: dict[str, Any]) -> None:
    """Add ``optimized`` to the workload's conditions (wrapping its ``_conditions``)."""
    orig = workload._conditions

    def _conditions() -> dict[str, Any]:
        out = dict(orig())
        out["optimized"] = {k: v for k, v in info.items() if not callable(v)}
        fast = getattr(workload, "fast", None)
        if fast is not None and hasattr(fast, "notes"):
            out["optimized"].update(fast.notes)
        return out

    workload._conditions = _conditions


def optimize_sd(workload: Any, params: dict[str, Any]) -> None:
    """Swap the SD workload's denoise/decode steps for :class:`.sd_fast.FastSD`."""
    from .sd_fast import attach_to_workload

    cache = setup_compile_cache(params.get("compile_cache"))
    fast = attach_to_workload(workload, params)
    _record(workload, {"version": OPTIMIZED_VERSION, "compile_cache": "persistent" if cache else "none",
                       "recipe": "channels-last, fused QKV, torch.compile UNet+VAE (frozen weights), "
                                 "whole-loop device graph"})
    workload.fast = fast


def optimize_whisper(workload: Any, params: dict[str, Any]) -> None:
    """Swap the Whisper workload's generation for :class:`.whisper_fast.FastWhisper`."""
    from .whisper_fast import attach_to_workload

    setup_compile_cache(params.get("compile_cache"))
    fast = attach_to_workload(workload, params)
    cross = ("cross-attention over the encoder output (hidden form)" if fast.cross == "hidden"
             else "cross K/V once per batch")
    enc = "compiled encoder, " if fast.compile_encoder else ""  # its form: the notes (encoder_form)
    _record(workload, {"version": OPTIMIZED_VERSION,
                       "recipe": f"static KV cache, {enc}{cross}, decode step as a device graph, greedy",
                       "cross_attention_form": fast.cross})
    workload.fast = fast


class _GraphModule:
    """Callable standing in for a module: compiled forward replayed from one device graph per
    input shape (eager on CPU). Attribute access falls through to the wrapped module."""

    def __init__(self, module: Any, device: str) -> None:
        self._module = module
        self._device = device
        self._fn, self.compile_label = compile_module(module, device=device, mode="default")
        self._graphs = GraphCache(self._fn, self._device, warmup_runs=2, name="resnet")
        self.notes: dict[str, Any] = {"compile": self.compile_label}

    def __call__(self, x: Any) -> Any:
        import torch

        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and str(self._device).startswith("cuda") else x
        out = self._graphs.run(x)
        self.notes["graph"] = self._graphs.reason
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def optimize_resnet(workload: Any, params: dict[str, Any]) -> None:
    """Channels-last + compile + a device graph per input shape for the ResNet-50 model."""
    import torch

    setup_compile_cache(params.get("compile_cache"))
    t0 = time.perf_counter()
    model = getattr(workload, "model", None)
    if model is None:
        from ...errors import WorkerError

        raise WorkerError("optimize_resnet: the ResNet workload exposes no .model to optimize")
    if str(workload.device).startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    fast = _GraphModule(model, workload.device)
    workload.model = fast
    workload.fast = fast
    workload.compile_mode = fast.compile_label
    workload.optimized_setup_s = time.perf_counter() - t0
    _record(workload, {"version": OPTIMIZED_VERSION, "recipe": "channels-last, torch.compile, device graph per shape"})
