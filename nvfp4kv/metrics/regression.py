"""The accuracy gate's decision rule: is a format *significantly worse* than its baseline?

The gate stores, per KV format, per-unit values of a few metrics (a unit is one scored essay
position, one (layer, head, K|V) row, one MMLU question, one passkey trial). A new run is
compared with the committed baseline unit by unit, so every comparison is paired, and the
tolerance is the paired uncertainty itself rather than a hand-picked epsilon:

- **0/1 metrics** (top-1 agreement, MMLU accuracy, passkey retrieval): exact McNemar test on
  the discordant units, one tail per direction. *Regressed* when ``P(at least this many units
  got worse | no change) < alpha_side``. With ``n`` units the smallest attainable p is ``2^-n``;
  a check whose ``n`` cannot reach ``alpha_side`` says so ("underpowered") instead of pretending.
- **continuous metrics** (per-position KL and NLL, per-head SQNR and attention-output error):
  paired bootstrap of the mean worse-oriented difference ``w = current - baseline`` (for
  lower-is-better; ``baseline - current`` otherwise). *Regressed* when the one-sided
  ``1 - alpha_side`` lower bound of ``mean(w)`` is above zero, i.e. the whole one-sided interval
  lies on the worse side of the baseline.

Both directions are tested: a significant *improvement* is ``IMPROVED``. The formats are exact
specifications, so a format that suddenly matches BF16 better than its baseline has changed
(a quantizer that stopped quantizing would look like that); the gate fails on it unless told
``allow_improvements``, and the fix is a deliberate ``--update-baseline``.
``alpha_side = alpha / (2 m)``: Bonferroni over the ``m`` checks of a run and both tails, so
a run without any real change fails with probability at most ``alpha`` (default 0.05). On CPU
the suite is deterministic, so an unchanged code base reproduces the baseline exactly (all
differences 0, nothing to detect); the statistics decide whether a *small* change (another
CPU, a new torch, a subtle bug) is noise or a consistent shift.

The bootstrap draws ``max(2000, ceil(20 / alpha_side))`` resamples so that ~20 or more land
beyond the bound, and is seeded: the same inputs give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from nvfp4kv.stats import bootstrap_means, mcnemar_exact

Direction = Literal["lower", "higher"]
Status = Literal["ok", "REGRESSED", "IMPROVED", "MISSING"]

#: SQNR of an exact round trip is infinite; stored as this many dB (above FP32's ~150 dB) so a
#: lossless format turning lossy is a large, finite regression instead of a NaN.
SQNR_EXACT_DB = 300.0


@dataclass(frozen=True)
class Series:
    """One gated metric of one format: per-unit values keyed by a stable unit id."""

    metric: str
    direction: Direction
    binary: bool
    values: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "binary": self.binary, "values": self.values}

    @classmethod
    def from_dict(cls, metric: str, data: Mapping[str, Any]) -> Series:
        return cls(metric, data["direction"], bool(data["binary"]), {str(k): float(v) for k, v in data["values"].items()})


@dataclass(frozen=True)
class Check:
    """The verdict for one (format, metric). ``delta`` is ``mean(current - baseline)``.

    ``bound`` (continuous metrics) is the one-sided ``1 - alpha`` confidence bound of ``delta``
    nearest to "no change": a lower bound for lower-is-better metrics (regressed when it is
    above 0), an upper bound for higher-is-better ones (regressed when it is below 0).
    """

    format: str
    metric: str
    test: str
    n: int
    baseline_mean: float
    current_mean: float
    delta: float
    bound: float | None
    p_value: float | None
    alpha: float
    status: Status
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_resamples(alpha: float) -> int:
    """Resamples so that ~20 bootstrap means fall beyond a one-sided ``alpha`` quantile."""
    return max(2000, math.ceil(20.0 / alpha))


def compare_series(fmt: str, base: Series, cur: Series, alpha: float, *, seed: int = 0) -> Check:
    """Apply the module's rule to one metric at per-tail level ``alpha``; see the module docstring."""
    keys = [k for k in base.values if k in cur.values]
    missing = len(base.values) - len(keys)
    b = np.array([base.values[k] for k in keys], dtype=np.float64)
    c = np.array([cur.values[k] for k in keys], dtype=np.float64)
    base_mean = float(b.mean()) if b.size else math.nan
    cur_mean = float(c.mean()) if c.size else math.nan
    common = dict(format=fmt, metric=base.metric, n=len(keys), baseline_mean=base_mean, current_mean=cur_mean,
                  delta=cur_mean - base_mean, alpha=alpha)
    if missing or not keys:
        return Check(**common, test="none", bound=None, p_value=None, status="MISSING",
                     note=f"{missing} of {len(base.values)} baseline units absent from this run")
    worse = c - b if base.direction == "lower" else b - c
    sign = 1.0 if base.direction == "lower" else -1.0  # worse-oriented -> delta orientation
    if base.binary:
        good_base, good_cur = (b == 0, c == 0) if base.direction == "lower" else (b == 1, c == 1)
        n_worse = int(np.sum(good_base & ~good_cur))
        n_better = int(np.sum(~good_base & good_cur))
        p_worse = mcnemar_exact(n_worse, n_better, "greater")
        p_better = mcnemar_exact(n_worse, n_better, "less")
        status: Status = "REGRESSED" if p_worse < alpha else "IMPROVED" if p_better < alpha else "ok"
        note = f"{n_worse} worse / {n_better} better"
        if mcnemar_exact(len(keys), 0, "greater") >= alpha:
            note += f"; underpowered: {len(keys)} units cannot reach p<{alpha:.2g}"
        return Check(**common, test="mcnemar", bound=None, p_value=p_worse, status=status, note=note)
    if not np.all(np.isfinite(worse)):
        return Check(**common, test="bootstrap", bound=None, p_value=None, status="REGRESSED",
                     note="non-finite values in this run")
    if not np.any(worse):
        return Check(**common, test="bootstrap", bound=0.0, p_value=1.0, status="ok", note="identical to baseline")
    means = bootstrap_means(worse, n_boot=bootstrap_resamples(alpha), seed=seed)
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    p_worse = float((np.sum(means <= 0.0) + 1) / (means.size + 1))
    status = "REGRESSED" if low > 0.0 else "IMPROVED" if high < 0.0 else "ok"
    return Check(**common, test="bootstrap", bound=float(sign * low), p_value=p_worse, status=status,
                 note=f"{int(np.sum(worse > 0))} worse / {int(np.sum(worse < 0))} better")


