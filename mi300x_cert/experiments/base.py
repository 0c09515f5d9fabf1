"""The :class:`Experiment` base class: what each experiment plans, launches and summarizes.

An experiment turns a profile into small JSON-able *cases* (each with a stable ``case_id``), says
which worker processes a case needs (card, batch plan, workload params) and summarizes the rows of
all its cases into statistics tables. Running a case (telemetry, network, launcher, rows) is
shared, in :mod:`mi300x_cert.experiments`. No torch here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CardError

if TYPE_CHECKING:  # the profile module builds its experiments section from this registry
    from ..config import Profile

__all__ = ["Experiment", "ROW_COLUMNS", "CONDITION_COLUMNS", "card_label"]

ROW_COLUMNS = ["experiment", "case_id", "run_id", "repetition", "process_count", "proc", "card", "shared_card",
               "batch_config", "batch_size", "batch_index", "t_start", "t_end", "latency_s", "latency_overhead_s",
               "per_image_s", "per_image_overhead_s", "items", "tokens", "status"]
CONDITION_COLUMNS = ["model", "synthetic", "dtype", "path", "scheduler", "unet_evals", "guidance", "attention",
                     "compile_mode", "device", "backend"]
# after the condition columns, every experiment's rows carry these, then its own extra columns
TAIL_COLUMNS = ["warmup", "network_mode"]


def card_label(cards: list[int]) -> str:
    """``[12,13,14,15]`` → ``"12-15"``; ``[0,2,5,6,7]`` → ``"0_2_5-7"`` (safe in file names)."""
    parts: list[str] = []
    i = 0
    while i < len(cards):
        j = i
        while j + 1 < len(cards) and cards[j + 1] == cards[j] + 1:
            j += 1
        parts.append(str(cards[i]) if j == i else f"{cards[i]}-{cards[j]}")
        i = j + 1
    return "_".join(parts)


class Experiment:
    """One experiment = one plugin. Subclasses set ``name`` (via ``@register``), ``kind`` (the
    workload), ``spec_model`` (the typed profile section ``experiments.<name>``) and implement
    :meth:`cases`, :meth:`workload_params` and :meth:`summarize` (the metric tables under
    ``stats/``, computed once at finalize). An experiment that owns Great Expectations suites names
    them in ``suites`` and builds their frames in :meth:`frame` from its own ``stats/`` tables; its
    report section is :meth:`report_section`; ``fanout`` says how the DAG runs its cases
    (``serial``: one task runs them all; ``mapped``: one mapped task per case). The CLI, the DAGs,
    validation, the trigger form and the report iterate the registry: nothing else names it."""

    name: str = "?"
    kind: str = "?"  # workload kind (mi300x_cert.workloads.KINDS)
    title: str = ""  # human title: DAG descriptions, trigger form, report heading
    spec_model: Any = None  # pydantic model of the profile section experiments.<name>
    extra_columns: list[str] = []
    phased: bool = False  # idle → load → active → cooldown phases (bare-metal)
    suites: tuple[str, ...] = ()  # Great Expectations suites this experiment owns (expectations/<suite>.json)
    fanout: str = "serial"  # serial | mapped (one Airflow task per case)
    task_id: str = ""  # Airflow task id (default: name with '-' → '_')
    form_fields: tuple[str, ...] = ()  # trigger-form fields that apply to it besides host/cards/dtype/model
    report_order: int = 50  # place of its report section (lower first)
    report_title: str = ""  # heading of its report section (default: title)
    shown_tables: tuple[str, ...] = ()  # stats/ tables the report already shows (its section, the thermal summary)
    follows_card_set: bool = False  # the full certification's card set (trigger form) applies to it
    has_model: bool = True  # a model source the trigger form may override

    @property
    def spec_attr(self) -> str:
        """Attribute of ``profile.experiments`` holding this experiment's section."""
        return self.name.replace("-", "_")

    @property
    def dag_task_id(self) -> str:
        return self.task_id or self.name.replace("-", "_")

    def card_fields(self, spec: Any) -> list[tuple[str, Any]]:
        """(field path, card spec) pairs of this experiment's section, checked against the host."""
        cards = getattr(spec, "cards", None)
        return [(f"experiments.{self.name}.cards", cards)] if cards is not None else []

    def card_override(self, cards: Any) -> dict:
        """The section override that points this experiment at ``cards`` (the trigger form's card set)."""
        return {"cards": cards}

    # ---- verdicts and report (read this experiment's stats/ tables; compute nothing) ----------
    def frame(self, suite: str, run_dir: Any, profile: Any, params: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"experiment {self.name} owns no suite {suite!r}")

    def report_section(self, run_dir: Any) -> str | None:
        """HTML of this experiment's report section (None: no section of its own)."""
        return None

    # ---- calibration (mi300x-cert baseline) ------------------------------------------------------
    baseline_policy: dict[str, dict[str, Any]] = {}  # suite → limits of policy (not measured)

    def baseline_frame_params(self, policy: dict) -> dict:
        """Parameters the frames of a reference run are built with."""
        return {}

    def baseline_specs(self, policy: dict) -> list[tuple[str, str, str, str, str, str, bool, dict | None]]:
        """What a reference run calibrates: (suite, parameter, floor|ceiling, margin kind, frame column,
        description, worst is the highest, row selector)."""
        return []

    def utilization_rates(self, run_dir: Any) -> list[dict]:
        """Achieved rates this experiment contributes to the utilization table: dicts with
        ``workload``, ``card``, ``metric`` (``matrix_tflops`` | ``hbm_gbps``), ``achieved``."""
        return []

    # ---- profile ---------------------------------------------------------------------------
    def spec(self, profile: Profile) -> Any:
        return getattr(profile.experiments, self.spec_attr)

    def enabled(self, profile: Profile) -> bool:
        return bool(self.spec(profile).enabled)

    def model_source(self, profile: Profile) -> str:
        return str(getattr(self.spec(profile), "model", None) or profile.sd.model)

    def cards(self, profile: Profile) -> list[int]:
        return profile.cards(getattr(self.spec(profile), "cards", "all"))

    def check(self, profile: Profile) -> None:
        """Validate everything a run needs from the profile (raises ModelSourceError / CardError)."""
        from ..config import resolve_model_source

        resolve_model_source(self.model_source(profile))
        self.cases(profile)

    # ---- planning ----------------------------------------------------------------------------
    def cases(self, profile: Profile) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, rd: Any, profile: Profile) -> list[dict]:
        """The cases of this experiment (``rd`` unused: the plan depends on the profile only)."""
        return self.cases(profile)

    @staticmethod
    def assign_cards(n: int, cards: list[int], procs_per_card: int, what: str) -> list[tuple[int, bool]]:
        """(card, shared) for each of ``n`` processes: the first ``n`` cards, or round-robin sharing
        when ``n`` exceeds the cards and ``procs_per_card`` allows it; else CardError."""
        if not cards:
            raise CardError(f"{what}: the card set is empty")
        if n <= len(cards):
            return [(c, False) for c in cards[:n]]
        per = -(-n // len(cards))
        if per > procs_per_card:
            raise CardError(f"{what}: {n} processes do not fit on cards {cards} ({len(cards)} cards, "
                            f"procs_per_card {procs_per_card}); raise procs_per_card to share cards or drop process count {n}")
        picks = [cards[i % len(cards)] for i in range(n)]
        return [(c, picks.count(c) > 1) for c in picks]

    # ---- running -------------------------------------------------------------------------------
    def workload_params(self, profile: Profile, case: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def worker_plan(self, profile: Profile, case: dict) -> dict:
        return {"mode": "fixed", "batch_size": int(case["batch_size"]), "n_batches": int(case["n_batches"])}

    def worker_specs(self, profile: Profile, case: dict) -> list[dict]:
        spec = self.spec(profile)
        params = self.workload_params(profile, case)
        plan = self.worker_plan(profile, case)
        out = []
        shared = case.get("shared", [False] * len(case["cards"]))
        for proc, card in enumerate(case["cards"]):
            out.append({"proc": proc, "card": int(card), "shared_card": bool(shared[proc]), "device": profile.device,
                        "kind": self.kind, "params": params, "warmup_batches": int(spec.warmup_batches), "plan": plan,
                        "case_id": case["case_id"], "experiment": self.name})
        return out

    def timeout_s(self, profile: Profile, case: dict) -> float:
        return float(self.spec(profile).timeout_s)

    def total_batches(self, profile: Profile, case: dict) -> int | None:
        n = case.get("n_batches")
        return int(n) * len(case["cards"]) if n else None

    def extra_row(self, case: dict, msg: dict) -> dict:
        return {}

    @property
    def columns(self) -> list[str]:
        return ROW_COLUMNS + CONDITION_COLUMNS + TAIL_COLUMNS + list(self.extra_columns)

    # ---- summarizing ---------------------------------------------------------------------------
    def summarize(self, rd: Any, profile: Profile, rows: Any, accelerator: str) -> dict:  # pragma: no cover
        raise NotImplementedError

    def conditions(self, profile: Profile) -> dict:
        """What this experiment's figures/tables were measured under (besides the workload's own)."""
        spec = self.spec(profile)
        return {"model_source": self.model_source(profile), "dtype": profile.dtype, "path": profile.path,
                "device": profile.device, "warmup_batches": spec.warmup_batches, "timeout_s": spec.timeout_s}
