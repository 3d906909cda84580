"""A small but realistic sweep run directory, written in the RESULTS_LAYOUT format.

Analysis code, notebooks and figure scripts are tested against this instead of a real sweep,
which would take minutes of CPU per format. It is *generated* (into ``tmp_path``) rather than
committed so that it follows the layout contract as the code does, and it is realistic where the
analysis cares: the same ``doc_id`` appears for every KV format (paired samples), outcomes are
correlated across formats the way a mild perturbation of the cache correlates them, the passkey
grid is aggregated from its own samples, and the fidelity cell carries a per-layer table.

The numbers are synthetic (drawn from a seeded RNG); nothing here is a measurement.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import sem

from nvfp4kv.analysis.report import write_report
from nvfp4kv.cache import KVCacheConfig
from nvfp4kv.results import atomic_write_text, write_cell

MODEL = "smollm2-135m-instruct"
KVS: dict[str, dict[str, Any]] = {
    # kv label -> (k/v format, bits per element, how far its outcomes drift from BF16)
    "bf16": {"format": "bf16", "bits": 16.0, "flip": 0.0, "sqnr_db": math.inf},  # lossless
    "fp8_e4m3": {"format": "fp8_e4m3", "bits": 8.0, "flip": 0.05, "sqnr_db": 31.0},
    "nvfp4": {"format": "nvfp4", "bits": 4.5, "flip": 0.18, "sqnr_db": 19.5},
}
CONTEXT_LENS = (1024, 2048, 4096)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: passkey retrieval probability at 1K tokens and per doubling of context, per kv label
_PASSKEY_P = {"bf16": (1.0, 0.85), "fp8_e4m3": (0.95, 0.82), "nvfp4": (0.8, 0.6)}
N_LAYERS, N_HEADS = 4, 3


def _kv_config(fmt: str) -> dict[str, Any]:
    """The cache config record of a symmetric format, exactly as the runner stores it."""
    return KVCacheConfig(k_format=fmt, v_format=fmt).to_dict()


def _paired_outcomes(rng: np.random.Generator, n: int, p_base: float) -> dict[str, np.ndarray]:
    """0/1 outcomes per kv label on the same docs: each format flips some BF16 outcomes.

    Flips are biased towards losing correct answers (quantization noise rarely fixes a wrong
    answer), so deltas are negative on average but not every sample moves the same way.
    """
    base = (rng.random(n) < p_base).astype(float)
    out = {}
    for kv, spec in KVS.items():
        flip = rng.random(n) < spec["flip"]
        lose = flip & (base == 1.0)
        gain = flip & (base == 0.0) & (rng.random(n) < 0.25)
        out[kv] = np.where(lose, 0.0, np.where(gain, 1.0, base))
    return out


def _metric(values: np.ndarray) -> dict[str, Any]:
    """Mean and its standard error (scipy's ``sem``: sample std / sqrt(n)), as the tasks report them."""
    return {"value": float(np.mean(values)), "stderr": float(sem(values)) if len(values) > 1 else None,
            "n": len(values)}


def _cell(run_id: str, task: str, kv: str, metrics: dict, extra: dict | None = None) -> dict[str, Any]:
    fmt = KVS[kv]["format"]
    cell_id = f"{MODEL}__{task}__{kv}"
    return {
        "cell_id": cell_id, "run_id": run_id, "model": MODEL, "task": task, "kv": kv,
        "kv_config": _kv_config(fmt), "bits_per_element": KVS[kv]["bits"],
        "task_config": {"name": task}, "config": {"model": {"name_or_path": "embedded:" + MODEL}},
        "versions": {"torch": "2.13.0", "transformers": "5.24.0", "lm_eval": "0.4.13", "nvfp4kv": "0.1.0"},
        "git": None, "started": "2025-01-01T00:00:00", "wall_s": 1.0,
        "metrics": metrics, "extra": extra or {},
    }


def _lm_task_cells(rng, run_id: str, task: str, metric_names: list[str], n: int, p: float):
    """Cells + samples for an lm-eval style task with one 0/1 outcome per metric."""
    outcomes = {m: _paired_outcomes(rng, n, p) for m in metric_names}
    for kv in KVS:
        samples = [
            {"doc_id": i, "task": task, "kv": kv, "model": MODEL,
             "metrics": {m: float(outcomes[m][kv][i]) for m in metric_names},
             "target": str(i % 7), "prediction": str(int(outcomes[metric_names[0]][kv][i]) * (i % 7))}
            for i in range(n)
        ]
        metrics = {m: _metric(outcomes[m][kv]) for m in metric_names}
        yield _cell(run_id, task, kv, metrics), samples


def _passkey_cells(rng, run_id: str, trials: int):
    """Passkey cells: samples over context length x depth, the grid aggregated from them."""
    for kv in KVS:
        p1k, decay = _PASSKEY_P[kv]
        samples, grid = [], []
        doc_id = 0
        for ctx in CONTEXT_LENS:
            p = p1k * decay ** math.log2(ctx / 1024)
            for depth in DEPTHS:
                hits = (rng.random(trials) < p).astype(float)
                for t in range(trials):
                    samples.append({"doc_id": doc_id, "task": "passkey", "kv": kv, "model": MODEL,
                                    "context_len": ctx, "depth": depth, "trial": t,
                                    "metrics": {"acc": float(hits[t])},
                                    "target": "68217", "prediction": "68217" if hits[t] else "6821"})
                    doc_id += 1
                grid.append({"context_len": ctx, "depth": depth, "acc": float(hits.mean()), "n": trials})
        metrics = {"acc": _metric(np.array([s["metrics"]["acc"] for s in samples]))}
        for ctx in CONTEXT_LENS:  # as nvfp4kv.eval.passkey reports them
            metrics[f"acc@{ctx}"] = _metric(np.array([s["metrics"]["acc"] for s in samples if s["context_len"] == ctx]))
        extra = {"grid": grid, "trials_per_point": trials, "seed": 0}
        yield _cell(run_id, "passkey", kv, metrics, extra), samples


def _fidelity_cells(rng, run_id: str, n_positions: int = 24):
    """Fidelity cells as ``nvfp4kv.metrics.task`` writes them: per-layer rows + per-position samples.

    BF16 storing a BF16 model is lossless: its ``sqnr_db`` is ``None`` (JSON has no Infinity).
    """
    for kv, spec in KVS.items():
        rows = []
        for layer in range(N_LAYERS):
            for head in range(N_HEADS):
                for kind in ("k", "v"):
                    if math.isinf(spec["sqnr_db"]):
                        sqnr, attn = None, 0.0
                    else:  # keys lose a little more (outlier channels), early layers more
                        sqnr = spec["sqnr_db"] - (1.5 if kind == "k" else 0.0) - 0.5 * (layer == 0) + rng.normal(0, 0.4)
                        attn = 10 ** (-sqnr / 20) * 0.8
                    rows.append({"layer": layer, "head": head, "kind": kind, "sqnr_db": sqnr, "attn_rel_err": attn})
        kl = np.abs(rng.normal(0, 1e-3 * spec["flip"] * 50, n_positions)) if spec["flip"] else np.zeros(n_positions)
        top1 = (rng.random(n_positions) >= spec["flip"]).astype(float)
        samples = [{"doc_id": i, "task": "fidelity", "probe": "next_token", "context_len": 256, "window": 0,
                    "position": 256 + i, "target": 17, "prediction": 17,
                    "metrics": {"kl": float(kl[i]), "top1_agree": float(top1[i]), "nll": 3.2 + float(kl[i])}}
                   for i in range(n_positions)]
        metrics = {"kl_mean": _metric(kl), "top1_agree": _metric(top1)}
        for kind in ("k", "v"):
            sq = [r["sqnr_db"] for r in rows if r["kind"] == kind and r["sqnr_db"] is not None]
            if sq:
                metrics[f"sqnr_db_{kind}"] = _metric(np.array(sq))
            metrics[f"attn_rel_err_{kind}"] = _metric(np.array([r["attn_rel_err"] for r in rows if r["kind"] == kind]))
        yield _cell(run_id, "fidelity", kv, metrics, {"per_layer": rows}), samples


def write_results_fixture(
    root: Path, *, sweep: str = "fixture", run_id: str = "20250101-000000-fix0", seed: int = 0,
    n_gsm8k: int = 40, n_mmlu: int = 60, passkey_trials: int = 4, with_report: bool = True,
) -> Path:
    """Write one run dir ``root/<sweep>/<run_id>/`` and return its path.

    Tasks: ``gsm8k`` (two metrics), ``mmlu``, ``passkey`` (grid in ``extra``), ``fidelity``
    (``per_layer`` in ``extra``); kv labels ``bf16``, ``fp8_e4m3``, ``nvfp4``. Cells are written
    with :func:`nvfp4kv.results.write_cell` and the derived files with
    :func:`nvfp4kv.analysis.report.write_report` (skip them with ``with_report=False``: they cost
    ~2 s of plotting).
    """
    rng = np.random.default_rng(seed)
    run_dir = Path(root) / sweep / run_id
    atomic_write_text(run_dir / "sweep.yaml", f"name: {sweep}\nmodel: {MODEL}\nkv: [{', '.join(KVS)}]\n")
    generators = [
        _lm_task_cells(rng, run_id, "gsm8k", ["exact_match,strict-match", "exact_match,flexible-extract"], n_gsm8k, 0.35),
        _lm_task_cells(rng, run_id, "mmlu", ["acc,none"], n_mmlu, 0.3),
        _passkey_cells(rng, run_id, passkey_trials),
        _fidelity_cells(rng, run_id),
    ]
    for gen in generators:
        for cell, samples in gen:
            write_cell(run_dir, cell, samples)  # the sweep runner's own writer: same files, same JSON
    if with_report:
        write_report(run_dir)  # results.csv, table.md, plots/ as the runner rebuilds them
    return run_dir
