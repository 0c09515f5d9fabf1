"""Profiles: what one certification run of one host measures, validated into typed models.

A profile is a YAML file (``include/profiles/<name>.yaml``). Unknown keys and bad values raise
one :class:`~mi300x_cert.errors.ProfileError` that names the file and the field.

Batch configurations follow the reference MI300X validation report's Appendix tables: ``"BxN"`` is a batch of ``B``
images, repeated ``N`` times per process (``1x512`` … ``128x4`` all make 512 images per process;
the per-image latency of ``128x4`` is the batch latency / 128).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CardError, ModelSourceError, ProfileError

__all__ = [
    "REPO_ROOT",
    "INCLUDE_DIR",
    "PROFILES_DIR",
    "MODELS_DIR",
    "BatchConfig",
    "Profile",
    "load_profile",
    "list_profiles",
    "parse_card_spec",
    "parse_batch_config",
    "resolve_groups",
    "resolve_model_source",
    "REPORT_BATCH_CONFIGS",
    "REPORT_PROCESS_COUNTS",
]

REPO_ROOT = Path(os.environ.get("MI300X_CERT_HOME", Path(__file__).resolve().parent.parent))
INCLUDE_DIR = REPO_ROOT / "include"
PROFILES_DIR = INCLUDE_DIR / "profiles"
MODELS_DIR = INCLUDE_DIR / "models"

from .specbase import (  # noqa: E402  (shared with the experiment plugins)
    REPORT_BATCH_CONFIGS,
    REPORT_PROCESS_COUNTS,
    BatchConfig,
    CompileSpec,
    ExperimentSection,
    _Strict,
    parse_batch_config,
)

_ExperimentBase = ExperimentSection


def parse_card_spec(spec: Any, known: list[int] | None = None, groups: dict[str, list[int]] | None = None) -> list[int]:
    """Cards from ``[0,2,5]``, ``"12-15"``, ``"[12-15]"``, ``"0,2,5-7"`` or a group name.

    Raises CardError naming the bad id when ``known`` is given and a card is not in it.
    """
    groups = groups or {}
    cards: list[int] = []
    if isinstance(spec, str) and spec.strip() in groups:
        cards = list(groups[spec.strip()])
    elif isinstance(spec, int) and not isinstance(spec, bool):
        cards = [spec]
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            cards.extend(parse_card_spec(item, None, groups))
    elif isinstance(spec, str):
        text = spec.strip().strip("[]").strip()
        if not text:
            raise CardError(f"empty card set {spec!r}")
        for part in text.split(","):
            part = part.strip().replace("–", "-")
            if not part:
                continue
            if re.fullmatch(r"\d+", part):
                cards.append(int(part))
            elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", part):
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise CardError(f"card range {part!r} runs backwards")
                cards.extend(range(lo, hi + 1))
            else:
                raise CardError(f"card set {spec!r}: {part!r} is neither a card id, a range nor a group name")
    else:
        raise CardError(f"card set {spec!r} is not a list, range or group name")
    seen: list[int] = []
    for c in cards:
        if c not in seen:
            seen.append(c)
    if known is not None:
        bad = [c for c in seen if c not in known]
        if bad:
            raise CardError(f"unknown card id(s) {bad}: this host has cards {_ranges(known)}")
    return seen


def resolve_groups(groups: dict[str, Any], known: list[int] | None, label: str = "group") -> dict[str, list[int]]:
    """Named card groups (each a card spec) resolved against ``known`` cards; a bad one raises
    ValueError naming it (pydantic turns it into one error naming the field). ``known=None`` checks
    the syntax only."""
    resolved: dict[str, list[int]] = {}
    for name, spec in groups.items():
        try:
            resolved[name] = parse_card_spec(spec, known)
        except CardError as e:
            raise ValueError(f"{label} {name!r}: {e}") from None
    return resolved


def _ranges(cards: list[int]) -> str:
    if len(cards) == 1:
        return f"[{cards[0]}]"
    if cards and cards == list(range(cards[0], cards[-1] + 1)):
        return f"[{cards[0]}-{cards[-1]}]"
    return str(cards)


class HostSpec(_Strict):
    name: str = "localhost"
    cards: int | list[int] = 16
    groups: dict[str, list[int] | str] = Field(default_factory=dict)
    xgmi_domains: list[list[int]] | None = None

    @property
    def card_ids(self) -> list[int]:
        return list(range(self.cards)) if isinstance(self.cards, int) else list(self.cards)

    @model_validator(mode="after")
    def _check_groups(self) -> "HostSpec":
        self.groups = resolve_groups(self.groups, self.card_ids, "group")  # type: ignore[assignment]
        return self


class SimulatedSpec(_Strict):
    """Knobs of the simulated backend (a deterministic MI300X-like thermal/power model)."""

    hot_cards: dict[int, float] = Field(default_factory=dict, description="extra °C added to these cards")
    broken_sensor_cards: list[int] = Field(default_factory=list, description="these cards read None for junction temperature")
    throttle_cards: list[int] = Field(default_factory=list, description="these cards report thermal throttling while active")
    time_scale: float = Field(20.0, gt=0, description="thermal time-constant speed-up, so short CPU runs heat up")
    hbm_scale: dict[int, float] = Field(default_factory=dict, description="these cards' memory bandwidth × factor (a weak HBM stack)")
    pcie_width: dict[int, int] = Field(default_factory=dict, description="these cards' host link trained at this width (default x16)")
    power_cap_w: dict[int, float] = Field(default_factory=dict, description="these cards cannot draw more than this many watts under load")


class TelemetrySpec(_Strict):
    backend: Literal["simulated", "amdsmi", "nvml"] = "simulated"
    rate_hz: float = Field(10.0, gt=0, le=100)
    simulated: SimulatedSpec = Field(default_factory=SimulatedSpec)


class NetworkSpec(_Strict):
    mode: Literal["observed", "enforced", "auto"] = "auto"
    rate_hz: float = Field(2.0, gt=0, le=50)
    exclude_interfaces: list[str] = Field(default_factory=lambda: ["lo"])


class _ExperimentsBase(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _experiments_spec() -> type[_ExperimentsBase]:
    """``experiments:`` of a profile: one typed section per registered experiment (each plugin
    owns its section's model; see :mod:`mi300x_cert.experiments`)."""
    from pydantic import create_model

    from .experiments import section_models  # experiment modules import no torch

    fields: dict[str, Any] = {}
    for name, attr, model in section_models():
        fields[attr] = (model, Field(default_factory=model, alias=name))
    return create_model("ExperimentsSpec", __base__=_ExperimentsBase, **fields)


ExperimentsSpec = _experiments_spec()


class SDSpec(_Strict):
    """Stable Diffusion settings shared by bare-metal and sd-throughput."""

    model: str = "synthetic:sd-v1-4"
    height: int = Field(512, gt=0, multiple_of=8)
    width: int = Field(512, gt=0, multiple_of=8)
    steps: int = Field(50, gt=0)
    guidance: float = Field(7.5, ge=0)
    scheduler: Literal["pndm", "ddim", "euler", "dpm++"] = "pndm"
    prompts: str = "include/prompts/prompts.txt"


class Profile(_Strict):
    name: str
    description: str = ""
    sku: str = Field(description="with path: the thresholds set expectations/params/<sku>.yaml (stock) or <sku>-<path>.yaml")
    host: HostSpec = Field(default_factory=HostSpec)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    path: Literal["stock", "optimized"] = "stock"
    attention: Literal["sdpa", "eager"] = "sdpa"
    seed: int = 0
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    sd: SDSpec = Field(default_factory=SDSpec)
    experiments: ExperimentsSpec = Field(default_factory=ExperimentsSpec)
    thresholds: str | None = Field(None, description="explicit thresholds set (defaults to <sku> on the stock path, <sku>-<path> otherwise)")
    source_file: str | None = Field(None, exclude=True)

    @property
    def thresholds_set(self) -> str:
        """The thresholds set judging this profile: ``thresholds`` when given, else ``<sku>`` for the
        stock workload path and ``<sku>-<path>`` for any other (``h100-optimized``). Never a fallback
        from one path's set to another's: a workload path has its own measured baseline."""
        if self.thresholds:
            return self.thresholds
        return self.sku if self.path == "stock" else f"{self.sku}-{self.path}"

    def cards(self, spec: Any) -> list[int]:
        """Resolve a card spec ('all', a group name, a range or a list) against this host."""
        if spec == "all":
            return self.host.card_ids
        return parse_card_spec(spec, self.host.card_ids, self.host.groups)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _check_cards(self) -> "Profile":
        # an unknown card id is a CardError (not a ProfileError) naming the field; pydantic lets
        # non-ValueError exceptions through and load_profile prefixes the file
        from .experiments import all_experiments

        fields: list[tuple[str, Any]] = []
        for exp in all_experiments():
            section = getattr(self.experiments, exp.spec_attr)
            if not getattr(section, "enabled", True):
                continue  # a disabled experiment uses no card: its sets (often defaults) are not this host's concern
            fields += exp.card_fields(section)
        sim = self.telemetry.simulated
        fields += [("telemetry.simulated", [c]) for c in list(sim.hot_cards) + sim.broken_sensor_cards + list(sim.hbm_scale)
                   + list(sim.pcie_width) + list(sim.power_cap_w)]
        for where, spec in fields:
            try:
                self.cards(spec)
            except CardError as e:
                raise CardError(f"{where}: {e}") from None
        return self


def _format_pydantic(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), dict) else ""))
    return "; ".join(parts)


