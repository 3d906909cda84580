"""Which rows a headline view shows: task accuracies, one primary metric per task, formats in display order.

Sweeps record many metrics per task (GSM8K's strict and flexible match, the fidelity task's KL,
SQNR and agreement rates). Headline tables and plots need one accuracy number per task and a
fixed order of formats; these rules live here so every plot and notebook applies the same ones.
The rate test and the format order are the sweep report's own (:mod:`nvfp4kv.results`), so the
notebooks and ``table.md`` agree on what counts as an accuracy and how formats are ordered.
"""

from __future__ import annotations

import pandas as pd

from nvfp4kv import results as sweep_results

#: rates that measure agreement with the BF16 reference (fidelity diagnostics), not task accuracy
AGREEMENT_MARKERS = ("agree",)
#: preferred primary metric per task, first match wins; otherwise the alphabetically first accuracy metric
PRIMARY_METRIC_ORDER = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "acc",
                        "acc_norm,none", "exact_match,none", "em")


def is_accuracy_metric(metric: str, values: list[float] | None = None) -> bool:
    """A task accuracy: a rate by the sweep report's test, and not an agreement-with-reference rate.

    Without ``values`` only the name is judged (values in [0, 1] are assumed).
    """
    if any(marker in metric.lower() for marker in AGREEMENT_MARKERS):
        return False
    return sweep_results.is_rate(metric, [0.5] if values is None else values)


def accuracy_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose metric is a task accuracy (higher is better, in [0, 1])."""
    if df.empty:
        return df
    keep = {metric for metric, group in df.groupby("metric")
            if is_accuracy_metric(metric, group["value"].astype(float).tolist())}
    return df[df["metric"].isin(keep)]


def primary_metric(metrics: list[str]) -> str | None:
    """The metric a headline shows for a task, given the accuracy metrics it reports."""
    for name in PRIMARY_METRIC_ORDER:
        if name in metrics:
            return name
    return sorted(metrics)[0] if metrics else None


def primary_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows restricted to one primary metric per (model, task)."""
    keep = []
    for _, group in df.groupby(["model", "task"], sort=False):
        chosen = primary_metric(sorted(group["metric"].unique()))
        if chosen is not None:
            keep.append(group[group["metric"] == chosen])
    return pd.concat(keep) if keep else df.iloc[0:0]


def kv_order(df: pd.DataFrame, baseline: str = "bf16") -> list[str]:
    """KV labels in display order: the baseline first, then most bits per element first, then name."""
    return sweep_results.kv_order(df, baseline) if not df.empty else []
