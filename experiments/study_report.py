"""The study's tables and figure from its run directories: ``python -m experiments.study_report <run dir>...``.

Several run dirs (the study's MMLU, GSM8K and retrieval sweeps) go into one table, each task scored
by its headline metric. Pools a benchmark split into resumable cells (``mmlu_a``, ``mmlu_b``, ``mmlu_c`` -> ``mmlu``: any
tasks named ``<name>_<letter>``) question by question, then writes, next to the first run dir
unless ``--out`` says otherwise: ``study_table.md`` / ``study_table.csv`` (accuracy, paired Δ vs
BF16 with its 95% interval, answer flips, McNemar p, verdict), ``fidelity.md``,
``answer_fidelity.md`` (multiple choice), ``generation_agreement.md`` (generation tasks) and
``study_delta.png`` (Δ vs KV bits per element). Everything goes through :mod:`nvfp4kv.analysis`.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

from nvfp4kv import analysis as A
from nvfp4kv import results as records
from nvfp4kv.analysis.study import (
    STATED_ANSWER_METRIC,
    add_stated_answer,
    answer_fidelity,
    fidelity_summary,
    generation_agreement,
    headline_metrics,
    pool_tasks,
    study_markdown,
    study_table,
)

#: chance accuracy of the pooled tasks a study uses (a flag, not a correction)
CHANCE = {"mmlu": 0.25}


def auto_pools(tasks: list[str]) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        m = re.fullmatch(r"(.+)_[a-z]", task)
        if m:
            pools[m.group(1)].append(task)
    return {name: sorted(parts) for name, parts in pools.items() if len(parts) > 1}


def samples_by_task(run_dirs: list[str], pools: dict[str, list[str]]) -> dict[tuple[str, str], dict[str, list]]:
    """(model, pooled task) -> kv -> every per-sample record."""
    pooled_name = {part: name for name, parts in pools.items() for part in parts}
    by_task: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for cell in A.load_cells(run_dirs):
        task = pooled_name.get(cell["task"], cell["task"])
        by_task[(cell["model"], task)][cell["kv"]].extend(records.read_samples(cell["_run_dir"], cell["cell_id"]))
    return by_task


def answer_fidelity_table(by_task: dict[tuple[str, str], dict[str, list]], baseline: str = "bf16") -> pd.DataFrame:
    """Per pooled multiple-choice task and KV setting (``by_task``: :func:`samples_by_task`): the
    answer distribution's drift from the baseline on the same questions
    (:func:`nvfp4kv.analysis.study.answer_fidelity`)."""
    frames = [answer_fidelity(kvs, baseline=baseline).assign(model=model, task=task)
              for (model, task), kvs in sorted(by_task.items())]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def generation_agreement_markdown(by_task: dict[tuple[str, str], dict[str, list]], baseline: str = "bf16") -> str:
    """Per generation task and KV setting (``by_task``: :func:`samples_by_task`): how long the greedy
    text stays the baseline's (:func:`nvfp4kv.analysis.study.generation_agreement`)."""
    frames = [generation_agreement(kvs, baseline=baseline).assign(task=task)
              for (_, task), kvs in sorted(by_task.items())]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return "(no generation task with a baseline)"
    frame = pd.concat(frames, ignore_index=True)
    view = pd.DataFrame({
        "task": frame["task"], "KV": frame["kv"], "n": frame["n"],
        "identical to bf16 %": frame["identical"].map(lambda x: f"{100 * x:.1f}"),
        "common prefix, mean % of bf16's text": frame["prefix_frac_mean"].map(lambda x: f"{100 * x:.1f}"),
        "median %": frame["prefix_frac_median"].map(lambda x: f"{100 * x:.1f}"),
        "same extracted answer %": frame["same_answer"].map(lambda x: f"{100 * x:.1f}"),
    })
    return view.to_markdown(index=False)


