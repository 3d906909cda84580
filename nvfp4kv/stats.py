"""Paired statistics: is KV format B really worse than A on the *same* samples?

Every KV format in a sweep is evaluated on the same questions, essay positions and passkey
trials, so the right comparison is paired: per-sample differences cancel the (large)
between-sample variance that an unpaired comparison of two accuracies would carry. Two tools:

- :func:`mcnemar_exact` for 0/1 outcomes (accuracy, top-1 agreement, retrieval): only the
  discordant pairs carry information, and under "no difference" each discordant pair is a fair
  coin, so the exact p-value is a binomial tail (no chi-square approximation; our n is small).
- :func:`paired_bootstrap` for the difference of two means (accuracy, KL, NLL): resample the
  *pairs* with replacement, seeded, so the interval is reproducible bit for bit.

:func:`paired_deltas` combines both for two lists of per-sample records matched by ``doc_id``.
This module is statistics only: reading runs and building tables of Δ and CIs is
:mod:`nvfp4kv.analysis` (:func:`nvfp4kv.analysis.compare`), which calls :func:`paired_deltas`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy.stats import binomtest, norm

Alternative = Literal["two-sided", "greater", "less"]
SampleKey = Callable[[Mapping[str, Any]], Hashable]

#: the two-sided 95% normal quantile (1.95996...): error bars of ±Z95 stderr are 95% intervals
Z95 = float(norm.ppf(0.975))
#: bootstrap resamples are drawn in chunks of this many rows to bound memory on long sample lists
_BOOT_CHUNK_ELEMENTS = 4_000_000


def mcnemar_exact(b: int, c: int, alternative: Alternative = "two-sided") -> float:
    """Exact McNemar p-value from the discordant counts of a paired 0/1 comparison.

    ``b`` = pairs where A was right and B wrong, ``c`` = pairs where A was wrong and B right.
    Under H0 each of the ``b + c`` discordant pairs goes either way with probability 1/2, so
    ``b ~ Binomial(b + c, 1/2)``. ``alternative="greater"`` tests "B is worse than A" (b too
    large), ``"less"`` tests "B is better". With no discordant pairs there is no evidence: 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    return float(binomtest(int(b), n, 0.5, alternative=alternative).pvalue)


def bootstrap_means(diffs: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the paired differences ``diffs``.

    Resampling the differences is resampling the pairs: both members of a pair move together,
    which is what makes the interval paired. ``numpy.random.default_rng(seed)`` fixes the draws,
    so the same inputs and seed give the same array on every run.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D array of paired differences")
    if not np.all(np.isfinite(d)):
        raise ValueError("paired differences contain NaN/Inf; drop or fix those samples before bootstrapping")
    rng = np.random.default_rng(seed)
    n = d.size
    rows_per_chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))
        out[start : start + rows] = d[idx].mean(axis=1)
    return out


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """``(delta, ci_low, ci_high)`` for ``mean(b - a)``: the percentile bootstrap over pairs.

    ``a[i]`` and ``b[i]`` must belong to the same sample. The point estimate is the plain mean
    difference (not the bootstrap mean), the interval the two-sided ``confidence`` percentiles.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired arrays differ in shape: {a_arr.shape} vs {b_arr.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = b_arr - a_arr
    means = bootstrap_means(d, n_boot=n_boot, seed=seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(d.mean()), float(low), float(high)


def is_binary(values: Iterable[float]) -> bool:
    """True when every value is exactly 0 or 1 (an accuracy-like outcome McNemar applies to)."""
    return all(v in (0.0, 1.0) for v in values)


def discordant_counts(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """``(b_count, c_count)`` for paired 0/1 outcomes: (A=1, B=0) pairs and (A=0, B=1) pairs."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return int(np.sum((a_arr == 1) & (b_arr == 0))), int(np.sum((a_arr == 0) & (b_arr == 1)))


def default_sample_key(sample: Mapping[str, Any]) -> Hashable:
    """How samples are matched across formats: ``(task, doc_id)``.

    ``task`` is part of the key because a task group (MMLU's subjects) can restart ``doc_id``
    at 0 in every subtask; within one cell it is constant and changes nothing.
    """
    if "doc_id" not in sample:
        raise KeyError("a per-sample record has no 'doc_id'; samples must carry it to be paired (RESULTS_LAYOUT)")
    return (sample.get("task"), sample["doc_id"])


def match_samples(
    samples_a: Iterable[Mapping[str, Any]],
    samples_b: Iterable[Mapping[str, Any]],
    metric: str,
    *,
    key: SampleKey = default_sample_key,
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Keys and paired values of ``metric`` for samples present in both lists (in A's order).

    Samples lacking the metric are skipped on either side; a duplicated key is an error, since
    pairing it would be ambiguous.
    """

    def index(samples: Iterable[Mapping[str, Any]], side: str) -> dict[Hashable, float]:
        table: dict[Hashable, float] = {}
        for s in samples:
            k = key(s)
            if k in table:
                raise ValueError(f"duplicate sample key {k!r} in samples_{side}; cannot pair")
            value = s.get("metrics", {}).get(metric)
            if value is not None:
                table[k] = float(value)
        return table

    table_a, table_b = index(samples_a, "a"), index(samples_b, "b")
    keys = [k for k in table_a if k in table_b]
    return keys, np.array([table_a[k] for k in keys]), np.array([table_b[k] for k in keys])


def paired_deltas(
    samples_a: Iterable[Mapping[str, Any]],
    samples_b: Iterable[Mapping[str, Any]],
    metric: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    key: SampleKey = default_sample_key,
) -> dict[str, Any]:
    """Paired effect of going from A to B on ``metric``: ``delta = mean(B - A)`` with its CI.

    Returns ``dict(delta, ci_low, ci_high, p_mcnemar, n)``; ``p_mcnemar`` is the two-sided exact
    McNemar p-value when every value is 0/1, else ``None``. With no paired samples every number
    is NaN and ``n`` is 0, so a table shows the gap instead of crashing.
    """
    _, a, b = match_samples(samples_a, samples_b, metric, key=key)
    if a.size == 0:
        return dict(delta=math.nan, ci_low=math.nan, ci_high=math.nan, p_mcnemar=None, n=0)
    delta, low, high = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, confidence=confidence)
    p = None
    if is_binary(a) and is_binary(b):
        p = mcnemar_exact(*discordant_counts(a, b))
    return dict(delta=delta, ci_low=low, ci_high=high, p_mcnemar=p, n=int(a.size))
