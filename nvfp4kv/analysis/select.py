"""Which rows a view shows and in what order: rates vs other metrics, task accuracies, one primary
metric per task, formats in display order.

Sweeps record many metrics per task (GSM8K's strict and flexible match, the fidelity task's KL,
SQNR and agreement rates). Tables and plots need to know which metrics are rates (shown in
percent), which are task accuracies, one headline metric per task, and a fixed order of formats;
these rules live here only, so the run-dir report (``table.md``, ``plots/``), the README figures
and the notebooks agree on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

#: metric names that are not rates even when their values fall in [0, 1]
NOT_RATE_MARKERS = ("kl", "nll", "ppl", "perplexity", "err", "sqnr", "loss", "bits", "mse", "entropy")
#: rates that measure agreement with the BF16 reference (fidelity diagnostics), not task accuracy
AGREEMENT_MARKERS = ("agree",)
#: preferred primary metric per task, first match wins; otherwise the alphabetically first accuracy metric
PRIMARY_METRIC_ORDER = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "acc",
                        "acc_norm,none", "exact_match,none", "em")


def is_rate(metric: str, values: Iterable[float]) -> bool:
    """Whether a metric is a proportion (accuracy, exact match, retrieval) shown in percent.

    Decided from the values (all within [0, 1]) and the name (KL, NLL, errors, SQNR are not rates
    even when small), so new tasks need no registration.
    """
    name = metric.split(",")[0].lower()
    if any(marker in name for marker in NOT_RATE_MARKERS):
        return False
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return bool(finite) and all(0.0 <= v <= 1.0 for v in finite)


def is_accuracy_metric(metric: str, values: list[float] | None = None) -> bool:
    """A task accuracy: a rate (:func:`is_rate`), and not an agreement-with-reference rate.

    Without ``values`` only the name is judged (values in [0, 1] are assumed).
    """
    if any(marker in metric.lower() for marker in AGREEMENT_MARKERS):
        return False
    return is_rate(metric, [0.5] if values is None else values)


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
    if df.empty:
        return []
    bits = (pd.to_numeric(df["bits_per_element"], errors="coerce").groupby(df["kv"]).max().dropna().to_dict()
            if "bits_per_element" in df else {})
    return sorted(dict.fromkeys(df["kv"].dropna()), key=lambda kv: (kv != baseline, -bits.get(kv, -1.0), kv))
