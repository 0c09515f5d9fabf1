"""``mi300x-cert`` command line. Every subcommand is one call into :mod:`mi300x_cert.pipeline`
(or a sibling module), the same functions the Airflow DAGs call.

Exit codes: 0 success / certified, 1 an expectation failed, 2 a CertError (bad input, missing
file, unreachable store, failed verification) or an interruption, 3 an unexpected bug.

SIGTERM (how Airflow, systemd and ``kill`` stop a process) is handled like Ctrl-C (SIGINT): the
running case stops, its workers are killed, the case and the run are marked failed
("interrupted"), and the command exits 2. A second signal while that cleanup runs is ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import EXIT_BUG, EXIT_ERROR, EXIT_FAILED_EXPECTATION, EXIT_OK, CertError

__all__ = ["main", "build_parser", "verify_summary", "EXPERIMENTS"]

EXPERIMENTS = ["bare-metal", "sd-throughput", "whisper", "resnet50"]


def _print(obj) -> None:
    if isinstance(obj, (dict, list)):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(obj)


def cmd_profiles(args) -> int:
    from .config import list_profiles, load_profile

    bad = 0
    paths = [Path(p) for p in args.check] if args.check else list_profiles()
    for p in paths:
        try:
            prof = load_profile(p)
            exps = [n for n in EXPERIMENTS if getattr(prof.experiments, n.replace("-", "_")).enabled]
            from .validation import expectations_dir

            thr = prof.thresholds_set
            have = (expectations_dir() / "params" / f"{thr}.yaml").is_file()
            thr_txt = thr if have else f"{thr} (none yet: `run` works, `certify` is refused until `baseline` makes it)"
            print(f"ok    {p.stem:<12} sku={prof.sku:<8} path={prof.path:<9} backend={prof.telemetry.backend:<9} "
                  f"cards={len(prof.host.card_ids):<3} experiments={','.join(exps)} thresholds={thr_txt}")
        except CertError as e:
            bad += 1
            print(f"ERROR {e}", file=sys.stderr)
    return EXIT_ERROR if bad else EXIT_OK


def cmd_inventory(args) -> int:
    from .inventory import collect_inventory
    from .config import load_profile

    prof = load_profile(args.profile)
    _print(collect_inventory(prof))
    return EXIT_OK


def cmd_run(args) -> int:
    from . import pipeline

    names = EXPERIMENTS if args.experiment == "all" else [args.experiment]
    # a run of one experiment disables the others in the run's profile, so the run can be complete
    overrides = None if args.experiment == "all" else {
        "experiments": {n: {"enabled": False} for n in EXPERIMENTS if n not in names}}
    # measuring needs no thresholds set (a reference run calibrates one); validate/certify do
    run_dir = pipeline.prepare_run(args.profile, args.out, overrides=overrides, run_id=args.run_id,
                                   require_thresholds=False)
    print(f"run directory: {run_dir}", file=sys.stderr)
    from .experiments import run_all

    result = run_all(run_dir, names, progress=not args.quiet)
    _print(result)
    if result.get("state") == "complete":
        print(f"run complete: {run_dir}", file=sys.stderr)
        return EXIT_OK
    print(f"error: run {result.get('state')}: {result.get('error')}", file=sys.stderr)
    return EXIT_ERROR


def cmd_baseline(args) -> int:
    from .validation.baseline import baseline

    out = baseline(args.run_dirs, args.out, policy=args.policy, set_name=args.set_name)
    print(f"thresholds set {out['set']} from {len(out['runs'])} run(s) written to {out['out']}", file=sys.stderr)
    _print(out)
    return EXIT_OK


def cmd_validate(args) -> int:
    from . import pipeline

    verdict = pipeline.validate(args.run_dir, args.suite)
    from .validation import format_verdict

    print(format_verdict(verdict))
    return EXIT_OK if verdict["success"] else EXIT_FAILED_EXPECTATION


def cmd_report(args) -> int:
    from . import pipeline

    print(pipeline.report(args.run_dir))
    return EXIT_OK


def cmd_sign(args) -> int:
    from . import pipeline

    bundle = pipeline.sign(args.run_dir, key=args.key)
    print(bundle)
    try:  # say what was signed: a bundle of an unvalidated or failed run certifies nothing
        pred = json.loads((Path(bundle) / "statement.json").read_text())["predicate"]
        note = ((pred.get("certification") or {}).get("verdict") or {}).get("note")
        dev = ((pred.get("bundle") or {}).get("signer") or {}).get("development_key")
        print(f"signed: result {pred.get('result')}" + (f" ({note})" if note else "")
              + ("; development key: not a production certificate" if dev else ""), file=sys.stderr)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return EXIT_OK


def cmd_publish(args) -> int:
    from . import pipeline

    print(pipeline.publish(args.bundle_dir))
    return EXIT_OK


def cmd_verify(args) -> int:
    from . import pipeline

    result = pipeline.verify(args.target, key=args.key)
    _print(result)
    print(verify_summary(result), file=sys.stderr)
    # 0: the signature and every digest check out. What the bundle certifies is its content, said
    # in the summary line and "result"/"certified" above (docs/certificates.md).
    return EXIT_OK


def verify_summary(result: dict) -> str:
    """One line: the bundle is intact (signer, trust) and what it certifies (PASSED or not)."""
    key = "development key" if result.get("development_key") else f"key {str(result.get('keyid'))[:16]}"
    trust = "trusted" if result.get("trusted") else "NOT a trusted key"
    certified = result.get("certified") and result.get("result") == "PASSED"
    what = (f"CERTIFIED (result {result.get('result')})" if certified else
            f"NOT CERTIFIED (result {result.get('result')}"
            + (f"; failed: {', '.join(map(str, result['failed_tests'][:8]))}" if result.get("failed_tests") else "") + ")")
    return (f"verified: signature and {result.get('artifacts')} artifact digests OK ({key}, {trust}); "
            f"host {result.get('host')} run {result.get('run_id')}: {what}")


def cmd_certify(args) -> int:
    from .certify import certify

    outcome = certify(args.profile, args.out, run_id=args.run_id, progress=not args.quiet,
                      publish=not args.no_publish)
    return EXIT_OK if outcome["certified"] else EXIT_FAILED_EXPECTATION


def cmd_alerts(args) -> int:
    from . import alerts

    if args.ack:
        _print(alerts.acknowledge(args.ack, by=args.by or os.environ.get("USER", "operator"), note=args.note or ""))
        return EXIT_OK
    rows = alerts.list_alerts(include_acknowledged=args.all)
    if not rows:
        print("no alerts" if args.all else "no open alerts")
    for a in rows:
        print(alerts.format_alert(a))
    return EXIT_OK


def cmd_history(args) -> int:
    from .history import cli_history

    return cli_history(args.serial, args.index, as_json=args.json)


def cmd_airflow_smoke(args) -> int:
    from .airflow_local import cli_smoke

    return cli_smoke(args.home, args.out, args.hot_card, as_json=args.json)


def cmd_airflow_standalone(args) -> int:
    from .airflow_local import cli_standalone

    return cli_standalone(args.home, args.port)


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mi300x-cert", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"mi300x-cert {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("profiles", help="list profiles and check them")
    s.add_argument("check", nargs="*", help="profile files to check (default: every include/profiles/*.yaml)")
    s.set_defaults(func=cmd_profiles)

    s = sub.add_parser("inventory", help="host, cards, serials, drivers and library versions")
    s.add_argument("--profile", default="smoke")
    s.set_defaults(func=cmd_inventory)

    s = sub.add_parser("run", help="run one experiment or all into a new run directory")
    s.add_argument("experiment", choices=EXPERIMENTS + ["all"])
    s.add_argument("--profile", required=True)
    s.add_argument("--out", required=True, help="new run directory")
    s.add_argument("--run-id")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("validate", help="run the Great Expectations suites on a run directory")
    s.add_argument("run_dir")
    s.add_argument("--suite", help="one suite (latency, thermal, network, whisper, resnet50); default all")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("baseline", help="derive a thresholds set (params file) from reference runs")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="complete reference runs of one profile")
    s.add_argument("--out", required=True, help="params file to write (e.g. expectations/params/h200.yaml)")
    s.add_argument("--policy", help="params file whose limits of policy (throttle events, sensor readability, "
                                    "recovery margin, network bounds) are copied; default: built-in values")
    s.add_argument("--set", dest="set_name", help="set name (default: the runs' <sku> or <sku>-<path>)")
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("report", help="figures, tables and verdicts as one HTML page")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("sign", help="build the signed bundle of a validated run")
    s.add_argument("run_dir")
    s.add_argument("--key", help="private key PEM (default: configured key, else the local development key)")
    s.set_defaults(func=cmd_sign)

    s = sub.add_parser("publish", help="upload a bundle to S3")
    s.add_argument("bundle_dir")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("verify", help="check a bundle's signature and every digest (dir or s3://…)")
    s.add_argument("target")
    s.add_argument("--key", help="public key PEM")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("certify", help="run → validate → report → sign → publish")
    s.add_argument("--profile", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--run-id")
    s.add_argument("--no-publish", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_certify)

    s = sub.add_parser("alerts", help="list or acknowledge expectation-failure alerts")
    s.add_argument("--all", action="store_true", help="include acknowledged alerts")
    s.add_argument("--ack", metavar="ALERT_ID")
    s.add_argument("--by")
    s.add_argument("--note")
    s.set_defaults(func=cmd_alerts)

    s = sub.add_parser("history", help="certifications of one GPU by serial (no SERIAL: the serials known)")
    s.add_argument("serial", nargs="?", metavar="SERIAL")
    s.add_argument("--index", metavar="DIR", help="history index (default <state dir>/history)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("airflow-smoke", help="run the smoke recertification DAG in a local Airflow home (dag.test)")
    s.add_argument("--home", help="AIRFLOW_HOME to create or reuse (default ./.airflow)")
    s.add_argument("--out", help="directory for run directories (default <home>/mi300x-cert/runs)")
    s.add_argument("--hot-card", type=int, metavar="N", help="make simulated card N run hot (the thermal suite fails)")
    s.add_argument("--json", action="store_true", help="print the whole result as JSON")
    s.set_defaults(func=cmd_airflow_smoke)

    s = sub.add_parser("airflow-standalone", help="airflow standalone with this project's DAGs, plugin and a local S3")
    s.add_argument("--home", help="AIRFLOW_HOME (default ./.airflow)")
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_airflow_standalone)

    s = sub.add_parser("bench", help="stock vs compile recipe vs optimized workloads on a GPU")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)
    return p


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (named after the signal) once; later signals are
    ignored so the cleanup they started (killing workers, marking the run failed) can finish.
    Previous handlers come back on exit. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[str] = []

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if fired:
            print(f"{name}: still cleaning up after {fired[0]}", file=sys.stderr, flush=True)
            return
        fired.append(name)
        raise KeyboardInterrupt(name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        # bench has its own option parser: hand it everything after the subcommand
        # (argparse's REMAINDER drops options that start with "--" after a subcommand).
        args = parser.parse_args(["bench"])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    try:
        with _interruptible():
            return int(args.func(args) or 0)
    except CertError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # a bug, not a user error
        traceback.print_exc()
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
