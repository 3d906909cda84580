"""Figures that answer the project's question at a glance; each returns a matplotlib Figure.

Functions take the tidy frames of :mod:`nvfp4kv.analysis.load` (or :func:`compare`'s output)
and never show: notebooks display the Figure, :func:`save_figure` writes it (atomically, as PNG),
tests inspect it. These are the only plotting functions: the run dir's ``plots/`` (written by
:mod:`nvfp4kv.analysis.report`), the README figures (``experiments.make_figures``) and the
notebooks all draw with them.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no global figure
registry to leak in long sessions, sweeps or tests, no backend switch, and a notebook shows each
figure once (as the cell's value) instead of once more from pyplot's open-figure list.
Error bars are 95% intervals: ``Z95 * stderr`` for an accuracy, the paired interval from
:func:`~nvfp4kv.analysis.compare.compare` for a Δ, Wilson intervals for pooled retrieval rates.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.stats import binomtest

from nvfp4kv.analysis.select import accuracy_rows, kv_order, primary_rows
from nvfp4kv.results import atomic_write_bytes
from nvfp4kv.stats import Z95


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _empty_figure(message: str) -> Figure:
    """A figure that says what is missing instead of raising in the middle of a notebook."""
    fig = Figure(figsize=(5, 2))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _panel_grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_accuracy(df: pd.DataFrame, *, all_metrics: bool = False, ncols: int = 3) -> Figure:
    """Accuracy per KV format, one panel per (model, task, metric), 95% error bars.

    By default one primary metric per task (see :mod:`nvfp4kv.analysis.select`); fidelity
    metrics (SQNR, errors) are never shown here. Several runs give side-by-side bars per format.
    """
    rows = accuracy_rows(df) if all_metrics else primary_rows(accuracy_rows(df))
    if rows.empty:
        return _empty_figure("No accuracy metrics in these results.")
    order = kv_order(rows)
    runs = sorted(rows["run_id"].unique())
    panels = list(rows.groupby(["model", "task", "metric"], sort=True))
    fig, axes = _panel_grid(len(panels), ncols, (3.4 + 0.4 * len(order), 3.0))
    colors = dict(zip(order, colormaps["viridis"](np.linspace(0.1, 0.85, len(order)))))
    width = 0.8 / len(runs)
    for ax, ((model, task, metric), group) in zip(axes.flat, panels):
        top = 0.0
        for r, run_id in enumerate(runs):
            run = group[group["run_id"] == run_id].drop_duplicates("kv", keep="last").set_index("kv")
            x = [i + (r - (len(runs) - 1) / 2) * width for i, kv in enumerate(order) if kv in run.index]
            present = [kv for kv in order if kv in run.index]
            values = run.loc[present, "value"].to_numpy(float)
            errors = np.nan_to_num(Z95 * run.loc[present, "stderr"].to_numpy(float))
            ax.bar(x, values, width=width, yerr=errors, capsize=3, color=[colors[kv] for kv in present],
                   alpha=1.0 - 0.45 * r / max(1, len(runs) - 1), label=run_id if len(runs) > 1 else None)
            top = max(top, float(np.nanmax(values + errors)) if len(values) else 0.0)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_title(f"{task}\n{metric}" + (f"\n{model}" if rows["model"].nunique() > 1 else ""), fontsize=9)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, max(1e-3, top) * 1.15)
        if len(runs) > 1:
            ax.legend(fontsize=6, title="run", title_fontsize=6)
    fig.suptitle("Accuracy by KV format (95% CI)")
    return fig


_MARKERS = "osD^vP*Xh<>"


def plot_delta_vs_bits(cmp: pd.DataFrame, *, baseline: str = "bf16", all_metrics: bool = False) -> Figure:
    """Accuracy against memory: Δ vs ``baseline`` (points) over KV bits per element, 95% CIs.

    Takes :func:`compare`'s output. Colour = task (and metric), marker = KV format: formats can
    share a bit width (NVFP4 and the block-16 FP4 are both 4.5 bits), so points are not joined
    by lines. The x axis is log2, so 4.5, 8 and 16 bits sit at their memory ratios.
    """
    rows = accuracy_rows(cmp) if all_metrics else primary_rows(accuracy_rows(cmp))
    rows = rows[np.isfinite(rows["delta"].astype(float)) & np.isfinite(rows["bits_per_element"].astype(float))]
    if rows.empty:
        return _empty_figure(f"No Δ vs {baseline} to plot (is the baseline in these results?).")
    fig = Figure(figsize=(8.5, 4.4), layout="constrained")
    ax = fig.subplots()
    order = kv_order(rows)
    markers = {kv: _MARKERS[i % len(_MARKERS)] for i, kv in enumerate(order)}
    series = list(rows.groupby(["model", "task", "metric"], sort=True))
    colors = colormaps["tab10"](np.arange(len(series)) % 10)
    many_models = rows["model"].nunique() > 1
    task_handles = []
    for i, ((model, task, metric), group) in enumerate(series):
        # a small horizontal offset per series keeps overlapping error bars readable
        shift = 2 ** ((i - (len(series) - 1) / 2) * 0.025)
        for kv, point in group.groupby("kv", sort=False):
            x = point["bits_per_element"].to_numpy(float) * shift
            y = 100 * point["delta"].to_numpy(float)
            low, high = 100 * point["ci_low"].to_numpy(float), 100 * point["ci_high"].to_numpy(float)
            yerr = np.vstack([np.nan_to_num(y - low), np.nan_to_num(high - y)])
            ax.errorbar(x, y, yerr=yerr, fmt=markers[kv], color=colors[i], capsize=3, ms=6)
        label = f"{task} ({metric})" + (f" · {model}" if many_models else "")
        task_handles.append(Line2D([], [], color=colors[i], marker="o", ls="", label=label))
    kv_handles = [Line2D([], [], color="black", marker=markers[kv], ls="", label=kv) for kv in order]
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted(rows["bits_per_element"].astype(float).unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("KV bits per element (log scale)")
    ax.set_ylabel(f"Δ accuracy vs {baseline} (points)")
    ax.set_title("Accuracy against KV memory (95% CI)")
    # legends outside the axes (the interesting points can sit anywhere inside); "outside"
    # figure legends are the ones constrained layout makes room for
    fig.legend(handles=task_handles, fontsize=7, loc="outside right upper", title="task", title_fontsize=7)
    fig.legend(handles=kv_handles, fontsize=7, loc="outside right lower", title="KV format", title_fontsize=7)
    return fig


def plot_retrieval_heatmaps(grid: pd.DataFrame, *, annotate: bool = True) -> Figure:
    """Retrieval accuracy over needle depth (rows) x context length (columns), one panel per format.

    Takes :func:`load_grid`'s frame; panels are ordered by bits (most first), one row of
    panels per model. Cells read ``acc`` with a shared 0..1 colour scale.
    """
    if grid.empty:
        return _empty_figure("No retrieval grid (extra['grid']) in these results.")
    order = kv_order(grid)
    models = sorted(grid["model"].unique())
    fig = Figure(figsize=(3.2 * len(order), 2.8 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(order), squeeze=False)
    image = None
    for r, model in enumerate(models):
        for c, kv in enumerate(order):
            ax = axes[r, c]
            sub = grid[(grid["model"] == model) & (grid["kv"] == kv)]
            if sub.empty:
                ax.axis("off")
                continue
            table = sub.pivot_table(index="depth", columns="context_len", values="acc", aggfunc="mean")
            image = ax.imshow(table.to_numpy(float), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(table.shape[1]), [f"{int(c)}" for c in table.columns], fontsize=7)
            ax.set_yticks(range(table.shape[0]), [f"{d:g}" for d in table.index], fontsize=7)
            ax.set_xlabel("context length (tokens)", fontsize=8)
            if c == 0:
                ax.set_ylabel("needle depth", fontsize=8)
            ax.set_title(f"{kv} (mean {np.nanmean(table.to_numpy(float)):.2f})"
                         + (f"\n{model}" if len(models) > 1 else ""), fontsize=9)
            if annotate:
                for (i, j), value in np.ndenumerate(table.to_numpy(float)):
                    if np.isfinite(value):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="retrieval accuracy")
    fig.suptitle("Passkey retrieval by context length and depth")
    return fig


def plot_layer_sqnr(per_layer: pd.DataFrame, *, kinds: tuple[str, ...] = ("k", "v"),
                    metric: str = "sqnr_db") -> Figure:
    """SQNR (dB) per layer (rows) x KV head (columns); one row of panels per format, one column per kind.

    Takes :func:`load_per_layer`'s frame. Each format's row has its own colour scale, shared by
    its K and V panels: formats differ by ~6 dB per bit, so one global scale would flatten the
    layer structure the plot is for, while K vs V within a format stays directly comparable.
    Formats without a finite SQNR (lossless, e.g. BF16: ``sqnr_db`` is None) are named in the title.
    Several runs are pooled (mean per cell).
    """
    values = per_layer[metric].astype(float) if not per_layer.empty else pd.Series(dtype=float)
    finite = per_layer[np.isfinite(values)] if not per_layer.empty else per_layer
    if finite.empty:
        return _empty_figure(f"No finite per-layer {metric} (extra['per_layer']) in these results.")
    lossless = sorted(set(per_layer["kv"]) - set(finite["kv"]))
    order = kv_order(finite)
    kinds = tuple(k for k in kinds if k in set(finite["kind"])) or tuple(sorted(finite["kind"].unique()))
    n_layers = finite["layer"].nunique()
    fig = Figure(figsize=(3.4 * len(kinds) + 0.8, (1.2 + 0.06 * n_layers) * len(order) + 0.6), layout="constrained")
    axes = fig.subplots(len(order), len(kinds), squeeze=False)
    for r, kv in enumerate(order):
        row = finite[finite["kv"] == kv]
        vmin, vmax = np.nanpercentile(row[metric].astype(float), [2, 98])
        image = None
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            sub = row[row["kind"] == kind]
            if sub.empty:
                ax.axis("off")
                continue
            table = sub.pivot_table(index="layer", columns="head", values=metric, aggfunc="mean")
            image = ax.imshow(table.to_numpy(float), vmin=vmin, vmax=max(vmax, vmin + 1e-6), cmap="magma",
                              aspect="auto", interpolation="nearest")
            ax.set_xticks(range(table.shape[1]), [str(int(h)) for h in table.columns], fontsize=7)
            step = max(1, table.shape[0] // 8)
            ax.set_yticks(range(0, table.shape[0], step), [str(int(x)) for x in table.index[::step]], fontsize=7)
            ax.set_xlabel("kv head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_title(f"{kv} · {kind.upper()} (mean {np.nanmean(table.to_numpy(float)):.1f} dB)", fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=list(axes[r]), shrink=0.9, label=f"{metric}")
    note = f"; no finite SQNR (lossless): {', '.join(lossless)}" if lossless else ""
    fig.suptitle(f"Per-layer, per-head quantization SQNR, higher is better{note}", fontsize=10)
    return fig


def _wilson(hits: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wilson 95% interval per point (scipy): sane at 0/n and n/n, unlike ±1.96·stderr.

    ``hits`` are pooled ``acc * n`` of the grid, whole numbers up to float rounding; a point
    without trials (or without an accuracy) gets NaN.
    """
    cis = [binomtest(int(round(k)), int(m)).proportion_ci(0.95, method="wilson") if m > 0 and np.isfinite(k)
           else None for k, m in zip(hits, n)]
    return (np.array([ci.low if ci else math.nan for ci in cis]),
            np.array([ci.high if ci else math.nan for ci in cis]))