def list_profiles(directory: Path | None = None) -> list[Path]:
    directory = directory or PROFILES_DIR
    return sorted(directory.glob("*.yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_error(e: Exception) -> str:
    """A YAML error on one line: ``line 2, column 1: found character '\\t' that cannot start any token``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


def load_profile(name_or_path: str | Path, overrides: dict | None = None) -> Profile:
    """Load ``include/profiles/<name>.yaml`` (or a path) and apply ``overrides`` (a nested dict).

    Raises ProfileError naming the file and the bad field.
    """
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = PROFILES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(x.stem for x in list_profiles())
        raise ProfileError(f"profile {str(name_or_path)!r} not found (known profiles: {known})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {_yaml_error(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{p}: cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"{p}: {_format_pydantic(e)}") from None
    except CardError as e:
        raise CardError(f"{p}: {e}") from None
    prof.source_file = str(p)
    return prof


def resolve_model_source(source: str) -> tuple[str, Path]:
    """``synthetic:<arch>`` → ('synthetic', include/models/<arch>); a directory → ('local', dir).

    Raises ModelSourceError when the arch is unknown or the directory is missing.
    """
    if source.startswith("synthetic:"):
        arch = source.split(":", 1)[1]
        d = MODELS_DIR / arch
        if not arch or not d.is_dir():
            known = ", ".join(sorted(x.name for x in MODELS_DIR.iterdir() if x.is_dir())) if MODELS_DIR.is_dir() else ""
            raise ModelSourceError(f"unknown synthetic architecture {arch!r} (known: {known})")
        return "synthetic", d
    d = Path(os.path.expanduser(source))
    if not d.is_absolute():
        d = (Path.cwd() / d)
    if not d.is_dir():
        raise ModelSourceError(f"model weights directory {source!r} does not exist")
    if not any(d.iterdir()):
        raise ModelSourceError(f"model weights directory {source!r} is empty")
    return "local", d
