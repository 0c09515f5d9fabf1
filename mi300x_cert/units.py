"""Temperature units, in one place. Sensors, frames and suites work in °C; what people read shows °F
beside it (the reference MI300X validation report speaks °F). A temperature *difference* converts without the +32 offset:
1 °C of difference is 1.8 °F."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["c_to_f", "f_to_c", "dc_to_df", "format_c", "format_dc"]


def c_to_f(c: Any) -> Any:
    """°C → °F (a number, numpy array or pandas Series)."""
    return c * 9 / 5 + 32


def f_to_c(f: Any) -> Any:
    """°F → °C."""
    return (f - 32) * 5 / 9


def dc_to_df(dc: Any) -> Any:
    """A difference in °C → the same difference in °F."""
    return dc * 9 / 5


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def format_c(v: Any, missing: str = "") -> str:
    """``51.0 °C (123.8 °F)``; ``missing`` for a value that is not a number."""
    x = _number(v)
    return missing if x is None else f"{x:.1f} °C ({c_to_f(x):.1f} °F)"


def format_dc(v: Any, missing: str = "") -> str:
    """A difference: ``10.0 °C (18.0 °F)``; ``missing`` for a value that is not a number."""
    x = _number(v)
    return missing if x is None else f"{x:.1f} °C ({dc_to_df(x):.1f} °F)"