def compare_runs(
    baseline: Mapping[str, Mapping[str, Series]],
    current: Mapping[str, Mapping[str, Series]],
    *,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[Check]:
    """Checks for every (format, metric) of ``current`` that the baseline also has.

    A format or metric in ``current`` without a baseline is returned as ``MISSING`` (the
    baseline must be regenerated deliberately), as is a baseline unit absent from ``current``.
    """
    pairs: list[tuple[str, str]] = [(f, m) for f in current for m in current[f]]
    alpha_adj = alpha / (2 * max(1, len(pairs)))
    checks = []
    for fmt, metric in pairs:
        cur = current[fmt][metric]
        base = baseline.get(fmt, {}).get(metric)
        if base is None:
            checks.append(Check(fmt, metric, "none", len(cur.values), math.nan, float(np.mean(list(cur.values.values()))),
                                math.nan, None, None, alpha_adj, "MISSING", "no baseline for this format/metric"))
            continue
        checks.append(compare_series(fmt, base, cur, alpha_adj, seed=seed))
    return checks


def failed(checks: Sequence[Check], *, allow_improvements: bool = False) -> list[Check]:
    """The checks that make the gate exit non-zero."""
    bad = {"REGRESSED", "MISSING"} if allow_improvements else {"REGRESSED", "MISSING", "IMPROVED"}
    return [c for c in checks if c.status in bad]
