"""One workload worker process: ``python -m mi300x_cert.worker`` (started by :mod:`mi300x_cert.launcher`).

Reads its spec as one JSON line on stdin::

    {"proc": 0, "card": 12, "device": "cpu"|"cuda"|"auto", "kind": <a workload kind>|"debug",
     "params": {...workload params...}, "warmup_batches": 1,
     "plan": {"mode": "fixed", "batch_size": 8, "n_batches": 64}          # or "batch_sizes": [..]
           | {"mode": "duration", "batch_size": 1, "min_s": 10.0}}        # repeat until min_s passed (>= 1 batch)

loads the workload (answers ``loaded`` with its conditions), runs the warm-up batches (reported as rows with ``warmup: true``; the
statistics exclude them), answers ``ready``, waits for ``go``, runs the plan (``batch_start`` and
``row`` per batch) and ends with ``done`` — or ``error`` with a reason and a non-zero exit.

The launcher keeps the worker's stdin open for the worker's whole life; end of file on stdin means
the launcher is gone (killed, even with SIGKILL), and the worker exits at once (code 5) instead of
living on as an orphan that holds its card.

The protocol stream is the process's original stdout; anything a library prints goes to stderr.

Device: ``cuda`` when the spec says ``cuda`` or ``auto`` and ``torch.cuda.is_available()`` (ROCm
builds of torch answer through the same API), else ``cpu``. An explicit ``cuda`` on a machine
where torch sees no GPU is an error (a certification must not silently measure the CPU).

The ``debug`` workload (no model, no torch — like the random backend of MLPerf harnesses) sleeps
for a modelled latency and can crash, hang or fail to load on purpose; it tests the harness.
``MI300X_CERT_WORKLOAD=debug`` substitutes it for every kind (params from
``MI300X_CERT_DEBUG_PARAMS``, a JSON object, merged over the defaults).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, TextIO

__all__ = ["DebugWorkload", "resolve_device", "main"]


class DebugWorkload:
    """A workload without a model: batch latency = ``latency_s + per_item_s * batch_size``.

    Faults (for tests), applied only to ``only_procs`` when given: ``fail_load`` (reason string),
    ``crash_at`` / ``hang_at`` (measured batch index), ``load_s`` (sleep while loading),
    ``connect_to`` (``"host:port"``: a TCP connection opened while loading and held until the
    worker ends — a workload that talks to the network, for the network verdict's tests).
    """

    DEFAULTS: dict[str, Any] = {"latency_s": 0.005, "per_item_s": 0.001, "overhead_s": 0.001,
                                "tokens_per_item": 0, "load_s": 0.0, "fail_load": None,
                                "crash_at": None, "hang_at": None, "only_procs": None, "connect_to": None}

    def __init__(self, params: dict, device: str, proc: int = 0, kind: str = "debug"):
        self.p = {**self.DEFAULTS, **{k: v for k, v in params.items() if k in self.DEFAULTS}}
        if kind == "whisper" and not self.p["tokens_per_item"]:
            self.p["tokens_per_item"] = int(params.get("new_tokens", 4))
        self.kind = kind
        self.device = device
        faulty = self.p["only_procs"] is None or proc in self.p["only_procs"]
        if not faulty:
            self.p.update(fail_load=None, crash_at=None, hang_at=None, connect_to=None)
        self._sock = None
        if self.p["connect_to"]:
            import socket

            host, _, port = str(self.p["connect_to"]).rpartition(":")
            self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        time.sleep(float(self.p["load_s"]))
        if self.p["fail_load"]:
            raise RuntimeError(f"debug workload: {self.p['fail_load']}")

    def conditions(self) -> dict:
        return {"model": f"debug:{self.kind}", "synthetic": True, "dtype": "none", "path": "debug",
                "scheduler": None, "unet_evals": None, "guidance": None, "attention": None,
                "compile_mode": None, "backend": "debug", "note": "debug workload: sleeps, no model",
                "virtual_card": os.environ.get("MI300X_CERT_VIRTUAL_CARD")}

    def warmup(self, batch_size: int) -> float:
        return self.run_batch(batch_size, -1)["latency_s"]

    def run_batch(self, batch_size: int, batch_index: int) -> dict:
        if self.p["crash_at"] is not None and batch_index == int(self.p["crash_at"]):
            print(f"debug workload: crash at batch {batch_index}", file=sys.stderr, flush=True)
            os._exit(3)
        if self.p["hang_at"] is not None and batch_index == int(self.p["hang_at"]):
            print(f"debug workload: hanging at batch {batch_index}", file=sys.stderr, flush=True)
            time.sleep(10 ** 6)
        lat = float(self.p["latency_s"]) + float(self.p["per_item_s"]) * batch_size
        t0 = time.perf_counter()
        time.sleep(lat)
        compute = time.perf_counter() - t0
        time.sleep(float(self.p["overhead_s"]))
        total = time.perf_counter() - t0
        out = {"latency_s": compute, "latency_overhead_s": total, "items": batch_size}
        if self.p["tokens_per_item"]:
            out["tokens"] = int(self.p["tokens_per_item"]) * batch_size
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def resolve_device(requested: str) -> str:
    """``cuda`` when requested (or ``auto``) and torch sees a GPU, else ``cpu`` (see module doc)."""
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("the profile asks for device 'cuda' but torch sees no GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                           f"ROCR_VISIBLE_DEVICES={os.environ.get('ROCR_VISIBLE_DEVICES')!r})")
    return "cpu"


def _compute_backend(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    hip = getattr(torch.version, "hip", None)
    return f"rocm-{hip}" if hip else f"cuda-{torch.version.cuda}"


def _batch_sizes(plan: dict) -> list[int]:
    if "batch_sizes" in plan:
        return [int(b) for b in plan["batch_sizes"]]
    return [int(plan["batch_size"])] * int(plan.get("n_batches", 1))


EXIT_PARENT_GONE = 5


class _ParentWatch:
    """Reads the launcher's lines on a daemon thread; end of file (the launcher died) ends the process.

    ``readline()`` returns the next line, like a file's.
    """

    def __init__(self, stream: TextIO):
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._stream = stream
        threading.Thread(target=self._read, name="parent-watch", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._stream:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        print("worker: stdin closed, the launcher is gone; exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_PARENT_GONE)

    def readline(self) -> str:
        return self._lines.get()


class _Proto:
    def __init__(self, stream: TextIO):
        self.stream = stream

    def send(self, kind: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"type": kind, **fields}, default=str) + "\n")
        self.stream.flush()


def _load(spec: dict, proto: _Proto) -> tuple[Any, str]:
    kind = str(spec.get("kind", "debug"))
    params = dict(spec.get("params") or {})
    proc = int(spec.get("proc", 0))
    from .workloads import load_workload, uses_torch

    # the debug workload stands in for every model; a modelled workload (no torch) runs as itself
    if kind == "debug" or (os.environ.get("MI300X_CERT_WORKLOAD") == "debug" and uses_torch(kind, params)):
        extra = json.loads(os.environ.get("MI300X_CERT_DEBUG_PARAMS") or "{}")
        device = "cpu" if spec.get("device", "auto") in ("cpu", "auto") else "cuda"
        return DebugWorkload({**params, **extra}, device, proc=proc, kind=kind), device
    if not uses_torch(kind, params):  # a modelled workload: no torch in this process
        return load_workload(kind, params, "cpu"), "cpu"
    device = resolve_device(str(spec.get("device", "auto")))
    import torch

    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("MI300X_CERT_CPU_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1))

    return load_workload(kind, params, device), device


def run(spec: dict, proto: _Proto, stdin: TextIO) -> int:
    t_spawn = time.time()
    wl, device = _load(spec, proto)
    try:
        conditions = dict(wl.conditions() or {})
        conditions.setdefault("device", device)
        if "backend" not in conditions or conditions["backend"] is None:
            conditions["backend"] = _compute_backend(device)
        proto.send("loaded", device=device, conditions=conditions, load_s=time.time() - t_spawn)
        plan = dict(spec.get("plan") or {})
        mode = plan.get("mode", "fixed")
        sizes = [int(plan["batch_size"])] if mode == "duration" else _batch_sizes(plan)
        for bs in dict.fromkeys(sizes):  # distinct batch sizes, in order: compile once per shape
            for i in range(int(spec.get("warmup_batches", 1))):
                t_start = time.time()
                secs = float(wl.warmup(bs))
                proto.send("row", warmup=True, batch_index=i, batch_size=bs, t_start=t_start, t_end=time.time(),
                           latency_s=secs, latency_overhead_s=secs, items=bs)
        proto.send("ready", device=device, conditions=conditions, load_s=time.time() - t_spawn, pid=os.getpid())
        line = stdin.readline()
        if line.strip() != "go":
            print(f"worker: expected 'go', got {line.strip()!r}; exiting", file=sys.stderr)
            return 4
        t_go = time.time()
        index = 0
        while True:
            if mode == "duration":
                if index > 0 and time.time() - t_go >= float(plan.get("min_s", 0)):
                    break
                bs = int(plan["batch_size"])
            else:
                if index >= len(sizes):
                    break
                bs = sizes[index]
            proto.send("batch_start", batch_index=index, batch_size=bs, t=time.time())
            t_start = time.time()
            timings = dict(wl.run_batch(bs, index))
            t_end = time.time()
            proto.send("row", warmup=False, batch_index=index, batch_size=bs, t_start=t_start, t_end=t_end, **timings)
            index += 1
        proto.send("done", batches=index, elapsed_s=time.time() - t_go)
        return 0
    finally:
        try:
            wl.close()
        except Exception:  # closing must not hide the real outcome
            traceback.print_exc()


def main() -> int:
    # keep the protocol stream private: fd 1 becomes stderr for every library in this process
    proto_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto = _Proto(proto_stream)
    try:
        line = sys.stdin.readline()
        if not line.strip():
            raise RuntimeError("no spec on stdin")
        spec = json.loads(line)
        return run(spec, proto, _ParentWatch(sys.stdin))
    except Exception as e:
        traceback.print_exc()
        reason = f"{type(e).__name__}: {e}"
        try:
            proto.send("error", reason=reason)
        except OSError:
            pass
        print(reason, file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown (torch/inductor atexit work can take seconds); every message and
    # result has been flushed and the workload closed by now
    os._exit(code)
