"""Per-card telemetry: one backend interface (simulated, amdsmi, nvml) and a background sampler.

```python
with open_backend(profile.telemetry, cards=[0, 1], host_cards=profile.host.card_ids,
                  domains=profile.host.xgmi_domains) as backend:
    backend.devices(); backend.sample()
    sampler = Sampler(backend, telemetry_stream, events_stream, rate_hz=profile.telemetry.rate_hz)
```

The backend is chosen explicitly by ``spec.backend``; vendor libraries are imported when the backend
is entered, never when this package is imported. See ``docs/telemetry.md``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import TelemetryError
from .base import DEVICE_COLUMNS, EVENT_COLUMNS, TELEMETRY_COLUMNS, TelemetryBackend
from .sampler import Sampler

__all__ = [
    "open_backend",
    "Sampler",
    "TELEMETRY_COLUMNS",
    "EVENT_COLUMNS",
    "DEVICE_COLUMNS",
    "TelemetryBackend",
    "BACKENDS",
]

BACKENDS = ("simulated", "amdsmi", "nvml")


def open_backend(spec: Any, cards: list[int] | None = None, host_cards: list[int] | None = None,
                 domains: list[list[int]] | None = None, *, clock: Callable[[], float] | None = None,
                 module: Any = None, state_path: Any = None) -> TelemetryBackend:
    """The backend named by ``spec.backend`` (a :class:`config.TelemetrySpec`), not yet opened.

    Use it as a context manager: ``with open_backend(spec, ...) as backend:``. ``cards`` limits the
    cards sampled (default: all); ``host_cards`` is the host's card list (sizes the simulated box);
    ``domains`` are the profile's XGMI domains (used when the hardware reports no topology).
    ``clock`` (simulated: model time) and ``module`` (amdsmi/nvml: a stand-in library) are for tests.
    ``state_path`` (simulated only) carries the thermal state from one backend to the next.
    Raises TelemetryError for an unknown backend name; a library that cannot start raises
    TelemetryError on enter.
    """
    name = getattr(spec, "backend", spec)
    if name == "simulated":
        from .simulated import SimulatedBackend

        return SimulatedBackend(cards, host_cards, domains, clock, sim=getattr(spec, "simulated", None),
                                state_path=state_path)
    if name == "amdsmi":
        from .amdsmi_backend import AmdSmiBackend

        return AmdSmiBackend(cards, host_cards, domains, clock, module=module)
    if name == "nvml":
        from .nvml_backend import NvmlBackend

        return NvmlBackend(cards, host_cards, domains, clock, module=module)
    raise TelemetryError(f"telemetry.backend {name!r} is not one of {', '.join(BACKENDS)}")
