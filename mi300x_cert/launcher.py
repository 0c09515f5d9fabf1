"""Start N workload workers pinned to cards, release them together, stream their rows back.

Protocol (one JSON object per line; see :mod:`mi300x_cert.worker`)::

    launcher → worker stdin :  <spec JSON>\\n   ...later...   go\\n
    worker → launcher stdout:  {"type": "loaded", "conditions": {...}, "device": ...}
                               {"type": "row", "warmup": true, ...}   (warm-up batches, before ready)
                               {"type": "ready", "conditions": {...}, "device": ..., "load_s": ...}
                               {"type": "batch_start", "batch_index": i, "batch_size": b, "t": ...}
                               {"type": "row", "warmup": false, "latency_s": ..., ...}
                               {"type": "done"}  |  {"type": "error", "reason": "..."}

Every worker is a ``python -m mi300x_cert.worker`` process (prefixed by the network-isolation
argv when isolation is enforced) in its own process group, so a hung worker and anything it
started are killed together. By default workers of model workloads are forked from a preloaded
process that imported the libraries once (:mod:`mi300x_cert.preload`; ``MI300X_CERT_WORKER_START``)
and run the same ``worker.main``; ``WorkerResult.start`` says how each one started. The launcher

* waits until every worker said ``ready`` (load + warm-up; bounded by ``load_timeout_s``), then
  writes ``go`` to all of them (a barrier: measured batches start together);
* bounds each worker's measured run by ``timeout_s`` counted from ``go``; a worker past it is killed
  and reported with reason ``"timeout after <N>s"``;
* treats a worker that exits without ``done`` (or non-zero) as crashed: the rows it sent are kept,
  the reason is its ``error`` message or else the last line it wrote to stderr;
* aborts the whole launch when a worker fails before ``ready`` (the barrier can never complete).

Worker stderr goes to ``<log_dir>/proc<k>.log``. ``on_message(proc_spec, message)`` is called for
every ``loaded``, ``batch_start`` and ``row`` message (from reader threads, serialized by one lock).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["WorkerResult", "LaunchResult", "launch", "pin_env", "worker_argv"]

Message = dict[str, Any]


@dataclass
class WorkerResult:
    proc: int
    card: int | None
    pid: int | None = None
    status: str = "pending"  # ok | failed | timeout | aborted
    reason: str | None = None
    returncode: int | None = None
    rows: int = 0
    warmup_rows: int = 0
    ready_s: float | None = None  # seconds from spawn to ready
    device: str | None = None
    conditions: dict = field(default_factory=dict)
    log: str | None = None
    start: str | None = None  # "preloaded" (forked from the preloader) | "spawned" (and why, if not preloaded)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LaunchResult:
    ok: bool
    workers: list[WorkerResult]
    t_go: float | None
    t_end: float
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "t_go": self.t_go, "t_end": self.t_end,
                "workers": [w.to_dict() for w in self.workers]}


def pin_env(card: int | None, vendor: str, device: str, procs: int, base: dict | None = None) -> dict[str, str]:
    """Environment that pins one worker to ``card``.

    * ``nvidia`` (and the simulated/unknown case): ``CUDA_VISIBLE_DEVICES=<card>``; HIP/ROCR get the
      same id (ignored by CUDA).
    * ``amd``: ROCm filters twice — ``ROCR_VISIBLE_DEVICES`` selects the physical agent, then
      ``HIP_VISIBLE_DEVICES``/``CUDA_VISIBLE_DEVICES`` index the agents left visible — so
      ``ROCR_VISIBLE_DEVICES=<card>`` and ``HIP_VISIBLE_DEVICES=CUDA_VISIBLE_DEVICES=0``.
    * always ``MI300X_CERT_VIRTUAL_CARD=<card>`` (the card a CPU worker stands for) and
      ``OMP_NUM_THREADS`` = cores / processes (at least 1) unless the caller set it, so CPU
      workers do not oversubscribe the host.
    """
    env = dict(os.environ if base is None else base)
    if card is not None:
        c = str(card)
        if device != "cpu":
            if vendor == "amd":
                env.update(ROCR_VISIBLE_DEVICES=c, HIP_VISIBLE_DEVICES="0", CUDA_VISIBLE_DEVICES="0")
            else:
                env.update(CUDA_VISIBLE_DEVICES=c, HIP_VISIBLE_DEVICES=c, ROCR_VISIBLE_DEVICES=c)
        env["MI300X_CERT_VIRTUAL_CARD"] = c
    threads = str(max(1, (os.cpu_count() or 1) // max(1, procs)))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env["MI300X_CERT_CPU_THREADS"] = env["OMP_NUM_THREADS"]
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_argv(argv_prefix: list[str] | None = None) -> list[str]:
    return list(argv_prefix or []) + [sys.executable, "-m", "mi300x_cert.worker"]


class _Worker:
    def __init__(self, spec: dict, popen: subprocess.Popen, log_path: Path | None, log_f):
        self.spec = spec
        self.popen = popen
        self.log_path = log_path
        self.log_f = log_f
        self.result = WorkerResult(proc=int(spec.get("proc", 0)), card=spec.get("card"), pid=popen.pid,
                                   log=str(log_path) if log_path else None)
        self.t_spawn = time.time()
        self.ready = threading.Event()
        self.done = False
        self.error: str | None = None
        self.reader: threading.Thread | None = None
        self.finished = False  # result decided

    def send(self, line: str) -> bool:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            pass

    def last_stderr_line(self) -> str | None:
        if not self.log_path or not self.log_path.exists():
            return None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 8192))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return None
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return lines[-1] if lines else None


def launch(specs: list[dict], argv_prefix: list[str] | None = None, timeout_s: float = 1800.0,
           on_message: Callable[[dict, Message], None] | None = None, *, load_timeout_s: float | None = None,
           log_dir: Path | str | None = None, vendor: str = "virtual", on_go: Callable[[], None] | None = None,
           on_spawn: Callable[[int, dict], None] | None = None, env: dict | None = None,
           poll_s: float = 0.02, start: str | None = None,
           on_preloader: Callable[[int], None] | None = None) -> LaunchResult:
    """Run one worker per spec (each spec: ``proc``, ``card``, ``device``, ``kind``, ``params``,
    ``warmup_batches``, ``plan``); see the module docstring for the protocol and failure handling.

    ``on_go`` runs after every worker is ready and right before ``go`` is sent (e.g. to switch the
    telemetry phase); ``on_spawn(pid, spec)`` lets a network monitor watch each worker.
    ``start``: ``preload`` | ``spawn`` (default ``MI300X_CERT_WORKER_START``, else ``preload``: the
    preloader serves CPU workers of model workloads; ``start="preload"`` passed here forces it).
    ``on_preloader(pid)``: the preloader this launch forks from, as soon as it starts (and for each
    launch that reuses it), so that a network monitor can audit its sockets too.
    """
    load_timeout_s = timeout_s if load_timeout_s is None else load_timeout_s
    log_dir = Path(log_dir) if log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    workers: list[_Worker] = []
    argv = worker_argv(argv_prefix)
    n = len(specs)
    pre, own_pre, start_note = _preloader(specs, argv_prefix, env, vendor, start, load_timeout_s, log_dir,
                                          on_preloader)

    def reader(w: _Worker) -> None:
        assert w.popen.stdout is not None
        for raw in w.popen.stdout:
            line = raw.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library wrote to the protocol stream; ignore
            if not isinstance(msg, dict):
                continue
            kind = msg.get("type")
            if kind == "ready":
                w.result.ready_s = time.time() - w.t_spawn
                w.result.device = msg.get("device")
                w.result.conditions = msg.get("conditions") or {}
                w.ready.set()
            elif kind == "done":
                w.done = True
            elif kind == "error":
                w.error = str(msg.get("reason") or "worker reported an error")
            elif kind in ("row", "batch_start", "loaded"):
                if kind == "row":
                    if msg.get("warmup"):
                        w.result.warmup_rows += 1
                    else:
                        w.result.rows += 1
                if on_message is not None:
                    with lock:
                        try:
                            on_message(w.spec, msg)
                        except Exception as e:  # a sink failure must not kill the reader
                            w.error = w.error or f"launcher could not record a message: {type(e).__name__}: {e}"

    def finish(w: _Worker, status: str | None = None, reason: str | None = None) -> None:
        if w.finished:
            return
        if status is not None:
            w.kill()
        rc = w.popen.wait()
        if w.reader is not None:
            w.reader.join(timeout=10)
        w.result.returncode = rc
        if status is None:
            if getattr(w.popen, "status_lost", False):  # never read as success
                status = "failed"
                reason = "its exit status was lost: the preloader that forked it ended first"
            elif w.done and rc == 0:
                status = "ok"
            else:
                status = "failed"
                reason = w.error or w.last_stderr_line() or f"exited with code {rc} before done"
        w.result.status = status
        w.result.reason = reason
        w.finished = True
        if w.log_f:
            w.log_f.close()

    try:
        for spec in specs:
            proc = int(spec.get("proc", len(workers)))
            log_path = (log_dir / f"proc{proc}.log") if log_dir else None
            log_f = open(log_path, "ab") if log_path else subprocess.DEVNULL
            # a worker that spans cards (peer-to-peer copies) sees every card of the host
            wenv = pin_env(None if spec.get("all_cards_visible") else spec.get("card"), vendor,
                           str(spec.get("device", "auto")), n, base=env)
            popen: Any = None
            how = start_note
            if pre is not None:
                try:
                    popen = pre.spawn(wenv, log_f.fileno() if log_path else None)
                    how = "preloaded"
                except Exception as e:  # the preloader is gone: this worker starts the usual way
                    how = f"spawned (the preloader failed: {e})"
            if popen is None:
                popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_f,
                                         env=wenv, text=True, bufsize=1, start_new_session=True)
            w = _Worker(spec, popen, log_path, log_f if log_path else None)
            w.result.start = how
            workers.append(w)
            w.reader = threading.Thread(target=reader, args=(w,), daemon=True, name=f"worker-reader-{proc}")
            w.reader.start()
            w.send(json.dumps(spec, default=str))
            if on_spawn is not None:
                on_spawn(popen.pid, spec)

        # ---- barrier: every worker ready, or abort ------------------------------------------
        t0 = time.time()
        abort_reason: str | None = None
        while True:
            if all(w.ready.is_set() for w in workers):
                break
            dead = [w for w in workers if not w.ready.is_set() and w.popen.poll() is not None]
            if dead:
                for w in dead:
                    finish(w)
                    if w.result.status == "ok":  # exited cleanly without ever being ready
                        w.result.status, w.result.reason = "failed", "exited before ready"
                d = dead[0]
                abort_reason = f"worker {d.result.proc} (card {d.result.card}) failed before ready: {d.result.reason}"
                break
            if time.time() - t0 > load_timeout_s:
                for w in workers:
                    if not w.ready.is_set():
                        finish(w, "timeout", f"timeout after {load_timeout_s:g}s waiting for ready (load + warm-up)")
                late = [w.result.proc for w in workers if w.result.status == "timeout"]
                abort_reason = f"worker(s) {late} not ready after {load_timeout_s:g}s"
                break
            time.sleep(poll_s)

        if abort_reason is not None:
            for w in workers:
                finish(w, "aborted", f"aborted: {abort_reason}")
            return LaunchResult(False, [w.result for w in workers], None, time.time(), abort_reason)

        if on_go is not None:
            on_go()
        t_go = time.time()
        for w in workers:
            w.send("go")

        # ---- measured run ------------------------------------------------------------------
        deadline = t_go + timeout_s
        while not all(w.finished for w in workers):
            now = time.time()
            for w in workers:
                if w.finished:
                    continue
                if w.popen.poll() is not None:
                    finish(w)
                elif now > deadline:
                    finish(w, "timeout", f"timeout after {timeout_s:g}s")
            time.sleep(poll_s)
        bad = [w.result for w in workers if w.result.status != "ok"]
        reason = None
        if bad:
            reason = "; ".join(f"proc {b.proc} (card {b.card}): {b.reason}" for b in bad)
        return LaunchResult(not bad, [w.result for w in workers], t_go, time.time(), reason)
    finally:
        for w in workers:
            if not w.finished:
                finish(w, "aborted", "aborted: launcher interrupted")
            for s in (w.popen.stdin, w.popen.stdout):
                if s is w.popen.stdout and w.reader is not None and w.reader.is_alive():
                    continue  # something still holds its write end; closing would wait on the blocked read
                try:
                    if s:
                        s.close()
                except OSError:
                    pass
        if own_pre and pre is not None:
            pre.close()


def _preloader(specs: list[dict], argv_prefix: list[str] | None, env: dict | None, vendor: str,
               start: str | None, timeout_s: float, log_dir: Path | None,
               on_start: Callable[[int], None] | None = None) -> tuple[Any, bool, str]:
    """The preloader this launch forks its workers from (``None``: spawn them), whether the launch
    owns it (closes it at the end), and what a spawned worker records as its start."""
    from .preload import START_MODES, Preloader, active_pool, host_refusal, start_mode
    from .workloads import uses_torch

    base = dict(os.environ if env is None else env)
    forced = start is not None
    mode = start if forced else start_mode(base)
    if mode not in START_MODES:
        raise ValueError(f"start={mode!r}: expected one of {', '.join(START_MODES)}")
    if mode == "spawn":
        return None, False, "spawned"
    debug = base.get("MI300X_CERT_WORKLOAD") == "debug"
    kinds = [str(s.get("kind")) for s in specs
             if s.get("kind") != "debug" and not debug and uses_torch(str(s.get("kind")), dict(s.get("params") or {}))]
    pool = active_pool()
    if not forced and not kinds:
        return None, False, "spawned"  # nothing heavy to import: a fresh process is as quick
    if not forced and any(str(s.get("device", "auto")) != "cpu" for s in specs):
        # a GPU worker is always a fresh process: GPU libraries leave threads and driver state at
        # import that a fork does not carry safely (mi300x_cert.preload), and its case runs minutes
        return None, False, "spawned"
    if not forced and pool is None and len(specs) < 2:
        return None, False, "spawned"  # one worker imports once either way
    if host_refusal():
        return None, False, f"spawned (no preloader: {host_refusal()})"
    penv = pin_env(None, vendor, str(specs[0].get("device", "auto")) if specs else "auto", len(specs), base=base)
    log_path = (log_dir / "preloader.log") if log_dir else None
    try:
        if pool is not None:
            pre = pool.get(argv_prefix, penv, kinds, timeout_s, log_path, on_start)
            if on_start is not None:  # every case's monitor (a new preloader was also told as it started)
                on_start(pre.proc.pid)
            return pre, False, "spawned"
        pre = Preloader(argv_prefix, penv, kinds, timeout_s=timeout_s, log_path=log_path, on_start=on_start)
        return pre, True, "spawned"
    except Exception as e:
        return None, False, f"spawned (no preloader: {e})"
