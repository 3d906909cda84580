"""Load sweep results as tidy pandas frames: metrics, per-sample records, retrieval grids, per-layer error.

Each loader accepts what :func:`~nvfp4kv.analysis.runs.resolve_run_dirs` accepts (a run dir,
a glob, a parent dir, a list) and merges every run it names, tagging rows with ``run_id`` so
runs stay distinguishable. The cell JSONs are the source of truth (``results.csv`` is a
derived view); they are read and flattened by :mod:`nvfp4kv.results`, the same code the sweep
runner uses to write ``results.csv``, so the two views cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from nvfp4kv import results as sweep_results
from nvfp4kv.analysis.runs import PathSpec, resolve_run_dirs

#: the columns every metrics frame starts with, in this order (more may follow)
TIDY_COLUMNS = ["model", "task", "metric", "kv", "policy", "value", "stderr", "n", "run_id", "bits_per_element"]
GRID_COLUMNS = ["run_id", "model", "task", "kv", "policy", "bits_per_element", "context_len", "depth", "acc", "n"]
LAYER_COLUMNS = ["run_id", "model", "task", "kv", "policy", "layer", "head", "kind", "sqnr_db", "attn_rel_err"]
SAMPLE_COLUMNS = ["run_id", "cell_id", "model", "task", "kv", "policy", "doc_id", "metric", "value"]


def load_cells(spec: PathSpec) -> list[dict[str, Any]]:
    """Every cell record of every run named by ``spec`` (dicts as in ``cells/<cell_id>.json``)."""
    cells: list[dict[str, Any]] = []
    for run_dir in resolve_run_dirs(spec):
        for cell in sweep_results.read_cells(run_dir):
            cell = dict(cell)
            cell.setdefault("run_id", run_dir.name)
            cell["_run_dir"] = str(run_dir)
            cells.append(cell)
    return cells


def _cell_policy(cell: dict[str, Any]) -> str:
    """The cell's ``policy`` string exactly as the tidy frame spells it (one spelling everywhere)."""
    return sweep_results.policy_label(cell.get("kv_config") or {})


def load_results(spec: PathSpec) -> pd.DataFrame:
    """One row per run x model x task x metric x kv: the frame every table and plot starts from.

    Columns: :data:`TIDY_COLUMNS` first, then whatever else the sweep records (``k_format``,
    ``v_format``, ...). ``value``/``stderr``/``bits_per_element`` are floats (NaN when unknown),
    ``n`` a nullable integer.
    """
    frame = sweep_results.tidy_frame(load_cells(spec))
    for column in ("value", "stderr", "bits_per_element", "n"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    rest = [c for c in frame.columns if c not in TIDY_COLUMNS]
    missing = [c for c in TIDY_COLUMNS if c not in frame.columns]
    for column in missing:
        frame[column] = math.nan
    return frame[TIDY_COLUMNS + rest].reset_index(drop=True)


def load_samples(
    spec: PathSpec, *, task: str | None = None, kv: str | None = None, model: str | None = None
) -> pd.DataFrame:
    """Per-sample outcomes, long: one row per run x cell x sample x metric (filters optional).

    Long rather than wide because tasks have different metrics; the scalar keys a sample
    carries besides ``metrics`` (``context_len``, ``depth``, ``target``, ...) become columns.
    """
    rows: list[dict[str, Any]] = []
    for cell in load_cells(spec):
        if (task and cell["task"] != task) or (kv and cell["kv"] != kv) or (model and cell["model"] != model):
            continue
        ident = {"run_id": cell["run_id"], "cell_id": cell["cell_id"], "model": cell["model"],
                 "task": cell["task"], "kv": cell["kv"], "policy": _cell_policy(cell)}
        for sample in sweep_results.read_samples(cell["_run_dir"], cell["cell_id"]):
            scalars = {k: v for k, v in sample.items()
                       if k not in ("metrics", "task", "kv", "model") and not isinstance(v, (dict, list))}
            # a task group's subtasks (MMLU subjects) restart doc_id: keep the sample's own task
            scalars["sample_task"] = sample.get("task", cell["task"])
            for metric, value in (sample.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    rows.append({**scalars, **ident, "metric": metric, "value": float(value)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    rest = [c for c in frame.columns if c not in SAMPLE_COLUMNS]
    return frame[SAMPLE_COLUMNS + rest]


def _extra_rows(spec: PathSpec, key: str) -> list[dict[str, Any]]:
    """Rows of ``cell["extra"][key]`` tables, each tagged with its cell's identity."""
    rows: list[dict[str, Any]] = []
    for cell in load_cells(spec):
        table = (cell.get("extra") or {}).get(key)
        if not table:
            continue
        ident = {"run_id": cell["run_id"], "model": cell["model"], "task": cell["task"], "kv": cell["kv"],
                 "policy": _cell_policy(cell), "bits_per_element": cell.get("bits_per_element")}
        rows.extend({**ident, **row} for row in table)
    return rows


def load_grid(spec: PathSpec) -> pd.DataFrame:
    """Retrieval grids (``extra["grid"]``): accuracy per context length x needle depth x kv."""
    frame = pd.DataFrame(_extra_rows(spec, "grid"))
    if frame.empty:
        return pd.DataFrame(columns=GRID_COLUMNS)
    rest = [c for c in frame.columns if c not in GRID_COLUMNS]
    for column in GRID_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    return frame[GRID_COLUMNS + rest]


def load_per_layer(spec: PathSpec) -> pd.DataFrame:
    """Per-layer fidelity (``extra["per_layer"]``): SQNR etc. per layer x head x kind (k or v).

    ``sqnr_db`` is NaN where the round trip was exact (BF16 storing a BF16 model: the ratio is
    infinite and the cell stores null) or unknown; plots list such formats as lossless.
    """
    frame = pd.DataFrame(_extra_rows(spec, "per_layer"))
    if frame.empty:
        return pd.DataFrame(columns=LAYER_COLUMNS)
    for column in LAYER_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    for column in ("sqnr_db", "attn_rel_err"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    rest = [c for c in frame.columns if c not in LAYER_COLUMNS]
    return frame[LAYER_COLUMNS + rest]