def answer_fidelity_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no multiple-choice task with a baseline)"
    view = pd.DataFrame({
        "task": frame["task"], "KV": frame["kv"], "n": frame["n"],
        "KL(bf16‖kv) over the answers, nats [95% CI]": [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in
                                                      zip(frame["kl_mean"], frame["kl_ci_low"], frame["kl_ci_high"])],
        "KL p95": frame["kl_p95"].map(lambda x: f"{x:.4f}"),
        "same answer %": frame["top1_agree"].map(lambda x: f"{100 * x:.1f}"),
        "Δ log p(gold)": frame["gold_logp_delta"].map(lambda x: f"{x:+.4f}"),
    })
    return view.to_markdown(index=False)


def build(run_dirs: list[str], out: Path, baseline: str = "bf16", metric: str = "auto") -> dict[str, Path]:
    """``metric="auto"``: each task's headline metric (MMLU ``acc,none``, GSM8K
    ``exact_match,flexible-extract``, pass-key ``acc``, RULER ``score``)."""
    tidy = A.load_results(run_dirs)
    samples = A.load_samples(run_dirs)
    pools = auto_pools(sorted(samples["task"].unique()))
    pooled = pool_tasks(samples, pools)
    bits = {kv: float(b) for kv, b in tidy.groupby("kv")["bits_per_element"].first().items() if pd.notna(b)}
    chosen = headline_metrics(pooled) if metric == "auto" else metric
    table = study_table(pooled, metric=chosen, baseline=baseline, chance=CHANCE, bits=bits)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "study_table.csv", "md": out / "study_table.md", "fidelity": out / "fidelity.md",
             "figure": out / "study_delta.png"}
    A.to_csv(table, paths["csv"])
    paths["md"].write_text(study_markdown(table, baseline) + "\n")
    fid = fidelity_summary(tidy, baseline=baseline)
    paths["fidelity"].write_text((fid.to_markdown(index=False) if not fid.empty else "(no fidelity cells)") + "\n")
    paths["answer_fidelity"] = out / "answer_fidelity.md"
    by_task = samples_by_task(run_dirs, pools)  # every record read once for both per-record tables
    answers = answer_fidelity_table(by_task, baseline)
    if not answers.empty:  # the study table's row order (most bits first)
        rank = {kv: i for i, kv in enumerate(dict.fromkeys(table["kv"]))}
        answers = answers.sort_values(["task", "kv"], key=lambda col: col.map(rank) if col.name == "kv" else col)
    paths["answer_fidelity"].write_text(answer_fidelity_markdown(answers) + "\n")
    paths["generation_agreement"] = out / "generation_agreement.md"
    paths["generation_agreement"].write_text(generation_agreement_markdown(by_task, baseline) + "\n")
    stated = add_stated_answer(pooled)
    stated_tasks = {str(t): STATED_ANSWER_METRIC for t in stated.loc[stated["metric"] == STATED_ANSWER_METRIC, "task"].unique()}
    if stated_tasks:  # GSM8K: the answer the text states, beside lm-eval's filters (nvfp4kv.analysis.study.stated_answer)
        paths["stated_answer"] = out / "stated_answer.md"
        stated_table = study_table(stated, metric=stated_tasks, baseline=baseline, chance=CHANCE, bits=bits)
        paths["stated_answer"].write_text(study_markdown(stated_table, baseline) + "\n")
    cmp_like = table.assign(value=table["accuracy"], run_id="study", stderr=table["acc_ci95"] / 1.96)
    A.save_figure(A.plot_delta_vs_bits(cmp_like, baseline=baseline), paths["figure"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="default: <first run dir>/study")
    parser.add_argument("--baseline", default="bf16")
    parser.add_argument("--metric", default="auto", help="a per-sample metric, or auto: each task's headline metric")
    args = parser.parse_args(argv)
    out = args.out or Path(args.run_dirs[0]) / "study"
    paths = build(args.run_dirs, out, args.baseline, args.metric)
    print(paths["md"].read_text())
    print(paths["fidelity"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
