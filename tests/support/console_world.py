"""A small fleet history in a registry, concluded from real signed bundles published to S3.

Two measured variants of the fake run (``tests/fixtures/fake_run.py``: all suites pass / card 13 runs
30 °C hot) are validated (real GX Data Docs) once each; every certification is a copy of one of them
with its own host, run id and start time, its own report, bundle, publish and
:func:`mi300x_cert.register.conclude` — the path a DAG's ``register`` task takes. Used by the console
tests and the browser test.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# (host, run id, started, variant); oldest first per host
HISTORY = [
    ("gpu-node-01", "run-2026-11-20", "2026-11-20T08:00:00+00:00", "ok"),
    ("gpu-node-01", "run-2026-11-24", "2026-11-24T08:00:00+00:00", "ok"),
    ("gpu-node-01", "run-2026-11-28", "2026-11-28T08:00:00+00:00", "hot"),
    ("gpu-node-02", "run-2026-11-27", "2026-11-27T09:00:00+00:00", "ok"),
]
HOT_CARD = 13
HOT_SERIAL = f"SIM{HOT_CARD:04d}"


def _variant(base: Path, name: str) -> Path:
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    from fake_run import make_fake_run

    from mi300x_cert import pipeline

    root = make_fake_run(base / f"variant-{name}", hot_card=HOT_CARD if name == "hot" else None)
    pipeline.validate(root)
    return root


def build_world(base: Path, store: dict, history: list[tuple[str, str, str, str]] = HISTORY) -> list[dict]:
    """Conclude ``history`` into the current registry (``open_registry()``), bundles on ``store``.
    Each host signs with its own key, enrolled here. Returns the conclude() outcomes."""
    from mi300x_cert import pipeline
    from mi300x_cert.bundle import build_bundle
    from mi300x_cert.bundle.keys import generate_key_file, load_signer
    from mi300x_cert.register import conclude
    from mi300x_cert.registry import open_registry
    from mi300x_cert.storage import publish_bundle

    base = Path(base)
    variants = {v: _variant(base, v) for v in sorted({h[3] for h in history})}
    reg = open_registry()
    keys = {}
    for host in sorted({h[0] for h in history}):  # one key, one host
        keys[host] = generate_key_file(base / "keys" / f"{host}.pem")
        reg.enroll_key(host, load_signer(keys[host]).public_pem, by="test")
    outcomes = []
    for host, run_id, started, variant in history:
        run = base / host / run_id
        shutil.copytree(variants[variant], run)
        meta = json.loads((run / "run.json").read_text())
        finished = started.replace("T08:00", "T08:40").replace("T09:00", "T09:40")
        meta.update(run_id=run_id, host=host, started=started, finished=finished)
        (run / "run.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        inv = json.loads((run / "inventory.json").read_text())
        inv["host"] = host
        if host != history[0][0]:  # another server: other GPUs
            for c in inv["cards"]:
                c["serial"] = c["serial"].replace("SIM", "SIB")
        (run / "inventory.json").write_text(json.dumps(inv, indent=2))
        pipeline.report(run)
        uri = publish_bundle(build_bundle(run, key=keys[host]), store)
        outcomes.append(conclude(bundle=uri, host=host, run_id=run_id, dag_id=f"recertify_{host}", store=store,
                                 notify=False))
    return outcomes