def plot_retrieval_by_length(grid: pd.DataFrame) -> Figure:
    """Retrieval accuracy vs context length (pooled over depths), one line per format, Wilson 95% CI.

    One panel per model. Pooling weights each grid point by its trial count ``n``.
    """
    if grid.empty:
        return _empty_figure("No retrieval grid (extra['grid']) in these results.")
    order = kv_order(grid)
    models = sorted(grid["model"].unique())
    fig, axes = _panel_grid(len(models), len(models), (5.0, 3.6))
    for ax, model in zip(axes.flat, models):
        sub = grid[grid["model"] == model].assign(hits=lambda g: g["acc"] * g["n"])
        for kv in order:
            by_len = sub[sub["kv"] == kv].groupby("context_len")[["hits", "n"]].sum().sort_index()
            if by_len.empty:
                continue
            x = by_len.index.to_numpy(float)
            hits, n = by_len["hits"].to_numpy(float), by_len["n"].to_numpy(float)
            low, high = _wilson(hits, n)
            ax.plot(x, hits / n, "o-", label=kv)
            ax.fill_between(x, low, high, alpha=0.15)
        ax.set_xscale("log", base=2)
        lengths = sorted(sub["context_len"].unique())
        ax.set_xticks(lengths, [f"{int(L)}" for L in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("retrieval accuracy")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Retrieval accuracy by context length (Wilson 95% CI)")
    return fig


#: per-sample metrics of the long-context tasks, drawn by :func:`plot_score_by_length` (pass-key, RULER)
LENGTH_METRICS = {"acc": "pass-key accuracy", "score": "RULER score"}


def plot_score_by_length(samples: pd.DataFrame, metrics: Mapping[str, str] | None = None) -> Figure:
    """Long-context accuracy vs context length, one line per KV format, one panel per model x task kind.

    From per-sample records (:func:`~nvfp4kv.analysis.load.samples_frame`) that carry ``context_len``:
    pass-key trials (``acc``, 0/1: Wilson 95% CI) and RULER samples (``score``, a fraction for the
    multi-needle tasks: mean ± 1.96 standard errors, clipped to [0, 1]), pooled over depths, RULER
    subtasks and the cells a sweep splits lengths into (``passkey_4k``, ``passkey_8k``).
    """
    metrics = dict(metrics or LENGTH_METRICS)
    if samples.empty or "context_len" not in samples:
        return _empty_figure("No samples with a context length in these results.")
    sel = samples[samples["metric"].isin(metrics) & samples["context_len"].notna()]
    if sel.empty:
        return _empty_figure("No pass-key or RULER samples in these results.")
    panels = sorted({(m, k) for m, k in zip(sel["model"], sel["metric"])})
    order = kv_order(sel)
    fig, axes = _panel_grid(len(panels), min(len(panels), 2), (5.0, 3.6))
    for ax, (model, metric) in zip(axes.flat, panels):
        sub = sel[(sel["model"] == model) & (sel["metric"] == metric)]
        for kv in order:
            by_len = sub[sub["kv"] == kv].groupby("context_len")["value"].agg(["mean", "count", "std", "sum"]).sort_index()
            if by_len.empty:
                continue
            x, mean, n = by_len.index.to_numpy(float), by_len["mean"].to_numpy(float), by_len["count"].to_numpy(float)
            values = sub[sub["kv"] == kv]["value"]
            if values.isin([0.0, 1.0]).all():
                low, high = _wilson(by_len["sum"].to_numpy(float), n)
            else:
                half = Z95 * by_len["std"].fillna(0.0).to_numpy(float) / np.sqrt(n)
                low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
            # formats side by side at each length (a small multiplicative offset on the log axis)
            shift = 2 ** (0.025 * (order.index(kv) - (len(order) - 1) / 2))
            ax.errorbar(x * shift, mean, yerr=[mean - low, high - mean], fmt="o-", capsize=3,
                        label=f"{kv} (n={int(n.min())}/length)")
        lengths = sorted(sub["context_len"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{int(L)}" for L in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(metrics[metric])
        ax.set_title(f"{model}: {metrics[metric]}", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Long-context accuracy by context length (95% CI)")
    return fig
