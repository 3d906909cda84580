"""The study (issue 13): its sweep composes and runs on a tiny slice, and its table pools cells,
pairs questions, counts flips and flags tasks that cannot tell formats apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.study_report import auto_pools, build
from nvfp4kv.analysis.study import answer_fidelity, headline_metrics, pool_tasks, study_table

REPO = Path(__file__).resolve().parents[1]
SMOL_SCALES = REPO / "results/scales/smollm2-135m-instruct/gsm8k-n96-L1024-s1234.json"


def frame(kv: str, task: str, outcomes: list[int], subject: str = "s") -> pd.DataFrame:
    return pd.DataFrame({"model": "m", "task": task, "kv": kv, "metric": "acc", "sample_task": task,
                         "doc_id": [f"{subject}:{i}" for i in range(len(outcomes))], "value": outcomes})


def test_pooled_rows_pair_question_by_question_and_count_flips():
    base = pd.concat([frame("bf16", "mmlu_a", [1, 1, 0, 1] * 50, "x"), frame("bf16", "mmlu_b", [1, 0] * 100, "y")])
    # nvfp4 loses the first question of every 4 in part a, gains every second in part b
    lossy = pd.concat([frame("nvfp4", "mmlu_a", [0, 1, 0, 1] * 50, "x"), frame("nvfp4", "mmlu_b", [1, 1] * 100, "y")])
    pooled = pool_tasks(pd.concat([base, lossy]), auto_pools(["mmlu_a", "mmlu_b"]))
    table = study_table(pooled, metric="acc", chance={"mmlu": 0.25}, bits={"bf16": 16, "nvfp4": 4.5}, n_boot=500)
    assert list(table["task"]) == ["mmlu", "mmlu"] and list(table["kv"]) == ["bf16", "nvfp4"]
    row = table.iloc[1]
    assert row["n"] == 400 and (row["lost"], row["gained"]) == (50, 100)
    assert row["delta"] == pytest.approx((100 - 50) / 400)
    assert row["ci_low"] < row["delta"] < row["ci_high"]
    # 150 discordant answers of 400 (50 lost, 100 gained): an interval of about +-5.8 points, wider than
    # the default +-5, but it excludes 0 and McNemar agrees: the task told the formats apart
    assert row["ci_low"] > 0 and row["p_mcnemar"] < 0.05
    assert row["verdict"] == "gain: interval excludes 0"


def test_verdicts_separate_wide_from_resolved_from_underpowered():
    base = frame("bf16", "t", [1, 0] * 100)
    # 75 lost, 75 gained of 200: Δ 0 with an interval of about +-12 points -> cannot tell
    even = frame("even", "t", [0, 1] * 75 + [1, 0] * 25)
    # 20 lost of 200, none gained: a clear loss
    lossy = frame("lossy", "t", [0, 0] * 20 + [1, 0] * 80)
    # answers identical to bf16: Δ 0 with a zero-width interval
    same = frame("same", "t", [1, 0] * 100)
    table = study_table(pd.concat([base, even, lossy, same]), metric="acc", n_boot=500).set_index("kv")
    assert table.loc["even", "verdict"].startswith("non-discriminative: Δ interval ±")
    assert table.loc["lossy", "verdict"] == "loss: interval excludes 0"
    assert table.loc["same", "verdict"] == "ok"
    # 3 of 3 lost: the bootstrap collapses to [-100, -100], the exact sign test gives p = 0.25
    tiny = study_table(pd.concat([frame("bf16", "p", [1, 1, 1]), frame("nvfp4", "p", [0, 0, 0])]),
                       metric="acc", n_boot=200).set_index("kv")
    assert tiny.loc["nvfp4", "ci_high"] < 0
    assert tiny.loc["nvfp4", "verdict"] == "underpowered: interval excludes 0, sign test p=0.25 (3 lower, 0 higher of 3)"
    # partial scores (RULER): 7 of 7 samples lower is significant (p = 2 / 2**7), 3 of 7 is not
    scores = [1.0, 0.8, 0.6, 1.0, 0.5, 0.75, 1.0]
    partial = study_table(pd.concat([frame("bf16", "r", scores), frame("all7", "r", [x - 0.4 for x in scores]),
                                     frame("some3", "r", [x - 0.4 for x in scores[:3]] + scores[3:])]),
                          metric="acc", n_boot=500).set_index("kv")
    assert partial.loc["all7", "verdict"] == "loss: interval excludes 0"
    assert partial.loc["some3", "verdict"].startswith("underpowered")


def test_a_task_at_chance_is_flagged_non_discriminative():
    chance_level = frame("bf16", "mmlu", [1, 0, 0, 0] * 10).assign(sample_task="mmlu")
    other = frame("fp8", "mmlu", [0, 1, 0, 0] * 10).assign(sample_task="mmlu")
    table = study_table(pd.concat([chance_level, other]), metric="acc", chance={"mmlu": 0.25}, n_boot=200)
    assert all(v.startswith("non-discriminative: BF16 within chance") for v in table["verdict"])


def test_each_task_is_scored_by_its_own_headline_metric_and_partial_scores_count_as_flips():
    """One table over the study's run dirs: MMLU by acc,none, GSM8K by flexible-extract, RULER by its
    partial score (a sample scored lower counts as lost)."""
    def rows(kv, task, metric, values):
        return frame(kv, task, values).assign(metric=metric)

    samples = pd.concat([
        rows("bf16", "mmlu", "acc,none", [1, 0, 1, 1]), rows("nvfp4", "mmlu", "acc,none", [1, 1, 1, 0]),
        rows("bf16", "gsm8k", "exact_match,flexible-extract", [1, 1, 0, 0]),
        rows("bf16", "gsm8k", "exact_match,strict-match", [0, 0, 0, 0]),
        rows("nvfp4", "gsm8k", "exact_match,flexible-extract", [1, 0, 0, 0]),
        rows("nvfp4", "gsm8k", "exact_match,strict-match", [0, 0, 0, 0]),
        rows("bf16", "ruler_4k", "score", [1.0, 0.5, 0.75, 0.0]), rows("nvfp4", "ruler_4k", "score", [1.0, 0.25, 1.0, 0.0]),
    ])
    chosen = headline_metrics(samples)
    assert chosen == {"gsm8k": "exact_match,flexible-extract", "mmlu": "acc,none", "ruler_4k": "score"}
    table = study_table(samples, metric=chosen, n_boot=200).set_index(["task", "kv"])
    assert table.loc[("gsm8k", "nvfp4"), "metric"] == "exact_match,flexible-extract"
    assert table.loc[("gsm8k", "nvfp4"), "delta"] == pytest.approx(-0.25)
    assert (table.loc[("mmlu", "nvfp4"), "lost"], table.loc[("mmlu", "nvfp4"), "gained"]) == (1, 1)
    ruler = table.loc[("ruler_4k", "nvfp4")]
    assert ruler["delta"] == pytest.approx(0.0) and (ruler["lost"], ruler["gained"]) == (1, 1)
    assert pd.isna(ruler["p_mcnemar"])  # McNemar needs 0/1 outcomes


def test_answer_fidelity_is_the_kl_between_the_renormalized_choice_distributions():
    import math

    def rec(doc, logps, gold):
        return {"doc_id": doc, "subtask": "s", "target": gold, "filtered": {"none": [[x, False] for x in logps]}}

    base = [rec(0, [math.log(0.5), math.log(0.5)], 0), rec(1, [math.log(0.9), math.log(0.1)], 0)]
    # unnormalized log-likelihoods: only their differences matter
    kv = [rec(0, [math.log(0.25) - 3, math.log(0.75) - 3], 0), rec(1, [math.log(0.9) + 1, math.log(0.1) + 1], 0)]
    table = answer_fidelity({"bf16": base, "nvfp4": kv}, n_boot=100).set_index("kv")
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert table.loc["nvfp4", "n"] == 2
    assert table.loc["nvfp4", "kl_mean"] == pytest.approx(kl0 / 2)
    assert table.loc["nvfp4", "top1_agree"] == pytest.approx(0.5)  # a 0.5/0.5 tie picks choice 0; 0.25/0.75 picks 1
    assert table.loc["nvfp4", "gold_logp_delta"] == pytest.approx((math.log(0.25) - math.log(0.5)) / 2)


def test_generation_agreement_measures_how_long_the_text_stays_the_baselines():
    from nvfp4kv.analysis.study import generation_agreement

    def rec(doc, text, answer):
        return {"doc_id": doc, "subtask": "g", "prediction": text, "filtered": {"flexible-extract": [answer]}}

    base = [rec(0, "abcdefghij", "7"), rec(1, "0123456789", "3"), rec(2, "xy", "1")]
    kv = [rec(0, "abcdefghij", "7"), rec(1, "01234zzzzz", "3"), rec(2, "qq", "2"), rec(9, "only here", "0")]
    table = generation_agreement({"bf16": base, "nvfp4": kv}).set_index("kv")
    assert table.loc["nvfp4", "n"] == 3  # paired on (subtask, doc_id): doc 9 has no baseline
    assert table.loc["nvfp4", "identical"] == pytest.approx(1 / 3)
    assert table.loc["nvfp4", "prefix_frac_mean"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert table.loc["nvfp4", "prefix_frac_median"] == pytest.approx(0.5)
    assert table.loc["nvfp4", "same_answer"] == pytest.approx(2 / 3)
    assert generation_agreement({"bf16": [{"doc_id": 0, "filtered": {}}]}).empty  # no text: nothing to compare


@pytest.mark.parametrize("text,answer", [
    ("so she makes $18 a day. The answer is $18. Let's confirm with Python.\n```python\nprint(9*2)\n```\n18", "18"),
    ("Total 3.0 bolts.\n```python\nx = 2\n```\nThe total is \\(\\boxed{3}\\).", "3"),
    ("He runs 9 * 60 = 540 meters.\n```python\nprint(540 + 1)\n```", "540"),
    ("the profit is $1,250.50.", "1250.50"),
    ("the answer is -7", "-7"),
    ("no number at all", None),
])
def test_stated_answer_reads_the_answer_not_the_appended_code(text, answer):
    from nvfp4kv.analysis.study import stated_answer

    assert stated_answer(text) == answer


def test_add_stated_answer_scores_gsm8k_records_only():
    import pandas as pd

    from nvfp4kv.analysis.study import STATED_ANSWER_METRIC, add_stated_answer

    frame = pd.DataFrame([
        {"task": "g", "kv": "bf16", "doc_id": 0, "metric": "exact_match,flexible-extract", "value": 0.0,
         "target": "2+2=4\n#### 4", "prediction": "The answer is 4.\n```python\nprint(5)\n```"},
        {"task": "g", "kv": "bf16", "doc_id": 1, "metric": "exact_match,flexible-extract", "value": 0.0,
         "target": "#### 1,000", "prediction": "It costs 999 dollars."},
        {"task": "m", "kv": "bf16", "doc_id": 0, "metric": "acc,none", "value": 1.0, "target": "2", "prediction": None},
    ])
    out = add_stated_answer(frame)
    stated = out[out["metric"] == STATED_ANSWER_METRIC].set_index("doc_id")["value"]
    assert stated.to_dict() == {0: 1.0, 1: 0.0}
    assert len(out) == len(frame) + 2


def test_study_sweep_composes_and_runs_on_a_tiny_slice(tmp_path):
    """The committed study config (every KV setting, static scales, both task kinds) end to end, on
    the embedded model with SmolLM2's own scales file and one MMLU question."""
    run_dir = tmp_path / "study"
    statics = [f"kvs.{kv}.static_scales_file={SMOL_SCALES}" for kv in ("fp8", "nvfp4", "k_fp8_v_nvfp4")]
    cmd = [sys.executable, "-m", "experiments.run", "+sweep=study", "model=smollm2",
           "model.name_or_path=embedded:smollm2-135m-instruct", "model.dtype=float32", f"run_dir={run_dir}",
           "progress=false", "~tasks.mmlu_b", "~tasks.mmlu_c", "tasks.mmlu_a.subjects=[abstract_algebra]",
           "tasks.mmlu_a.limit=1", "tasks.fidelity.context_lens=[64]", "tasks.fidelity.n_score=8",
           "tasks.fidelity.n_windows=1", "tasks.fidelity.greedy_prompts=1", "tasks.fidelity.greedy_prompt_len=16",
           "tasks.fidelity.greedy_tokens=4", "tasks.fidelity.capture_tokens=64", *statics]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = build([str(run_dir)], tmp_path / "report")
    table = pd.read_csv(paths["csv"])
    assert sorted(table["kv"]) == sorted(["bf16", "fp8", "nvfp4", "k_fp8_v_nvfp4", "mxfp4", "fp4_mx_block16",
                                          "int4_kivi"])
    assert (table["n"] == 1).all() and paths["figure"].stat().st_size > 0
    assert "kl_mean" in paths["fidelity"].read_text()
