"""The standard outputs of a set of records: the run dir's report and the figures the README shows.

:func:`write_report` rebuilds a run dir's derived files from its cell and sample records; the sweep
runner (``nvfp4kv.eval.sweep``) calls it when a run (or shard) ends, also after a failure or Ctrl-C::

    <run_dir>/results.csv                one row per model x task x metric x kv, :data:`CSV_COLUMNS`
    <run_dir>/table.md                   value ± stderr, Δ vs the baseline, paired Δ [95% CI], McNemar p
    <run_dir>/plots/accuracy.png         task accuracies per KV format, 95% error bars
    <run_dir>/plots/retrieval_heatmaps.png   retrieval over context length x depth (runs with a grid)
    <run_dir>/plots/by_length.png        pass-key / RULER accuracy vs context length (long-context runs)
    <run_dir>/plots/fidelity_layers.png  per-layer, per-head K/V SQNR (runs with the fidelity task)

It goes the same way as every other view: records -> :mod:`.load` (frames) -> :mod:`.compare`
(Δ and paired CIs) -> :mod:`.plots` / this module's :func:`markdown_table`. :func:`figures` is the
one list of standard figures, shared by the report and ``experiments.make_figures``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from nvfp4kv.analysis.compare import compare
from nvfp4kv.analysis.load import grid_frame, per_layer_frame, run_cells, samples_frame, tidy_frame
from nvfp4kv.analysis.plots import (
    LENGTH_METRICS,
    plot_accuracy,
    plot_delta_vs_bits,
    plot_layer_sqnr,
    plot_retrieval_heatmaps,
    plot_score_by_length,
    save_figure,
)
from nvfp4kv.analysis.select import accuracy_rows, is_rate, kv_order, primary_rows
from nvfp4kv.results import atomic_write_text

#: the columns of ``results.csv``, in order
CSV_COLUMNS = ["run_id", "model", "task", "metric", "kv", "engine", "k_format", "v_format", "policy",
               "bits_per_element", "value", "stderr", "n"]
#: the standard figures, by name (see :func:`figures`)
FIGURES = ("accuracy", "delta_vs_bits", "retrieval", "by_length", "layers")
#: figure name -> file name under ``<run_dir>/plots/`` (the report draws no Δ-vs-bits figure)
REPORT_PLOTS = {"accuracy": "accuracy.png", "retrieval": "retrieval_heatmaps.png", "by_length": "by_length.png",
                "layers": "fidelity_layers.png"}


# ---------------------------------------------------------------------------- figures
def _has_lengths(cell: Mapping[str, Any]) -> bool:
    """A pass-key or RULER cell: its metrics are per context length (``acc@4096``, ``score@8192``)."""
    return any("@" in str(name) for name in (cell.get("metrics") or {}))


def figures(cells: Iterable[Mapping[str, Any]], names: Iterable[str] = FIGURES, *, baseline: str = "bf16",
            n_boot: int = 2000, all_metrics: bool = False) -> dict[str, Figure]:
    """The standard figures of ``cells`` (from :func:`~nvfp4kv.analysis.load.load_cells`), by name.

    ``accuracy``: :func:`plot_accuracy`; ``delta_vs_bits``: :func:`plot_delta_vs_bits` with paired
    CIs; ``retrieval``: :func:`plot_retrieval_heatmaps`; ``by_length``: :func:`plot_score_by_length`;
    ``layers``: :func:`plot_layer_sqnr`. A figure
    whose data the cells lack (no accuracy metric, no baseline, no grid, no finite per-layer SQNR) is
    left out of the result. ``all_metrics``: every accuracy metric of a task, not only its primary one.
    """
    cells, names = list(cells), set(names)
    unknown = names - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; the standard figures are {list(FIGURES)}")
    df = tidy_frame(cells)
    drawn: dict[str, Figure] = {}
    if "accuracy" in names and not accuracy_rows(df).empty:
        drawn["accuracy"] = plot_accuracy(df, all_metrics=all_metrics)
    if "delta_vs_bits" in names:
        cmp = compare(df, baseline=baseline, samples=samples_frame(cells), n_boot=n_boot)
        if primary_rows(accuracy_rows(cmp))["delta"].notna().any():
            drawn["delta_vs_bits"] = plot_delta_vs_bits(cmp, baseline=baseline, all_metrics=all_metrics)
    if "retrieval" in names:
        grid = grid_frame(cells)
        if not grid.empty:
            drawn["retrieval"] = plot_retrieval_heatmaps(grid)
    if "by_length" in names:
        long_context = samples_frame([c for c in cells if _has_lengths(c)])
        if not long_context.empty and "context_len" in long_context and (
                long_context["metric"].isin(LENGTH_METRICS) & long_context["context_len"].notna()).any():
            drawn["by_length"] = plot_score_by_length(long_context)
    if "layers" in names:
        per_layer = per_layer_frame(cells)
        if per_layer["sqnr_db"].notna().any():
            drawn["layers"] = plot_layer_sqnr(per_layer)
    return drawn


# ---------------------------------------------------------------------------- Markdown table
def display_order(df: pd.DataFrame, baseline: str = "bf16") -> pd.DataFrame:
    """Rows by model, then task (first-seen order), then KV format (:func:`kv_order`); metrics as reported."""
    if df.empty:
        return df
    rank = {kv: i for i, kv in enumerate(kv_order(df, baseline))}
    keys = pd.DataFrame({"model": pd.factorize(df["model"])[0], "task": pd.factorize(df["task"])[0],
                         "kv": df["kv"].map(rank)}, index=df.index)
    return df.loc[keys.sort_values(["model", "task", "kv"], kind="stable").index].reset_index(drop=True)


def _fmt(value: float | None, scale: float, digits: int, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"


def markdown_table(cmp: pd.DataFrame, baseline: str = "bf16", title: str | None = None) -> str:
    """``table.md``: value ± stderr per format and Δ vs ``baseline`` of the same model/task/metric.

    Takes :func:`~nvfp4kv.analysis.compare.compare`'s output. Rates (:func:`is_rate`) are shown in
    percent and their Δ in percentage points; other metrics in their own units. Rows with a paired
    interval (per-sample records on both sides) add "paired Δ [95% CI]" and the exact McNemar p.
    """
    lines: list[str] = [f"# {title}", ""] if title else []
    if cmp.empty:
        return "\n".join(lines + ["(no finished cells yet)", ""])
    paired = bool((cmp["ci_method"] == "paired-bootstrap").any())
    header = ["model", "task", "metric", "kv", "bits", "policy", "value ± stderr", f"Δ vs {baseline}", "n"]
    if paired:
        header[8:8] = ["paired Δ [95% CI]", "p (McNemar)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rank = {kv: i for i, kv in enumerate(kv_order(cmp, baseline))}
    for (model, task, metric), group in cmp.groupby(["model", "task", "metric"], sort=False):
        scale, digits = (100.0, 1) if is_rate(metric, group["value"].tolist()) else (1.0, 4)
        for _, row in group.sort_values("kv", key=lambda s: s.map(rank), kind="stable").iterrows():
            value, stderr = _fmt(row["value"], scale, digits), _fmt(row["stderr"], scale, digits)
            delta = "(baseline)" if row["kv"] == baseline else _fmt(row["delta"], scale, digits, signed=True)
            cells = [str(model), str(task), str(metric), str(row["kv"]),
                     "" if pd.isna(row["bits_per_element"]) else f"{row['bits_per_element']:g}", str(row["policy"]),
                     f"{value} ± {stderr}" if stderr else value, delta,
                     "" if pd.isna(row["n"]) else str(int(row["n"]))]
            if paired:
                ci = pval = ""
                if row["ci_method"] == "paired-bootstrap":
                    ci = (f"{_fmt(row['paired_delta'], scale, digits, True)} "
                          f"[{_fmt(row['ci_low'], scale, digits, True)}, {_fmt(row['ci_high'], scale, digits, True)}]")
                    pval = "" if pd.isna(row["p_mcnemar"]) else f"{row['p_mcnemar']:.3g}"
                cells[8:8] = [ci, pval]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        f"Rates (accuracy, exact match, retrieval) in %, Δ in percentage points vs `{baseline}` on the same "
        "model, task and samples; other metrics in their own units. ± is the standard error the task "
        "reports (lm-eval's; the sample standard error of the trials for pass-key).",
    ]
    if paired:
        lines.append("Paired Δ: mean per-sample difference with a seeded paired-bootstrap 95% CI; "
                     "p: exact two-sided McNemar test on 0/1 outcomes (nvfp4kv.stats).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the run dir's report
def write_report(run_dir: str | os.PathLike[str], baseline: str = "bf16", title: str | None = None, *,
                 n_boot: int = 2000) -> dict[str, Path]:
    """Rebuild ``results.csv``, ``table.md`` and ``plots/*.png`` from the run's records; returns the paths.

    Keys of the result: ``csv``, ``table``, ``accuracy`` (always, a note when the run has no accuracy
    yet), and ``retrieval`` / ``layers`` when the run has data for them.
    """
    run_dir = Path(run_dir)
    cells = run_cells(run_dir)
    df = display_order(tidy_frame(cells), baseline)
    written = {"csv": atomic_write_text(run_dir / "results.csv", df[CSV_COLUMNS].to_csv(index=False))}
    # One run dir is one run identity (identity.json), so every cell pairs with the dir's own baseline
    # whatever run_id it carries: the refusal to pair across runs is for merged run dirs.
    cmp = compare(df, baseline=baseline, samples=samples_frame(cells), n_boot=n_boot, allow_mixed_runs=True)
    written["table"] = atomic_write_text(run_dir / "table.md", markdown_table(cmp, baseline, title))
    drawn = figures(cells, REPORT_PLOTS, baseline=baseline, all_metrics=True)
    drawn.setdefault("accuracy", plot_accuracy(df))  # says "no accuracy metrics" rather than missing
    for name, file_name in REPORT_PLOTS.items():
        if name in drawn:
            written[name] = save_figure(drawn[name], run_dir / "plots" / file_name)
    return written
