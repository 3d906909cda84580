"""The scale-policy table (issue 11): ``python -m experiments.policy_report <run dir>... --out results/policies``.

Why a table of its own: the global scale of NVFP4 and FP8 KV comes from somewhere different in each
engine (a calibrated checkpoint, 1.0, the first batch), and the harness's default must be chosen from
measurements, not habit. Each row is one (model, format, scale policy) from ``+sweep=policies``
(embedded SmolLM2: fidelity on 1,024-token windows + MMLU 0-shot) or ``+sweep=policies_qwen``
(Qwen2.5-Coder-1.5B: MMLU 0-shot), with:

- the engine that runs that policy (docs/engines.md has the source lines);
- full-vocabulary fidelity (mean KL(bf16 ‖ kv) per next token with its 95% interval, top-1 agreement)
  where the run has a fidelity cell;
- MMLU accuracy Δ vs BF16 on the same questions with the paired bootstrap 95% interval and answer flips;
- answer fidelity on the same questions (KL over the renormalized choices, same answer %), which moves on
  every question where 0/1 accuracy moves only on a flip.

Everything comes from the run directories through :mod:`nvfp4kv.analysis` (the study's own functions);
writes ``policy_table.md`` and ``policy_table.csv``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.study_report import CHANCE, answer_fidelity_table, auto_pools, samples_by_task
from nvfp4kv import analysis as A
from nvfp4kv.analysis.study import Z95, headline_metrics, pool_tasks, study_table

#: which engine reads its KV scales this way (docs/engines.md cites the source of each)
ENGINE_OF_POLICY: dict[str, str] = {
    "static": "TensorRT-LLM (ModelOpt-calibrated scales)",
    "checkpoint": "vLLM V1, SGLang, TensorRT-LLM (scales in the checkpoint)",
    "unit": "vLLM V1 and SGLang without checkpoint scales",
    "first_batch": "vLLM <= 0.11 --calculate-kv-scales (removed)",
    "prefill": "none (research option)",
    "dynamic": "none (upper bound)",
}
FORMAT_NAMES = {"nvfp4": "NVFP4", "fp8_e4m3": "FP8", "bf16": "BF16"}


def _kv_settings(run_dirs: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, kv label) -> its KV config (from the cells)."""
    return {(c["model"], c["kv"]): c.get("kv_config") or {} for c in A.load_cells(run_dirs)}


def _policy_name(kv_config: dict[str, Any]) -> str:
    policy = str(kv_config.get("scale_policy", "prefill"))
    if policy == "first_batch" and kv_config.get("first_batch_divisors"):
        return "first_batch (vLLM divisors)"
    return policy


def _fidelity(tidy: pd.DataFrame) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    sel = tidy[tidy["task"] == "fidelity"]
    for _, r in sel.iterrows():
        out.setdefault((r["model"], r["kv"]), {})[r["metric"]] = float(r["value"])
        if r["metric"] == "kl_mean" and pd.notna(r["stderr"]):
            out[(r["model"], r["kv"])]["kl_ci"] = Z95 * float(r["stderr"])
    return out


def policy_table(run_dirs: list[str], baseline: str = "bf16") -> pd.DataFrame:
    """One row per (model, KV setting), baseline first; see the module docstring for the columns."""
    tidy = A.load_results(run_dirs)
    samples = A.load_samples(run_dirs)
    pools = auto_pools(sorted(samples["task"].unique())) if not samples.empty else {}
    pooled = pool_tasks(samples, pools) if not samples.empty else samples
    mmlu = pd.DataFrame()
    if not pooled.empty:
        accuracy = pooled[pooled["task"] != "fidelity"]
        if not accuracy.empty:
            mmlu = study_table(accuracy, metric=headline_metrics(accuracy), baseline=baseline, chance=CHANCE)
    answers = answer_fidelity_table(samples_by_task(run_dirs, pools), baseline) if not pooled.empty else pd.DataFrame()
    fidelity = _fidelity(tidy)
    settings = _kv_settings(run_dirs)
    rows: list[dict[str, Any]] = []
    for (model, kv), config in settings.items():
        fmt = str(config.get("k_format", kv))
        policy = "—" if fmt == "bf16" else _policy_name(config)
        row: dict[str, Any] = {"model": model, "kv": kv, "format": FORMAT_NAMES.get(fmt, fmt), "policy": policy,
                               "engine": "" if fmt == "bf16" else ENGINE_OF_POLICY.get(policy.split(" ")[0], "")}
        fid = fidelity.get((model, kv), {})
        row.update(kl_mean=fid.get("kl_mean", math.nan), kl_ci=fid.get("kl_ci", math.nan),
                   top1_agree=fid.get("top1_agree", math.nan))
        task_rows = mmlu[(mmlu["model"] == model) & (mmlu["kv"] == kv)] if not mmlu.empty else mmlu
        if not task_rows.empty:
            t = task_rows.iloc[0]
            row.update(task=t["task"], n=int(t["n"]), accuracy=t["accuracy"], delta=t["delta"], ci_low=t["ci_low"],
                       ci_high=t["ci_high"], lost=int(t["lost"]), gained=int(t["gained"]), verdict=t["verdict"])
        ans = answers[(answers["model"] == model) & (answers["kv"] == kv)] if not answers.empty else answers
        if not ans.empty:
            a = ans.iloc[0]
            row.update(answer_kl=a["kl_mean"], answer_kl_low=a["kl_ci_low"], answer_kl_high=a["kl_ci_high"],
                       same_answer=a["top1_agree"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {"BF16": 0, "NVFP4": 1, "FP8": 2}
    frame = frame.assign(_f=frame["format"].map(order).fillna(3), _p=frame["policy"].astype(str))
    return frame.sort_values(["model", "_f", "_p"]).drop(columns=["_f", "_p"]).reset_index(drop=True)


def _num(x: Any, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def policy_markdown(frame: pd.DataFrame) -> str:
    """The table as README shows it."""
    if frame.empty:
        return "(no cells)"
    out = []
    for _, r in frame.iterrows():
        is_base = r["format"] == "BF16"
        delta = ""
        if "delta" in r and pd.notna(r.get("delta")):
            delta = "(baseline)" if is_base else (
                f"{100 * r['delta']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] "
                f"(−{int(r['lost'])}/+{int(r['gained'])})")
        out.append({
            "model": r["model"], "KV": r["format"], "scale policy": r["policy"], "engine that does this": r["engine"],
            "next-token KL [95% CI]": "" if is_base or not math.isfinite(r["kl_mean"]) else
            f"{r['kl_mean']:.4f} ± {r['kl_ci']:.4f}",
            "top-1 agree": "" if is_base else _num(r["top1_agree"], ".3f"),
            "MMLU n": _num(r.get("n", math.nan), ".0f"),
            "MMLU acc %": "" if pd.isna(r.get("accuracy")) else f"{100 * r['accuracy']:.1f}",
            "MMLU Δ vs BF16, pts [95% CI] (flips)": delta,
            "answer KL": "" if is_base else _num(r.get("answer_kl", math.nan), ".4f"),
            "same answer %": "" if is_base or pd.isna(r.get("same_answer")) else f"{100 * r['same_answer']:.1f}",
        })
    return pd.DataFrame(out).to_markdown(index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("results/policies"))
    parser.add_argument("--baseline", default="bf16")
    args = parser.parse_args(argv)
    frame = policy_table(args.run_dirs, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    A.to_csv(frame, args.out / "policy_table.csv")
    text = policy_markdown(frame)
    (args.out / "policy_table.md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out / 'policy_table.md'} and {args.out / 'policy_table.csv'}")


if __name__ == "__main__":
    main()
