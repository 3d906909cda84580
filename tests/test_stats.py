"""Paired statistics against hand-computed values (McNemar tails, bootstrap on tiny arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvfp4kv.stats import (
    Z95,
    bootstrap_means,
    discordant_counts,
    mcnemar_exact,
    paired_bootstrap,
    paired_deltas,
)


# ---- McNemar: binomial tails on the discordant pairs, computed by hand ------------------------


def test_mcnemar_all_discordant_one_way():
    # 5 discordant pairs all favouring B: two-sided p = 2 * (1/2)^5
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)


def test_mcnemar_one_against_nine():
    # 2 * P(X <= 1 | n=10, 1/2) = 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)


def test_mcnemar_one_sided_tails():
    # "B worse": P(X >= 5 | n=5) = 1/32; "B better" with the same counts is certain
    assert mcnemar_exact(5, 0, alternative="greater") == pytest.approx(1 / 32)
    assert mcnemar_exact(5, 0, alternative="less") == pytest.approx(1.0)
    # P(X >= 3 | n=4) = (4 + 1) / 16
    assert mcnemar_exact(3, 1, alternative="greater") == pytest.approx(5 / 16)


def test_mcnemar_balanced_and_empty_carry_no_evidence():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(4, 4) == pytest.approx(1.0)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_discordant_counts():
    a = [1, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 0, 0, 1]
    assert discordant_counts(a, b) == (2, 2)


# ---- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_two_point_distribution_matches_hand_computation():
    # resampling [0, 1] twice: means 0, .5, 1 with probabilities 1/4, 1/2, 1/4
    means = bootstrap_means([0.0, 1.0], n_boot=20_000, seed=3)
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.02)
    delta, low, high = paired_bootstrap([0.0, 0.0], [0.0, 1.0], n_boot=20_000, seed=3)
    assert (delta, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_constant_difference_gives_degenerate_interval():
    a = np.arange(10.0)
    assert paired_bootstrap(a, a + 0.25, n_boot=500) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_interval_covers_true_delta_and_excludes_zero():
    rng = np.random.default_rng(11)
    a = rng.normal(size=400)
    b = a + 0.3 + rng.normal(scale=0.5, size=400)  # true paired delta 0.3
    delta, low, high = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert low < 0.3 < high
    assert low > 0.0  # 0.3 is ~12 standard errors away from 0
    assert high - low == pytest.approx(2 * Z95 * 0.5 / math.sqrt(400), rel=0.15)


def test_bootstrap_is_reproducible_with_seed_and_varies_without():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


def test_bootstrap_chunking_does_not_change_the_draws(monkeypatch):
    import nvfp4kv.stats as stats

    d = np.random.default_rng(2).normal(size=37)
    whole = bootstrap_means(d, n_boot=300, seed=5)
    monkeypatch.setattr(stats, "_BOOT_CHUNK_ELEMENTS", 37 * 7)  # 7 rows per chunk
    # chunked draws consume the generator in the same order, row by row
    assert np.array_equal(bootstrap_means(d, n_boot=300, seed=5), whole)


def test_bootstrap_rejects_non_finite_and_empty():
    with pytest.raises(ValueError):
        bootstrap_means([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_means([])


# ---- paired_deltas: matching by doc_id -------------------------------------------------------


def _samples(values, metric="acc", task="t", start=0):
    return [{"doc_id": start + i, "task": task, "metrics": {metric: v}} for i, v in enumerate(values)]


def test_paired_deltas_matches_by_doc_id_not_position():
    a = _samples([1, 1, 1, 1, 1, 0])
    b = list(reversed(_samples([0, 0, 0, 0, 0, 0])))  # reversed order: pairing must use doc_id
    b.append({"doc_id": 99, "task": "t", "metrics": {"acc": 1}})  # unmatched: ignored
    res = paired_deltas(a, b, "acc", n_boot=1000)
    assert res["n"] == 6
    assert res["delta"] == pytest.approx(-5 / 6)
    assert res["p_mcnemar"] == pytest.approx(0.0625)  # b=5, c=0
    assert res["ci_low"] <= res["delta"] <= res["ci_high"]


def test_paired_deltas_continuous_metric_has_no_mcnemar():
    a = _samples([0.1, 0.2, 0.3], metric="kl")
    b = _samples([0.2, 0.4, 0.6], metric="kl")
    res = paired_deltas(a, b, "kl", n_boot=500)
    assert res["delta"] == pytest.approx(0.2)
    assert res["p_mcnemar"] is None


def test_paired_deltas_keeps_subtasks_apart():
    a = _samples([1, 1], task="mmlu_x") + _samples([0, 0], task="mmlu_y")
    b = _samples([1, 1], task="mmlu_x") + _samples([1, 1], task="mmlu_y")
    assert paired_deltas(a, b, "acc", n_boot=200)["delta"] == pytest.approx(0.5)


def test_paired_deltas_rejects_duplicate_keys_and_handles_no_overlap():
    with pytest.raises(ValueError, match="duplicate"):
        paired_deltas(_samples([1]) + _samples([0]), _samples([1]), "acc")
    res = paired_deltas(_samples([1]), _samples([1], start=5), "acc")
    assert res["n"] == 0 and math.isnan(res["delta"])
