"""Workloads: Stable Diffusion, Whisper and ResNet-50 behind one contract (see ``base.Workload``).

    wl = load_workload("sd" | "whisper" | "resnet50", params, device)

Importing this package does not import torch; the workload modules are imported on demand.
"""

from __future__ import annotations

from typing import Any

from ..errors import WorkerError
from .base import Workload

__all__ = ["load_workload", "workload_class", "uses_torch", "Workload", "KINDS"]

KINDS = {
    "sd": ("sd", "SDWorkload"),
    "whisper": ("whisper", "WhisperWorkload"),
    "resnet50": ("resnet", "ResNetWorkload"),
    "ceilings": ("ceilings", "CeilingsWorkload"),  # the hardware-ceilings experiment's tests
}
_ALIASES = {"stable-diffusion": "sd", "resnet": "resnet50", "resnet-50": "resnet50"}


def uses_torch(kind: str, params: dict[str, Any]) -> bool:
    """False for a workload that measures nothing real (the simulated box's hardware ceilings)."""
    return not (_ALIASES.get(kind, kind) == "ceilings" and params.get("simulated") is not None)


def workload_class(kind: str) -> type[Workload]:
    """The class of workload ``kind`` (aliases accepted; imports its module, not its libraries)."""
    k = _ALIASES.get(kind, kind)
    if k not in KINDS:
        raise WorkerError(f"unknown workload kind {kind!r} (known: {', '.join(KINDS)})")
    import importlib

    mod_name, cls_name = KINDS[k]
    return getattr(importlib.import_module(f".{mod_name}", __name__), cls_name)


def load_workload(kind: str, params: dict[str, Any], device: str | None = None) -> Workload:
    """Load the model of workload ``kind`` once; raises ModelSourceError / WorkerError."""
    return workload_class(kind)(params, device)
