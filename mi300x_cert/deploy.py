"""How a GPU server joins the fleet as an Airflow Edge worker: its queue, pool, slots, command and env.

One GPU server = one ``airflow edge worker`` serving the queue ``gpu-<host>`` with as many slots as
the host has cards, and one Airflow pool ``gpu-<host>`` of the same size. The compose file, the
systemd unit and ``docs/deployment.md`` show the same command; ``tests/unit/test_deploy_files.py``
checks that they agree with :func:`worker_command_template`.

Usage::

    python -m mi300x_cert.deploy worker-command HOST [--slots N]   # the start command for HOST
    python -m mi300x_cert.deploy worker-env HOST --api-url URL      # its environment file
    python -m mi300x_cert.deploy pools                              # `airflow pools set` lines for the fleet

Nothing here imports Airflow.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from .errors import ProfileError as ConfigError  # a malformed fleet entry is a ProfileError

__all__ = [
    "EDGE_EXECUTOR",
    "EXECUTORS",
    "queue_name",
    "pool_name",
    "validate_host",
    "worker_command",
    "worker_command_line",
    "worker_command_template",
    "worker_env",
    "fleet_hosts",
    "pool_commands",
    "main",
]

EDGE_EXECUTOR = "airflow.providers.edge3.executors.EdgeExecutor"
#: the control plane's executor setting: control-plane tasks local, GPU tasks on Edge workers
EXECUTORS = f"LocalExecutor,{EDGE_EXECUTOR}"

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_host(host: str) -> str:
    """A fleet host name usable in a queue, a pool, a DAG id and a systemd instance name."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise ConfigError(f"host name {host!r} must be 1-63 characters of letters, digits, '.', '_' or '-'")
    return host


def queue_name(host: str) -> str:
    """The Airflow queue of one GPU server's tasks."""
    return f"gpu-{validate_host(host)}"


def pool_name(host: str) -> str:
    """The Airflow pool of one GPU server (size = its card count)."""
    return f"gpu-{validate_host(host)}"


def _slots(slots: int) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or slots <= 0:
        raise ConfigError(f"slots {slots!r} must be a positive integer (the host's card count)")
    return slots


def worker_command(host: str, slots: int, airflow: str = "airflow") -> list[str]:
    """argv of the Edge worker for ``host``: its own queue, one slot per card, its name as hostname.

    The hostname (``-H``) is what the task instances' ``hostname`` and the Edge job table show.
    """
    return [airflow, "edge", "worker", "-q", queue_name(host), "-c", str(_slots(slots)), "-H", validate_host(host)]


def worker_command_line(host: str, slots: int, airflow: str = "airflow") -> str:
    return shlex.join(worker_command(host, slots, airflow))


def worker_command_template(host_var: str = "${HOST}", slots_var: str = "${SLOTS}") -> str:
    """The command with placeholders, as written in the compose file, the systemd unit and the docs."""
    return f"airflow edge worker -q gpu-{host_var} -c {slots_var} -H {host_var}"


def worker_env(api_url: str, jwt_secret: str | None = None, *, dags_folder: str | None = None,
               run_root: str | None = None, fleet: str | None = None) -> dict[str, str]:
    """Environment of an Edge worker. ``api_url`` is the control plane's base URL (``https://airflow.example``).

    The JWT secret is never defaulted: pass it (checked to be 64+ bytes), or leave it out to get a
    placeholder the operator replaces with the control plane's secret.
    """
    base = api_url.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base):
        raise ConfigError(f"api_url {api_url!r} must be an http(s) URL of the Airflow API server")
    if jwt_secret is not None and len(jwt_secret.encode()) < 64:
        raise ConfigError("jwt_secret must be at least 64 bytes (the same AIRFLOW__API_AUTH__JWT_SECRET as the control plane)")
    env = {
        "AIRFLOW__CORE__EXECUTOR": EXECUTORS,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__EDGE__API_ENABLED": "True",
        "AIRFLOW__EDGE__API_URL": f"{base}/edge_worker/v1/rpcapi",
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret if jwt_secret is not None else "<same 64+ byte secret as the control plane>",
        "MI300X_CERT_GPU_EXECUTOR": "EdgeExecutor",
    }
    if dags_folder:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = dags_folder
    if run_root:
        env["MI300X_CERT_RUN_ROOT"] = run_root
    if fleet:
        env["MI300X_CERT_FLEET"] = fleet
    return env


def fleet_hosts(path: str | Path | None = None) -> dict[str, int]:
    """``{host: card count}`` from the fleet file (``include/fleet.yaml`` or ``$MI300X_CERT_FLEET``)."""
    from .fleet import load_fleet

    return {validate_host(s.name): s.cards for s in load_fleet(path).servers}


def _fleet_cards(host: str, path: str | Path | None) -> int:
    hosts = fleet_hosts(path)
    if host not in hosts:
        raise ConfigError(f"host {host!r} is not in the fleet file (hosts: {', '.join(hosts)})")
    return hosts[host]


def pool_commands(path: str | Path | None = None) -> list[list[str]]:
    """``airflow pools set gpu-<host> <cards> ...`` for every fleet host (what airflow-init runs)."""
    return [["airflow", "pools", "set", pool_name(h), str(n), f"GPU cards of {h}"]
            for h, n in fleet_hosts(path).items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mi300x_cert.deploy", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("worker-command", help="the Edge worker start command of a fleet host")
    c.add_argument("host")
    c.add_argument("--slots", type=int, help="defaults to the host's card count in the fleet file")
    c.add_argument("--fleet")
    e = sub.add_parser("worker-env", help="environment file of a fleet host's Edge worker")
    e.add_argument("host")
    e.add_argument("--api-url", required=True)
    e.add_argument("--fleet")
    p = sub.add_parser("pools", help="`airflow pools set` commands for every fleet host")
    p.add_argument("--fleet")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "worker-command":
            slots = args.slots if args.slots is not None else _fleet_cards(args.host, args.fleet)
            print(worker_command_line(args.host, slots))
        elif args.cmd == "worker-env":
            env = worker_env(args.api_url)
            env.update({"HOST": args.host, "SLOTS": str(_fleet_cards(args.host, args.fleet))})
            for k, v in env.items():
                print(f"{k}={v}")
        else:
            for cmd in pool_commands(args.fleet):
                print(shlex.join(cmd))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
