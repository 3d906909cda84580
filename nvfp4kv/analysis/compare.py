"""Δ vs a baseline KV format, with confidence intervals that use the pairing when samples exist.

Every format in a sweep sees the same questions, so the honest interval for "NVFP4 minus BF16"
is paired (per-sample differences, :func:`nvfp4kv.stats.paired_deltas`); it is much tighter
than an interval built from two independent standard errors. When per-sample records are not
available for a row (a ``results.csv`` from elsewhere, a task that logs none), the row falls
back to the unpaired normal interval from the two stderrs and says so in ``ci_method``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from nvfp4kv import stats
from nvfp4kv.errors import MixedRunsError

KEY = ["model", "task", "metric"]
COMPARE_COLUMNS = ["baseline_value", "delta", "paired_delta", "ci_low", "ci_high", "p_mcnemar", "n_paired",
                   "ci_method"]


def _baseline_rows(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One baseline row per (run, model, task, metric): the first policy if several."""
    base = df[df["kv"] == baseline]
    return base.drop_duplicates(subset=["run_id", *KEY], keep="first")


def _pick_baseline(row: pd.Series, candidates: pd.DataFrame, allow_mixed_runs: bool) -> pd.Series | None:
    """The baseline row for ``row``: from the same run (one identity), or refused.

    Why refuse: a baseline from another run may differ in model revision, seed, data or harness
    version, and a "paired" interval across them would look tight while measuring two things.
    ``allow_mixed_runs=True`` takes the last-listed run's baseline, on the caller's word.
    """
    if candidates.empty:
        return None
    same_run = candidates[candidates["run_id"] == row["run_id"]]
    if not same_run.empty:
        return same_run.iloc[-1]
    if not allow_mixed_runs:
        raise MixedRunsError(
            f"Run {row['run_id']} has no {row['kv']!r} baseline of its own for {row['task']}/{row['metric']}; the only "
            f"baselines are in run(s) {sorted(set(candidates['run_id']))}, whose identity may differ. Add the "
            f"baseline to that run (resume it with the baseline KV config), or pass allow_mixed_runs=True to pair "
            f"across runs on purpose."
        )
    return candidates.iloc[-1]


