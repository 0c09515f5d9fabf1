"""ResNet-50 image classification workload (transformers ``ResNetForImageClassification``).

One batch = ``batch_size`` seeded random images of ``image_size``² (ImageNet-normalised) → logits →
top-1 class ids on the host. ``latency_s`` is the forward pass (synchronized);
``latency_overhead_s`` adds making the input batch, the host→device copy and the argmax copied back.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ModelSourceError, WorkerError
from .base import Workload, device_sync, seeded_generator

__all__ = ["ResNetWorkload"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetWorkload(Workload):
    kind = "resnet50"
    PRELOAD = ("torch", "transformers:ResNetConfig,ResNetForImageClassification")
    optimizer_alias = "resnet"

    def _load(self) -> None:
        import torch

        p = self.params
        self.image_size = int(p.get("image_size", 224))
        if self.image_size < 32:
            raise WorkerError(f"image_size must be at least 32, got {self.image_size}")
        self.channels_last = bool(p.get("channels_last", False))
        comp = dict(p.get("compile") or {})
        mode = p.get("mode")
        if mode is not None and mode not in ("eager", "compiled"):
            raise WorkerError(f"mode {mode!r} is not one of eager, compiled")
        self.compiled = (mode == "compiled") if mode is not None else bool(comp.get("enabled", False))

        from transformers import ResNetConfig, ResNetForImageClassification

        src = self.source
        d = src.path
        src.require("config.json", what="a ResNet model directory")
        try:
            if src.synthetic:
                cfg = ResNetConfig.from_pretrained(d, local_files_only=True)
                torch.manual_seed(self.seed)
                model = ResNetForImageClassification(cfg)
            else:
                src.require_any(["model.safetensors", "pytorch_model.bin"], what="a ResNet model directory with weights")
                model = ResNetForImageClassification.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelSourceError(f"cannot load ResNet from {src.label!r} ({d}): {e}") from e
        model.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.num_channels = int(model.config.num_channels)
        self.forward = model
        if self.compiled:
            backend = str(comp.get("backend", "inductor"))
            cmode = str(comp.get("mode", "default"))
            self.forward = torch.compile(model, backend=backend, mode=cmode)
            self.compile_mode = f"{backend}:{cmode}"
        self._mean = torch.tensor(IMAGENET_MEAN[: self.num_channels]).view(1, -1, 1, 1)
        self._std = torch.tensor(IMAGENET_STD[: self.num_channels]).view(1, -1, 1, 1)

    def make_inputs(self, batch_size: int, batch_index: int) -> Any:
        """Seeded uniform images, ImageNet-normalised on the host, copied to the device."""
        import torch

        x = torch.rand((batch_size, self.num_channels, self.image_size, self.image_size),
                       generator=seeded_generator(self.seed, batch_index))
        x = (x - self._mean) / self._std
        x = x.to(self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def infer(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.forward(pixel_values=x).logits

    def prepare(self, batch_size: int, batch_index: int) -> Any:
        return self.make_inputs(batch_size, batch_index)

    def compute(self, inputs: Any) -> Any:
        return self.infer(inputs)

    def collect(self, outputs: Any, inputs: Any, batch_size: int) -> dict[str, Any]:
        top1 = outputs.argmax(dim=-1).cpu()
        self.last_top1 = top1.tolist()
        self.last_logits = outputs.float().cpu()
        return {}

    def _work(self) -> dict[str, Any]:
        import torch

        x = torch.zeros((1, self.num_channels, self.image_size, self.image_size), device=self.device, dtype=self.dtype)
        return {"flops_per_item": self.count_flops(lambda: self.model(pixel_values=x)), "per": "image",
                "against": "matrix_tflops"}

    def _conditions(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "mode": "compiled" if self.compiled else "eager",
            "image_size": self.image_size,
            "channels_last": self.channels_last,
            "depths": list(cfg.depths),
            "hidden_sizes": list(cfg.hidden_sizes),
            "num_labels": int(cfg.num_labels),
            "latency_counts": "forward pass",
            "overhead_counts": "input creation + normalisation, host→device copy, argmax → host",
        }
