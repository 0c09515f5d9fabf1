"""The :class:`Experiment` base class: what each experiment plans, launches and summarizes.

An experiment turns a profile into small JSON-able *cases* (each with a stable ``case_id``), says
which worker processes a case needs (card, batch plan, workload params) and summarizes the rows of
all its cases into statistics tables. Running a case (telemetry, network, launcher, rows) is
shared, in :mod:`mi300x_cert.experiments`. No torch here.
"""

from __future__ import annotations

from typing import Any

from ..config import Profile, resolve_model_source
from ..errors import CardError

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
    """Subclasses set ``name`` (via ``@register``), ``kind`` (workload), ``spec_attr`` and implement
    :meth:`cases`, :meth:`workload_params` and :meth:`summarize`."""

    name: str = "?"
    kind: str = "?"  # workload kind: sd | whisper | resnet50
    spec_attr: str = "?"  # attribute of profile.experiments
    extra_columns: list[str] = []
    phased: bool = False  # idle → load → active → cooldown phases (bare-metal)

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