def _as_records(sel: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """Long sample rows back to the dicts :func:`stats.paired_deltas` pairs by ``(task, doc_id)``.

    The sample's own task (``sample_task``: an MMLU subject) keys the pairing, since subtasks
    of a group restart ``doc_id``.
    """
    tasks = sel["sample_task"] if "sample_task" in sel else sel["task"]
    return [{"task": t, "doc_id": d, "metrics": {metric: v}} for t, d, v in zip(tasks, sel["doc_id"], sel["value"])]


def _sample_records(samples: pd.DataFrame, run_id: str, model: str, task: str, kv: str, metric: str):
    sel = samples[(samples["run_id"] == run_id) & (samples["model"] == model) & (samples["task"] == task)
                  & (samples["kv"] == kv) & (samples["metric"] == metric)]
    return _as_records(sel, metric)


def _unpaired(delta: float, se_a: float, se_b: float) -> tuple[float, float]:
    """The normal 95% interval of a difference of two independent estimates."""
    if not (np.isfinite(se_a) and np.isfinite(se_b)):
        return math.nan, math.nan
    half = stats.Z95 * math.hypot(se_a, se_b)
    return delta - half, delta + half


def compare(
    df: pd.DataFrame,
    baseline: str = "bf16",
    samples: pd.DataFrame | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    allow_mixed_runs: bool = False,
) -> pd.DataFrame:
    """``df`` (from :func:`load_results`) plus Δ vs ``baseline`` and a 95% CI per row.

    Added columns: ``baseline_value``, ``delta`` (value - baseline value), ``paired_delta`` (the mean
    per-sample difference the paired interval is centred on, paired rows only), ``ci_low``/``ci_high``,
    ``p_mcnemar`` (exact McNemar p for 0/1 outcomes, paired rows only), ``n_paired`` and
    ``ci_method`` (``"paired-bootstrap"``, ``"unpaired-normal"``, or missing). A row is compared with
    the baseline of the same model, task and metric, from the same run when that run has one.
    Rows whose baseline is missing or not finite (a lossless BF16 cache reports no SQNR) get NaN.
    ``samples`` is a frame from :func:`load_samples`; give it to get paired intervals. ``delta``
    is always the difference of the reported values; it equals the mean paired difference the
    interval is built around when every sample is paired (``n_paired == n``).
    """
    if "kv" not in df or df.empty:
        return df.assign(**{c: pd.Series(dtype=float) for c in COMPARE_COLUMNS})
    bases = _baseline_rows(df, baseline)
    by_key = {key: group for key, group in bases.groupby(KEY, sort=False)}
    out: list[dict[str, Any]] = []
    for _, row in df.iterrows():
        base = _pick_baseline(row, by_key.get(tuple(row[k] for k in KEY), pd.DataFrame()), allow_mixed_runs)
        result: dict[str, Any] = dict.fromkeys(COMPARE_COLUMNS, math.nan)
        result["ci_method"] = None
        result["p_mcnemar"] = None
        if base is not None:
            result["baseline_value"] = float(base["value"])
        if base is None or not np.isfinite(base["value"]) or not np.isfinite(row["value"]):
            out.append(result)
            continue
        result["delta"] = float(row["value"] - base["value"])
        if row["kv"] == baseline and row["run_id"] == base["run_id"]:
            out.append(result)  # the baseline itself: Δ = 0, no interval
            continue
        paired = None
        if samples is not None and not samples.empty:
            a = _sample_records(samples, base["run_id"], row["model"], row["task"], baseline, row["metric"])
            b = _sample_records(samples, row["run_id"], row["model"], row["task"], row["kv"], row["metric"])
            if a and b:
                paired = stats.paired_deltas(a, b, row["metric"], n_boot=n_boot, seed=seed)
        if paired is not None and paired["n"] > 0:
            result.update(paired_delta=paired["delta"], ci_low=paired["ci_low"], ci_high=paired["ci_high"],
                          p_mcnemar=paired["p_mcnemar"], n_paired=paired["n"], ci_method="paired-bootstrap")
        else:
            low, high = _unpaired(result["delta"], float(row["stderr"]), float(base["stderr"]))
            if np.isfinite(low):
                result.update(ci_low=low, ci_high=high, ci_method="unpaired-normal")
        out.append(result)
    added = pd.DataFrame(out, index=df.index)
    return pd.concat([df, added], axis=1)


def paired_by(
    samples: pd.DataFrame,
    by: str,
    *,
    baseline: str = "bf16",
    task: str | None = None,
    metric: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired Δ vs ``baseline`` per value of a sample attribute (``context_len``, ``depth``, ...).

    Where a cell-level Δ averages over the whole grid, this shows *where* a format loses: e.g.
    retrieval at 4K tokens but not at 1K. Rows: ``run_id, model, task, metric, kv, <by>, value,
    baseline_value, delta, ci_low, ci_high, p_mcnemar, n`` (``n`` = paired samples).
    """
    columns = ["run_id", "model", "task", "metric", "kv", by, "value", "baseline_value", "delta",
               "ci_low", "ci_high", "p_mcnemar", "n"]
    sel = samples
    if task is not None:
        sel = sel[sel["task"] == task]
    if metric is not None:
        sel = sel[sel["metric"] == metric]
    if sel.empty or by not in sel:
        return pd.DataFrame(columns=columns)
    sel = sel[sel[by].notna()]
    rows = []
    for (run_id, model, task_name, metric_name), group in sel.groupby(["run_id", "model", "task", "metric"], sort=True):
        base = group[group["kv"] == baseline]
        if base.empty:
            continue
        for kv, kv_group in group.groupby("kv", sort=False):
            if kv == baseline:
                continue
            for level, level_group in kv_group.groupby(by, sort=True):
                a = base[base[by] == level]
                res = stats.paired_deltas(_as_records(a, metric_name), _as_records(level_group, metric_name),
                                          metric_name, n_boot=n_boot, seed=seed)
                if isinstance(level, float) and level.is_integer():
                    level = int(level)  # context lengths read back as floats when other tasks lack them
                rows.append({"run_id": run_id, "model": model, "task": task_name, "metric": metric_name, "kv": kv,
                             by: level, "value": float(level_group["value"].mean()),
                             "baseline_value": float(a["value"].mean()) if not a.empty else math.nan, **res})
    return pd.DataFrame(rows, columns=columns)
