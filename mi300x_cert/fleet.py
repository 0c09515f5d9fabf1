"""The fleet: which servers are recertified, with which profile, on which schedule, and who is alerted.

``include/fleet.yaml`` (or ``$MI300X_CERT_FLEET``) is validated into :class:`Fleet`. A bad file raises
one :class:`~mi300x_cert.errors.ProfileError` naming the file and the field
(e.g. ``servers.1.schedule``). :func:`load_fleet` then checks every server against its profile: the
fleet's ``cards`` must be the profile's ``host.cards`` and every card group must name cards the host
has; all disagreements are one ProfileError naming both files and both fields. This module imports
only PyYAML and pydantic: the Airflow DAG files read it at parse time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import INCLUDE_DIR, _format_pydantic, _ranges, resolve_groups
from .errors import CertError, ProfileError

__all__ = ["AlertSpec", "DriftSpec", "Server", "Fleet", "load_fleet", "check_profiles", "fleet_path", "DEFAULT_FLEET",
           "fleet_or_none", "required_suites", "planned_experiments"]

DEFAULT_FLEET = INCLUDE_DIR / "fleet.yaml"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CONN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# libyaml's safe loader when PyYAML was built with it: same documents, about 5x faster (the DAG files
# load the fleet at every parse)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlertSpec(_Strict):
    """Who hears about a failed expectation. An alert record is always written; these add notifications."""

    email: list[str] = Field(default_factory=list)
    smtp_conn_id: str = "smtp_default"
    slack_conn_id: str | None = None

    @field_validator("email")
    @classmethod
    def _emails(cls, v: list[str]) -> list[str]:
        for addr in v:
            if not _EMAIL_RE.match(addr):
                raise ValueError(f"{addr!r} is not an e-mail address")
        return v

    @field_validator("smtp_conn_id", "slack_conn_id")
    @classmethod
    def _conn(cls, v: str | None) -> str | None:
        if v is not None and not _CONN_RE.match(v):
            raise ValueError(f"{v!r} is not a valid Airflow connection id")
        return v


class DriftSpec(_Strict):
    """Drift warning thresholds of the fleet registry (:class:`mi300x_cert.registry.DriftRule`)."""

    slower_pct: float = Field(5.0, gt=0, description="SD s/image at least this % above the reference")
    hotter_c: float = Field(5.0, gt=0, description="junction p95 / memory max at least this many °C hotter")
    min_fleet_cards: int = Field(3, ge=1, description="serials of the SKU needed for a fleet median")

    def rule(self):
        from .registry.drift import DriftRule

        return DriftRule(**self.model_dump())


class Server(_Strict):
    name: str
    profile: str
    sku: str
    cards: int = Field(gt=0, le=256, description="GPU cards; the host's pool has one slot per card")
    valid_days: int | None = Field(None, gt=0, le=3650,
                                   description="days a certification stays valid (registry default 30)")
    card_groups: dict[str, list[int] | str] = Field(default_factory=dict)
    schedule: str | None = None
    alerts: AlertSpec = Field(default_factory=AlertSpec)
    queue: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must be lower-case letters, digits and '-' (it names a DAG, queue and pool)")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is None:
            return v
        fields = v.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9*/,\-A-Za-z?]+", f) for f in fields):
            raise ValueError(f"{v!r} is not a 5-field cron expression (e.g. '0 3 * * *')")
        return v

    @model_validator(mode="after")
    def _groups(self) -> "Server":
        # syntax only here; which cards the host has is checked against its profile in load_fleet
        self.card_groups = resolve_groups(self.card_groups, None, "card_groups")  # type: ignore[assignment]
        if self.queue is None:
            self.queue = f"gpu-{self.name}"
        return self

    @property
    def dag_id(self) -> str:
        return f"recertify_{self.name}"

    @property
    def pool(self) -> str:
        return f"gpu-{self.name}"

    @property
    def card_ids(self) -> list[int]:
        return list(range(self.cards))


class Fleet(_Strict):
    servers: list[Server] = Field(min_length=1)
    drift: DriftSpec | None = None
    source_file: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> "Fleet":
        seen: set[str] = set()
        for s in self.servers:
            if s.name in seen:
                raise ValueError(f"server name {s.name!r} appears twice")
            seen.add(s.name)
        return self

    def server(self, name: str) -> Server:
        for s in self.servers:
            if s.name == name:
                return s
        raise ProfileError(f"{self.source_file}: host {name!r} is not in the fleet (hosts: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.servers]

    def registry_hosts(self) -> list[dict]:
        """The hosts as the fleet registry's ``fleet()`` / ``audit_expiry()`` take them."""
        return [{"name": s.name, "sku": s.sku, "profile": s.profile, "valid_days": s.valid_days}
                for s in self.servers]

    def drift_rule(self):
        """The registry's drift rule: the file's ``drift:`` block, else the defaults."""
        return (self.drift or DriftSpec()).rule()

    def card_groups(self) -> dict[str, list[int]]:
        """Every named card group of the fleet, in file order (the union offered by the trigger forms)."""
        out: dict[str, list[int]] = {}
        for s in self.servers:
            for gname, cards in s.card_groups.items():
                out.setdefault(gname, list(cards))  # type: ignore[arg-type]
        return out

    def group_hosts(self) -> dict[str, list[str]]:
        """Card group name → the hosts that have a group of that name, in file order."""
        out: dict[str, list[str]] = {}
        for s in self.servers:
            for gname in s.card_groups:
                out.setdefault(gname, []).append(s.name)
        return out


