"""Figures 1–7 of the validation report, drawn from a run directory with matplotlib (Agg) + seaborn.

Each ``figure_N(run_dir, out_png)`` returns a :class:`Figure` record. A missing or unusable input
never raises: the PNG becomes a placeholder that says what is missing (``Figure.missing``).

1. network traffic over time (sent/received, external interfaces, active phases shaded)
2. 3-D utilization of every card over time
3. memory use over time, vertical lines at batch starts
4. junction (purple) and memory (pink) temperature per card, small multiples, active cards marked, °C and °F
5. power per card, the activated cards named in the title
6. 3-D surface of median batch latency (process count × batch config)
7. min / median / max batch latency vs batch config, one line set per process count

Figures 6 and 7 draw the sd-throughput experiment's ``stats/sd_throughput_long.csv`` (written at
finalize); 1–5 draw the telemetry, event and network streams over time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..units import c_to_f, f_to_c, format_c

__all__ = ["Figure", "FIGURES", "draw_all", "load_bare_metal"]

JUNCTION_COLOR = "#6a0dad"  # purple
MEMORY_COLOR = "#ff69b4"    # pink
ACTIVE_SHADE = "#ffcc80"
MAX_TIME_BINS = 600


@dataclass
class Figure:
    number: int
    title: str
    caption: str
    path: Path
    missing: str | None = None


class Missing(Exception):
    """An input a figure needs is absent; the message says which."""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _read_glob(run_dir: Path, kind: str, pattern: str):
    """``<run_dir>/<kind>/<pattern>`` CSVs concatenated with a ``stem`` column (the validation
    frames' reader); None when there is no readable row."""
    from ..validation.frames import _read_many

    df = _read_many(run_dir, kind, pattern, [], [])
    return None if df is None or df.empty else df


def load_bare_metal(run_dir: Path) -> dict:
    """Telemetry, events and network of the bare-metal experiment (else of every experiment)."""
    out: dict[str, Any] = {}
    for kind in ("telemetry", "events", "network"):
        df = _read_glob(run_dir, kind, "bare-metal*.csv")
        out[f"{kind}_scope"] = "bare-metal"
        if df is None:
            df = _read_glob(run_dir, kind, "*.csv")
            out[f"{kind}_scope"] = "all experiments"
        out[kind] = df
    t0s = [float(d["t"].min()) for d in (out["telemetry"], out["events"], out["network"]) if d is not None and "t" in d]
    out["t0"] = min(t0s) if t0s else 0.0
    return out


def _active_spans(events, t0: float) -> list[tuple[float, float, list[int]]]:
    if events is None or not {"t", "kind", "phase"}.issubset(events.columns):
        return []
    spans = []
    ph = events[events["kind"].astype(str) == "phase"].sort_values("t")
    rows = ph.to_dict("records")
    for i, r in enumerate(rows):
        if str(r["phase"]) != "active":
            continue
        end = rows[i + 1]["t"] if i + 1 < len(rows) else r["t"]
        spans.append((float(r["t"]) - t0, float(end) - t0, _cards(r.get("cards"))))
    return spans


def _cards(v: Any) -> list[int]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    try:
        parsed = json.loads(str(v))
        if isinstance(parsed, list):
            return [int(x) for x in parsed]
        return [int(parsed)]
    except (ValueError, TypeError):
        return [int(float(x)) for x in str(v).strip("[]").replace(" ", "").split(",") if x]


def _shade(ax, spans) -> None:
    for i, (a, b, _) in enumerate(spans):
        ax.axvspan(a, b, color=ACTIVE_SHADE, alpha=0.35, lw=0, label="active phase" if i == 0 else None)


def _need(df, cols: list[str], what: str):
    if df is None:
        raise Missing(f"{what}: no data file")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise Missing(f"{what}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise Missing(f"{what}: no rows")


def _placeholder(path: Path, number: int, title: str, why: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.axis("off")
    ax.text(0.5, 0.62, f"Figure {number}: {title}", ha="center", va="center", fontsize=12, weight="bold")
    ax.text(0.5, 0.35, f"not drawn — {why}", ha="center", va="center", fontsize=10, color="#b00020", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _active_cards(data: dict) -> list[int]:
    cards: set[int] = set()
    for _, _, cs in _active_spans(data.get("events"), data.get("t0", 0.0)):
        cards |= set(cs)
    return sorted(cards)


def _telemetry(data: dict, cols: list[str], what: str):
    import pandas as pd

    tel = data.get("telemetry")
    _need(tel, ["t", "card"] + cols, what)
    tel = tel.copy()
    tel["time_s"] = tel["t"].astype(float) - data["t0"]
    for c in cols:
        tel[c] = pd.to_numeric(tel[c], errors="coerce")
    return tel


def fig1_network(data: dict, path: Path, plt) -> str:
    import pandas as pd

    net = data.get("network")
    _need(net, ["t", "interface", "d_sent", "d_recv"], "network counters (network/*.csv)")
    net = net[~net["interface"].astype(str).str.startswith("lo")].copy()
    if net.empty:
        raise Missing("network counters: no external (non-loopback) interface was recorded")
    net["time_s"] = (net["t"].astype(float) - data["t0"]).round(1)
    agg = net.groupby("time_s")[["d_sent", "d_recv"]].apply(lambda g: g.apply(pd.to_numeric, errors="coerce").sum())
    fig, ax = plt.subplots(figsize=(10, 4))
    _shade(ax, _active_spans(data.get("events"), data["t0"]))
    ax.plot(agg.index, agg["d_sent"] / 1024, label="sent (KiB)", color="#1f77b4")
    ax.plot(agg.index, agg["d_recv"] / 1024, label="received (KiB)", color="#d62728")
    total = (agg["d_sent"].sum() + agg["d_recv"].sum()) / 1024
    peak = float(max(agg["d_sent"].max(), agg["d_recv"].max())) / 1024 if len(agg) else 0.0
    ax.set_ylim(0, max(1.0, peak * 1.1))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KiB per sample")
    itfs = ", ".join(sorted(net["interface"].astype(str).unique()))
    ax.set_title(f"Network activity on external interfaces ({itfs}); total {total:,.1f} KiB")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{data['network_scope']}; interfaces {itfs}; total sent+received {total:,.1f} KiB"


def _binned(tel, col: str):
    """time × card pivot of ``col`` on at most MAX_TIME_BINS time bins."""
    span = max(float(tel["time_s"].max()), 1e-9)
    width = max(span / MAX_TIME_BINS, 0.1)
    tel = tel.assign(tb=(tel["time_s"] / width).round() * width)
    return tel.pivot_table(index="tb", columns="card", values=col, aggfunc="mean").sort_index()


def fig2_utilization(data: dict, path: Path, plt) -> str:
    import numpy as np

    tel = _telemetry(data, ["util_pct"], "utilization (telemetry util_pct)")
    pv = _binned(tel, "util_pct").interpolate(limit_direction="both").fillna(0)
    X, Y = np.meshgrid(pv.index.to_numpy(float), pv.columns.to_numpy(float))
    fig = plt.figure(figsize=(10, 6))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, pv.to_numpy().T, cmap="viridis", linewidth=0, antialiased=True, rstride=1, cstride=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("card")
    ax.set_zlabel("utilization (%)")
    ax.set_yticks(list(pv.columns))
    active = _active_cards(data)
    ax.set_title(f"GPU utilization across {pv.shape[1]} cards; active cards {active}")
    ax.view_init(elev=30, azim=-60)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{pv.shape[1]} cards, {len(pv)} time bins"


def fig3_memory(data: dict, path: Path, plt) -> str:
    import seaborn as sns

    tel = _telemetry(data, ["mem_used_bytes"], "memory use (telemetry mem_used_bytes)")
    tel["mem_gib"] = tel["mem_used_bytes"] / 2**30
    fig, ax = plt.subplots(figsize=(10, 4.5))
    sns.lineplot(data=tel, x="time_s", y="mem_gib", hue="card", palette="tab20", ax=ax, legend="full", lw=1)
    ev = data.get("events")
    n = 0
    if ev is not None and {"t", "kind"}.issubset(ev.columns):
        starts = ev[ev["kind"].astype(str) == "batch_start"]["t"].astype(float) - data["t0"]
        starts = starts.drop_duplicates().sort_values()
        if len(starts) > 300:
            starts = starts.iloc[:: math.ceil(len(starts) / 300)]
        for x in starts:
            ax.axvline(x, color="#555555", lw=0.5, alpha=0.5)
        n = len(starts)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("memory used (GiB)")
    ax.set_title(f"GPU memory use; vertical lines: {n} batch starts")
    ax.legend(title="card", ncol=2, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{n} batch start markers"


def fig4_temperature(data: dict, path: Path, plt) -> str:
    import numpy as np

    tel = _telemetry(data, ["junction_c", "memory_c"], "temperatures (telemetry junction_c, memory_c)")
    cards = sorted(int(c) for c in tel["card"].unique())
    active = set(_active_cards(data))
    ncol = 4
    nrow = max(1, math.ceil(len(cards) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(12, 2.3 * nrow + 0.6), sharex=True, sharey=True, squeeze=False)
    lo = np.nanmin([tel["junction_c"].min(), tel["memory_c"].min()])
    hi = np.nanmax([tel["junction_c"].max(), tel["memory_c"].max()])
    unreadable = []
    for ax, card in zip(axes.flat, cards):
        g = tel[tel["card"] == card]
        if g["junction_c"].isna().all():
            unreadable.append(card)
        ax.plot(g["time_s"], g["junction_c"], color=JUNCTION_COLOR, lw=1, label="junction")
        ax.plot(g["time_s"], g["memory_c"], color=MEMORY_COLOR, lw=1, label="memory")
        is_active = card in active
        ax.set_title(f"card {card}" + (" — ACTIVE" if is_active else "") +
                     (" — junction unreadable" if card in unreadable else ""),
                     fontsize=8, color="#b00020" if is_active or card in unreadable else "black",
                     weight="bold" if is_active else "normal")
        if is_active:
            ax.set_facecolor("#fff3e0")
        sec = ax.secondary_yaxis("right", functions=(c_to_f, f_to_c))
        sec.tick_params(labelsize=6)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(cards):]:
        ax.axis("off")
    if lo == lo and hi == hi:
        axes[0][0].set_ylim(lo - 2, hi + 2)
    for ax in axes[:, 0]:
        ax.set_ylabel("°C", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("time (s)", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Temperature per card: junction (purple), memory (pink); left axis °C, right axis °F; "
                 f"active cards {sorted(active)}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    jmax = tel["junction_c"].max()
    return (f"max junction {format_c(jmax)}" if jmax == jmax else "no junction reading") + (
        f"; unreadable junction on cards {unreadable}" if unreadable else "")


def fig5_power(data: dict, path: Path, plt) -> str:
    import seaborn as sns

    tel = _telemetry(data, ["power_w"], "power (telemetry power_w)")
    active = _active_cards(data)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _shade(ax, _active_spans(data.get("events"), data["t0"]))
    sns.lineplot(data=tel, x="time_s", y="power_w", hue="card", palette="tab20", ax=ax, lw=1, legend="full")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("power (W)")
    ax.set_title(f"GPU power by card — Activated Cards {active}")
    ax.legend(title="card", ncol=2, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"activated cards {active}"


def _sd_batch_latency(run_dir: Path):
    """Batch latency statistics per process count × batch config (``count, median, min, max`` …) from
    the sd-throughput experiment's ``stats/sd_throughput_long.csv`` (written at finalize)."""
    import pandas as pd

    p = run_dir / "stats" / "sd_throughput_long.csv"
    if not p.is_file():
        raise Missing("sd-throughput table stats/sd_throughput_long.csv")
    df = pd.read_csv(p)
    _need(df, ["process_count", "batch_config", "metric", "count", "median", "min", "max"], "stats/sd_throughput_long.csv")
    df = df[(df["metric"].astype(str) == "latency_s") & (pd.to_numeric(df["count"], errors="coerce") > 0)].copy()
    if df.empty:
        raise Missing("stats/sd_throughput_long.csv: no ok batch")
    df["process_count"] = df["process_count"].astype(int)
    df["batch_config"] = df["batch_config"].astype(str)
    return df


def _bc_order(configs) -> list[str]:
    def key(b: str):
        try:
            x, y = str(b).lower().split("x")
            return (int(x), int(y))
        except ValueError:
            return (10**9, 0)
    return sorted({str(c) for c in configs}, key=key)


def fig6_surface(run_dir: Path, path: Path, plt) -> str:
    import numpy as np

    df = _sd_batch_latency(run_dir)
    configs = _bc_order(df["batch_config"])
    counts = sorted(int(n) for n in df["process_count"].unique())
    med = df.set_index(["process_count", "batch_config"])["median"]
    Z = np.array([[med.get((n, b), np.nan) for b in configs] for n in counts], dtype=float)
    X, Y = np.meshgrid(range(len(configs)), counts)
    fig = plt.figure(figsize=(9, 6))
    ax = fig.add_subplot(projection="3d")
    if len(configs) >= 2 and len(counts) >= 2 and not np.isnan(Z).any():
        ax.plot_surface(X, Y, Z, cmap="plasma", edgecolor="k", linewidth=0.3)
    else:
        ax.scatter(X.ravel(), Y.ravel(), Z.ravel(), c=np.nan_to_num(Z.ravel()), cmap="plasma", s=40)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, fontsize=7)
    ax.set_yticks(counts)
    ax.set_xlabel("batch config")
    ax.set_ylabel("process count")
    ax.set_zlabel("median batch latency (s)")
    ax.set_title("Median batch inference latency")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{len(counts)} process counts × {len(configs)} batch configs"


def fig7_lines(run_dir: Path, path: Path, plt) -> str:
    import seaborn as sns

    stats = _sd_batch_latency(run_dir)[["process_count", "batch_config", "min", "median", "max"]]
    configs = _bc_order(stats["batch_config"])
    palette = sns.color_palette("tab10", n_colors=max(1, stats["process_count"].nunique()))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for color, (n, g) in zip(palette, stats.groupby("process_count")):
        g = g.set_index("batch_config").reindex(configs)
        x = range(len(configs))
        ax.plot(x, g["median"], "-o", color=color, label=f"N={n} median", ms=4)
        ax.plot(x, g["min"], "--", color=color, lw=0.8, label=f"N={n} min")
        ax.plot(x, g["max"], ":", color=color, lw=0.8, label=f"N={n} max")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs)
    ax.set_xlabel("batch config (batch size x batches)")
    ax.set_ylabel("batch latency (s)")
    ax.set_title("Inference time across batch size and process count (min / median / max)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{stats['process_count'].nunique()} process counts"


FIGURES: list[tuple[int, str, str, Callable]] = [
    (1, "Network activity during inference", "Bytes sent and received per sample on the host's external (non-loopback) interfaces — every process of the machine, not only the workload (in enforced mode these are background; the verdict rests on the workers' own namespaces, see Network isolation evidence); active phases shaded.", fig1_network),
    (2, "GPU utilization (3-D)", "Utilization of every card over time: the active cards carry the load, the rest stay idle.", fig2_utilization),
    (3, "GPU memory use", "Memory used per card; vertical lines mark batch starts.", fig3_memory),
    (4, "Temperature by card (memory and junction)", "Junction in purple, memory in pink; active cards marked; °C left axis, °F right axis.", fig4_temperature),
    (5, "GPU power by card", "Power draw per card; the activated cards are named in the title.", fig5_power),
    (6, "Median batch latency surface", "Median batch latency over process count × batch config (sd-throughput).", fig6_surface),
    (7, "Inference speed across batch size and process count", "Min, median and max batch latency per batch config, one colour per process count.", fig7_lines),
]


def draw_all(run_dir: Path | str, out_dir: Path | str) -> list[Figure]:
    """Draw Figures 1–7 into ``out_dir`` (``figure<N>.png``); never raises for missing inputs."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    try:
        data = load_bare_metal(run_dir)
    except Exception as e:  # corrupt streams: every telemetry figure becomes a placeholder
        data = {"telemetry": None, "events": None, "network": None, "t0": 0.0, "error": f"{type(e).__name__}: {e}",
                "network_scope": "none"}
    figs: list[Figure] = []
    for number, title, caption, fn in FIGURES:
        path = out_dir / f"figure{number}.png"
        rec = Figure(number, title, caption, path)
        try:
            note = fn(run_dir, path, plt) if number >= 6 else fn(data, path, plt)
            rec.caption = f"{caption} ({note})" if note else caption
        except Missing as e:
            rec.missing = str(e)
        except Exception as e:  # a figure must never take the report down
            rec.missing = f"could not draw: {type(e).__name__}: {e}"
        if rec.missing:
            plt.close("all")
            _placeholder(path, number, title, rec.missing)
        figs.append(rec)
    return figs
