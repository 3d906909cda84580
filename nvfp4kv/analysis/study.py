"""The study table: per task and KV setting, accuracy, paired Δ vs BF16 with its 95% interval, answer
flips, McNemar p, and a verdict on whether the task can tell formats apart at all.

Why a module of its own: a study splits one benchmark into small resumable cells (MMLU in subject
groups ``mmlu_a``, ``mmlu_b``, ...), and a reader wants one row per benchmark, pooled over those
cells and paired question by question. Pooling happens here, on the per-sample records, never on
cell means (equal-sized cells would hide nothing, but unequal ones would weight wrongly).

Each format's row gets a **verdict**, reported, never used to drop a row:

- ``non-discriminative: BF16 within chance``: the baseline accuracy's 95% interval reaches chance
  (the model does not know the task, so no format can lose it); the whole task is flagged.
- ``loss`` / ``gain``: the paired 95% interval of Δ excludes 0 and the exact sign test on the
  samples scored lower / higher agrees (p < 0.05; for 0/1 outcomes it is McNemar's exact test). A
  wide interval that excludes 0 has still told formats apart.
- ``underpowered``: the interval excludes 0 but the sign test does not (p >= 0.05): with a handful
  of samples a bootstrap of identical differences collapses to a point (3 of 3 pass-keys lost gives
  [-100, -100]) while the exact test cannot reach significance (p = 0.25 at best for n = 3).
- ``non-discriminative: Δ interval ±X pts > ±5``: the interval includes 0 and is wider than
  ``max_half_width``: too few samples to tell formats apart at the size of effect that matters.
- ``ok``: the interval includes 0 and is narrow: no difference, to within its width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from nvfp4kv import stats

Z95 = 1.959963984540054
STUDY_COLUMNS = ["model", "task", "metric", "kv", "bits_per_element", "n", "accuracy", "acc_ci95", "delta",
                 "ci_low", "ci_high", "lost", "gained", "p_mcnemar", "verdict"]


def pool_tasks(samples: pd.DataFrame, pools: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Rename the cells' tasks ``pools[name]`` to ``name`` (e.g. ``{"mmlu": ["mmlu_a", "mmlu_b"]}``).

    Samples keep their own ``sample_task``/``doc_id``, so pairing stays question by question.
    """
    rename = {part: name for name, parts in pools.items() for part in parts}
    return samples.assign(task=samples["task"].map(lambda t: rename.get(t, t)))


def _records(group: pd.DataFrame) -> list[dict[str, Any]]:
    keys = group["sample_task"] if "sample_task" in group else group["task"]
    return [{"task": t, "doc_id": d, "metrics": {"m": v}} for t, d, v in zip(keys, group["doc_id"], group["value"])]


def _verdict(base_acc: float, base_n: int, chance: float | None, ci_low: float, ci_high: float,
             lost: int, gained: int, n: int, max_half_width: float) -> str:
    """The row's verdict (module docstring): ``lost``/``gained`` count samples scored lower/higher."""
    if chance is not None and base_n:
        se = math.sqrt(max(base_acc * (1 - base_acc), 1e-12) / base_n)
        if base_acc - Z95 * se <= chance:
            return f"non-discriminative: BF16 within chance ({100 * chance:.0f}%)"
    half_width = (ci_high - ci_low) / 2
    if math.isfinite(half_width) and (ci_high < 0 or ci_low > 0):
        p_sign = stats.mcnemar_exact(lost, gained)
        if p_sign >= 0.05:
            return f"underpowered: interval excludes 0, sign test p={p_sign:.2g} ({lost} lower, {gained} higher of {n})"
        return f"{'loss' if ci_high < 0 else 'gain'}: interval excludes 0"
    if math.isfinite(half_width) and half_width > max_half_width:
        return f"non-discriminative: Δ interval ±{100 * half_width:.1f} pts > ±{100 * max_half_width:.0f}"
    return "ok"


#: a task's headline per-sample metric, first present wins (lm-eval's MMLU and GSM8K keys, pass-key, RULER)
HEADLINE_METRICS = ("acc,none", "exact_match,flexible-extract", "acc", "score")


def headline_metrics(samples: pd.DataFrame, preference: Sequence[str] = HEADLINE_METRICS) -> dict[str, str]:
    """task -> the first metric of ``preference`` its samples carry (tasks with none are left out)."""
    out: dict[str, str] = {}
    for task, group in samples.groupby("task", sort=True):
        present = set(group["metric"].unique())
        chosen = next((m for m in preference if m in present), None)
        if chosen is not None:
            out[str(task)] = chosen
    return out