def fleet_path() -> Path:
    return Path(os.environ.get("MI300X_CERT_FLEET") or DEFAULT_FLEET)


def load_fleet(path: str | Path | None = None) -> Fleet:
    """Load and validate the fleet file. Raises ProfileError naming the file and the bad field."""
    p = Path(path) if path else fleet_path()
    if not p.is_file():
        raise ProfileError(f"fleet file {p} not found")
    try:
        data = yaml.load(p.read_text(), Loader=_SafeLoader) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: top level must be a mapping with 'servers', got {type(data).__name__}")
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"{p}: {_format_pydantic(e)}") from None
    fleet.source_file = str(p)
    check_profiles(fleet)
    return fleet


def check_profiles(fleet: Fleet) -> None:
    """Every server agrees with its profile: ``cards`` = the profile's ``host.cards``, and every card
    group names only cards the host has. Raises one ProfileError naming the fleet file, the profile
    file and the fields of every disagreement (all servers at once)."""
    from .config import load_profile

    src = fleet.source_file or "fleet"
    cache: dict[str, Any] = {}
    problems: list[str] = []
    for i, s in enumerate(fleet.servers):
        where = f"servers.{i} ({s.name})"
        if s.profile not in cache:
            try:
                cache[s.profile] = load_profile(s.profile)
            except CertError as e:
                cache[s.profile] = e
        prof = cache[s.profile]
        if isinstance(prof, CertError):
            problems.append(f"{where}.profile: {prof}")
            continue
        pfile = prof.source_file or s.profile
        fleet_ids = list(range(s.cards))
        prof_ids = list(prof.host.card_ids)
        if fleet_ids != prof_ids:
            problems.append(f"{where}.cards = {s.cards} but its profile {pfile} has host.cards = "
                            f"{len(prof_ids)} (cards {_ranges(prof_ids)}): make them agree")
        have = [c for c in fleet_ids if c in prof_ids]
        for gname, cards in s.card_groups.items():
            bad = [c for c in cards if c not in have]  # type: ignore[union-attr]
            if bad:
                problems.append(f"{where}.card_groups {gname!r}: unknown card id(s) {bad}: the host has cards "
                                f"{_ranges(have) if have else '(none)'}"
                                + ("" if fleet_ids != prof_ids else f" ({pfile} host.cards)"))
    if problems:
        raise ProfileError(f"{src} disagrees with the profiles: " + "; ".join(problems))


def fleet_or_none() -> Fleet | None:
    """The fleet file, or None (logged) where there is none or it cannot be read: the control plane's
    optional knowledge of its hosts (alert recipients, valid days, the drift rule, required suites)."""
    import logging

    try:
        return load_fleet()
    except CertError as e:
        logging.getLogger(__name__).warning("fleet file unreadable: no notifications, default drift rule, "
                                            "no fleet-required suites (%s)", e)
        return None


def required_suites(fleet: Fleet | None, host: str | None,
                    experiments: list[str] | None = None) -> tuple[list[str], str] | None:
    """``(suites, why)``: the suites a certification of ``host`` must have evaluated and passed, by the
    profile the fleet assigns that host (not the profile the run itself stored, which the host wrote):
    the suites of every experiment that profile enables, and ``network`` when any is enabled.
    ``experiments``: the experiments the run was meant to cover (a DAG run's conf, else the plan
    recorded in its ``conditions.json``), limiting the requirement to those. None where the fleet names no profile for the host (no fleet file, host not
    in it): the caller keeps the run's own profile as the judge."""
    if fleet is None or not host:
        return None
    server = next((s for s in fleet.servers if s.name == host), None)
    if server is None:
        return None
    from .config import load_profile
    from .experiments import all_experiments

    prof = load_profile(server.profile)  # load_fleet checked it loads
    chosen = set(experiments) if experiments is not None else None
    suites: list[str] = []
    for exp in all_experiments():
        if exp.enabled(prof) and (chosen is None or exp.name in chosen):
            suites += [s for s in exp.suites if s not in suites]
    if suites:
        suites.append("network")
    why = f"the fleet profile {server.profile!r} of host {host}" + (
        f" (experiments chosen for the run: {', '.join(sorted(chosen))})" if chosen is not None else "")
    return suites, why


def planned_experiments(conditions: Any) -> list[str] | None:
    """The experiments a run was planned with, as ``prepare_run`` recorded them in ``conditions.json``
    (``enabled_experiments``, the trigger's selection included); None when not recorded."""
    v = conditions.get("enabled_experiments") if isinstance(conditions, dict) else None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    return None
