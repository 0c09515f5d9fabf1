"""Typed building blocks of a profile that the experiment plugins share: strict models, the
section every experiment's profile section extends, compile settings and ``BxN`` batch configs.

A leaf module (pydantic only), so that :mod:`mi300x_cert.config` can build the ``experiments:``
section of a profile from the experiment registry while each plugin owns its own section model.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExperimentSection", "CompileSpec", "BatchConfig", "parse_batch_config", "REPORT_BATCH_CONFIGS",
           "REPORT_PROCESS_COUNTS"]

REPORT_BATCH_CONFIGS = ["1x512", "2x256", "4x128", "8x64", "16x32", "32x16", "64x8", "128x4"]
REPORT_PROCESS_COUNTS = [1, 2, 4, 8, 16]

_BATCH_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


class BatchConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    batch_size: int = Field(gt=0)
    n_batches: int = Field(gt=0)

    @property
    def label(self) -> str:
        return f"{self.batch_size}x{self.n_batches}"

    @property
    def images(self) -> int:
        return self.batch_size * self.n_batches


def parse_batch_config(value: str | BatchConfig) -> BatchConfig:
    if isinstance(value, BatchConfig):
        return value
    m = _BATCH_RE.match(str(value))
    if not m:
        raise ValueError(f"batch config {value!r} is not of the form BxN (e.g. 8x64)")
    b, n = int(m.group(1)), int(m.group(2))
    if b <= 0 or n <= 0:
        raise ValueError(f"batch config {value!r} needs positive numbers")
    return BatchConfig(batch_size=b, n_batches=n)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompileSpec(_Strict):
    enabled: bool = False
    backend: str = "inductor"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "max-autotune"


class ExperimentSection(_Strict):
    """What every experiment's profile section has: ``enabled``, ``timeout_s``, ``warmup_batches``."""

    enabled: bool = True
    timeout_s: float = Field(1800.0, gt=0, description="per worker process")
    warmup_batches: int = Field(1, ge=0)