def study_table(samples: pd.DataFrame, *, metric: str | Mapping[str, str], baseline: str = "bf16",
                chance: Mapping[str, float] | None = None, bits: Mapping[str, float] | None = None,
                max_half_width: float = 0.05, n_boot: int = 4000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, task, kv) for ``metric`` (one name, or task -> name: each task's own
    headline metric, see :func:`headline_metrics`), per sample 0/1 or a fraction (RULER's partial
    scores; flips then count samples scored lower / higher): see the module docstring.

    ``chance``: task -> chance accuracy (MMLU 0.25); ``bits``: kv -> bits per element (display).
    ``lost``/``gained``: questions the baseline got right and this format wrong, and the reverse.
    """
    rows: list[dict[str, Any]] = []
    per_task = {} if isinstance(metric, str) else dict(metric)
    keep = (samples["metric"] == metric) if isinstance(metric, str) else (
        samples["metric"] == samples["task"].map(per_task))
    sel = samples[keep]
    for (model, task), group in sel.groupby(["model", "task"], sort=True):
        task_metric = per_task.get(task, metric) if per_task else metric
        base = group[group["kv"] == baseline]
        base_records = _records(base)
        base_acc = float(base["value"].mean()) if len(base) else math.nan
        verdicts: list[str] = []
        task_rows: list[dict[str, Any]] = []
        for kv, kv_group in group.groupby("kv", sort=False):
            acc = float(kv_group["value"].mean())
            n = int(len(kv_group))
            row: dict[str, Any] = {"model": model, "task": task, "metric": task_metric, "kv": kv,
                                   "bits_per_element": (bits or {}).get(kv, math.nan), "n": n, "accuracy": acc,
                                   "acc_ci95": Z95 * math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else math.nan}
            if kv == baseline or not base_records:
                row.update(delta=0.0 if kv == baseline else math.nan, ci_low=math.nan, ci_high=math.nan,
                           lost=0, gained=0, p_mcnemar=math.nan)
            else:
                paired = stats.paired_deltas(base_records, _records(kv_group), "m", n_boot=n_boot, seed=seed)
                _, a, b = stats.match_samples(base_records, _records(kv_group), "m")
                lost, gained = (stats.discordant_counts(a, b) if stats.is_binary(a) and stats.is_binary(b)
                                else (int(np.sum(a > b)), int(np.sum(b > a))))
                row.update(delta=paired["delta"], ci_low=paired["ci_low"], ci_high=paired["ci_high"], lost=lost,
                           gained=gained, p_mcnemar=paired["p_mcnemar"] if paired["p_mcnemar"] is not None else math.nan)
                if paired["n"] != len(base_records) or paired["n"] != n:
                    row["verdict_note"] = f"paired {paired['n']} of {n}"
                verdicts.append(_verdict(base_acc, len(base_records), (chance or {}).get(task), row["ci_low"],
                                         row["ci_high"], lost, gained, n, max_half_width))
            task_rows.append(row)
        task_verdict = next((v for v in verdicts if v.startswith("non-discriminative: BF16")), None)
        for row in task_rows:
            if row["kv"] == baseline:
                row["verdict"] = task_verdict or "baseline"
            else:
                row["verdict"] = task_verdict or verdicts.pop(0)
        rows.extend(task_rows)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=STUDY_COLUMNS)
    # baseline first, then most bits per element first (as every table of the analysis layer), then name
    bits_key = frame["bits_per_element"].astype(float).fillna(-1.0)
    frame = (frame.assign(_base=frame["kv"] != baseline, _bits=-bits_key)
             .sort_values(["model", "task", "_base", "_bits", "kv"]).drop(columns=["_base", "_bits"]))
    return frame[[c for c in STUDY_COLUMNS if c in frame] + [c for c in frame if c not in STUDY_COLUMNS]]


def study_markdown(table: pd.DataFrame, baseline: str = "bf16") -> str:
    """The table as a reader sees it: percent, points, flips as ``-lost/+gained``."""
    out = []
    for _, r in table.iterrows():
        is_base = r["kv"] == baseline
        delta = "(baseline)" if is_base else (
            f"{100 * r['delta']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
            if np.isfinite(r["ci_low"]) else "n/a")
        out.append({
            "task": r["task"], "KV": r["kv"],
            "bits": "" if not np.isfinite(r["bits_per_element"]) else f"{r['bits_per_element']:g}",
            "n": int(r["n"]), "accuracy %": f"{100 * r['accuracy']:.1f} ± {100 * r['acc_ci95']:.1f}",
            f"Δ vs {baseline} (pts) [95% CI]": delta,
            "flips (−lost/+gained)": "" if is_base else f"−{int(r['lost'])}/+{int(r['gained'])}",
            "McNemar p": "" if is_base or not np.isfinite(r["p_mcnemar"]) else f"{r['p_mcnemar']:.2g}",
            "verdict": r["verdict"],
        })
    frame = pd.DataFrame(out)
    return frame.to_markdown(index=False) if not frame.empty else "(no rows)"


def fidelity_summary(tidy: pd.DataFrame, metrics: Sequence[str] = ("kl_mean", "top1_agree", "greedy_agree_tokens", "sqnr_k_db_mean"),
                     baseline: str = "bf16") -> pd.DataFrame:
    """KV setting x fidelity metric (value ± 95% CI where a stderr exists), from :func:`load_results`."""
    sel = tidy[(tidy["task"] == "fidelity") & tidy["metric"].isin(metrics)]
    if sel.empty:
        return pd.DataFrame()
    cells = {}
    for _, r in sel.iterrows():
        se = float(r["stderr"]) if pd.notna(r["stderr"]) else math.nan
        cells.setdefault(r["kv"], {})[r["metric"]] = (f"{r['value']:.4g}" + (f" ± {Z95 * se:.2g}" if math.isfinite(se) else ""))
    order = [baseline, *[k for k in cells if k != baseline]]
    return pd.DataFrame([{"KV": kv, **cells[kv]} for kv in order if kv in cells])


def _paired_with_baseline(samples_by_kv: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str,
                          table: Any) -> Iterator[tuple[str, dict, dict, list]]:
    """``(kv, baseline table, kv table, shared keys)`` for every setting but the baseline that shares a
    sample with it; ``table`` maps a list of records to ``{(subtask, doc_id): value}``."""
    base = table(samples_by_kv.get(baseline, []))
    for kv, records in samples_by_kv.items():
        if kv == baseline:
            continue
        other = table(records)
        keys = [k for k in base if k in other]
        if keys:
            yield kv, base, other, keys


def answer_fidelity(samples_by_kv: Mapping[str, Sequence[Mapping[str, Any]]], *, baseline: str = "bf16",
                    n_boot: int = 4000, seed: int = 0) -> pd.DataFrame:
    """Fidelity on the task's own prompts: per KV setting, how far its distribution over a multiple-choice
    question's answers moves from the baseline's, question by question.

    ``samples_by_kv``: kv -> per-sample records (``nvfp4kv.results.read_samples``) of one pooled task;
    each record's choice log-likelihoods (:func:`nvfp4kv.analysis.gate.choice_logprobs`) are
    renormalized over the choices, ``p`` for the baseline and ``q`` for the setting. Columns: ``kl_mean``
    (mean KL(p || q) in nats, with a bootstrap 95% interval), ``kl_p95``, ``top1_agree`` (the same
    answer chosen: accuracy flips are the subset where one of them is right) and ``gold_logp_delta``
    (mean change of log q(gold) against log p(gold)). Costs nothing: the records hold the numbers.
    Why beside accuracy: 0/1 accuracy on a few hundred questions moves only when a flip happens;
    the distribution moves on every question.
    """
    from nvfp4kv.analysis.gate import choice_logprobs

    def table(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[np.ndarray, int | None]]:
        out = {}
        for r in records:
            logps = choice_logprobs(r)
            if logps:
                logps = np.asarray(logps, dtype=np.float64)
                gold = r.get("target")
                out[(str(r.get("subtask", r.get("task"))), str(r["doc_id"]))] = (
                    logps - np.logaddexp.reduce(logps), int(gold) if isinstance(gold, (int, float)) else None)
        return out

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for kv, base, other, keys in _paired_with_baseline(samples_by_kv, baseline, table):
        kl = np.array([float(np.sum(np.exp(base[k][0]) * (base[k][0] - other[k][0]))) for k in keys])
        agree = np.array([float(np.argmax(base[k][0]) == np.argmax(other[k][0])) for k in keys])
        gold = np.array([other[k][0][base[k][1]] - base[k][0][base[k][1]] for k in keys if base[k][1] is not None])
        boot = kl[rng.integers(0, kl.size, size=(n_boot, kl.size))].mean(axis=1)
        rows.append({"kv": kv, "n": len(keys), "kl_mean": float(kl.mean()),
                     "kl_ci_low": float(np.quantile(boot, 0.025)), "kl_ci_high": float(np.quantile(boot, 0.975)),
                     "kl_p95": float(np.quantile(kl, 0.95)), "top1_agree": float(agree.mean()),
                     "gold_logp_delta": float(gold.mean()) if gold.size else math.nan})
    return pd.DataFrame(rows, columns=["kv", "n", "kl_mean", "kl_ci_low", "kl_ci_high", "kl_p95", "top1_agree",
                                       "gold_logp_delta"])


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def generation_agreement(samples_by_kv: Mapping[str, Sequence[Mapping[str, Any]]], *,
                         baseline: str = "bf16") -> pd.DataFrame:
    """For generation tasks (records with a text ``prediction``): per KV setting, how long its greedy
    text stays the baseline's on the same prompts.

    Columns: ``n``, ``identical`` (fraction of generations equal to the baseline's), ``prefix_frac_mean``
    / ``prefix_frac_median`` (common prefix over the baseline's length, in characters) and
    ``same_answer`` (the same extracted answer under every filter the records carry). Why beside
    accuracy: on a handful of chain-of-thought problems accuracy is 0/1 noise, while the point where a
    quantized cache first changes a token is measured on every problem. Costs nothing: the records
    hold the texts.
    """
    def table(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
        return {(str(r.get("subtask", r.get("task"))), str(r["doc_id"])): r for r in records
                if isinstance(r.get("prediction"), str)}

    rows: list[dict[str, Any]] = []
    for kv, base, other, keys in _paired_with_baseline(samples_by_kv, baseline, table):
        fracs = np.array([_common_prefix(base[k]["prediction"], other[k]["prediction"])
                          / max(1, len(base[k]["prediction"])) for k in keys])
        identical = np.array([base[k]["prediction"] == other[k]["prediction"] for k in keys], dtype=float)
        same = np.array([(base[k].get("filtered") or {}) == (other[k].get("filtered") or {}) for k in keys], dtype=float)
        rows.append({"kv": kv, "n": len(keys), "identical": float(identical.mean()),
                     "prefix_frac_mean": float(fracs.mean()), "prefix_frac_median": float(np.median(fracs)),
                     "same_answer": float(same.mean())})
    return pd.DataFrame(rows, columns=["kv", "n", "identical", "prefix_frac_mean", "prefix_frac_median", "same_answer"])


#: the metric :func:`add_stated_answer` adds beside lm-eval's GSM8K filters
STATED_ANSWER_METRIC = "exact_match,stated-answer"
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def stated_answer(prediction: str) -> str | None:
    """The number a chain of thought states as its answer: the first ``\\boxed{...}``, else the first
    "answer is N", else the last number before the first code fence; None when there is none.

    Why beside lm-eval's filters: a coder instruct model answers ("... so she makes $18. The answer
    is $18.") and then appends a Python check, so lm-eval's ``strict-match`` ("The answer is N.", no
    ``$``) misses most answers and ``flexible-extract`` (the last number) reads the code. This is
    our extraction, reported next to lm-eval's, never instead of it.
    """
    boxed = re.search(r"\\boxed\{([^}]*)\}", prediction)
    if boxed:
        found = re.findall(_NUMBER, boxed.group(1))
        if found:
            return _clean_number(found[0])
    stated = re.search(r"answer is[^0-9\-$]{0,20}(" + _NUMBER + ")", prediction)
    if stated:
        return _clean_number(stated.group(1))
    found = re.findall(_NUMBER, prediction.split("```")[0])
    return _clean_number(found[-1]) if found else None


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def _same_number(a: str | None, b: str) -> bool:
    try:
        return a is not None and float(a) == float(b)
    except ValueError:
        return False


def add_stated_answer(samples: pd.DataFrame, source_metric: str = "exact_match,flexible-extract") -> pd.DataFrame:
    """``samples`` plus one ``STATED_ANSWER_METRIC`` row per GSM8K-style sample (a ``target`` holding
    ``#### N`` and a text ``prediction``): 1.0 when :func:`stated_answer` equals N."""
    if "prediction" not in samples or "target" not in samples:
        return samples
    rows = samples[(samples["metric"] == source_metric) & samples["target"].astype(str).str.contains("####")
                   & samples["prediction"].map(lambda p: isinstance(p, str))]
    if rows.empty:
        return samples
    gold = rows["target"].astype(str).map(lambda t: _clean_number(t.split("####")[-1].strip()))
    value = [float(_same_number(stated_answer(p), g)) for p, g in zip(rows["prediction"], gold)]
    return pd.concat([samples, rows.assign(metric=STATED_ANSWER_METRIC, value=value)], ignore_index=True)
