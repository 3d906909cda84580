"""Records to tidy pandas frames: metrics, per-sample outcomes, retrieval grids, per-layer error.

The cell JSONs and sample JSONL files (read by :mod:`nvfp4kv.results`) are the source of truth;
every table and figure starts from the frames built here, the run-dir report (``results.csv``,
``table.md``) included, so no two views can drift apart.

Two layers: ``*_frame(cells)`` flattens a list of cell records, and ``load_*(spec)`` does the same
for every run named by ``spec`` (what :func:`~nvfp4kv.analysis.runs.resolve_run_dirs` accepts: a
run dir, a glob, a parent dir, a list), tagging rows with ``run_id`` so merged runs stay apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from nvfp4kv import results as records
from nvfp4kv.analysis.runs import PathSpec, resolve_run_dirs

#: the columns every metrics frame starts with, in this order (``k_format``, ``v_format`` follow)
TIDY_COLUMNS = ["model", "task", "metric", "kv", "policy", "value", "stderr", "n", "run_id", "bits_per_element",
                "k_format", "v_format", "engine"]
GRID_COLUMNS = ["run_id", "model", "task", "kv", "policy", "bits_per_element", "context_len", "depth", "acc", "n"]
LAYER_COLUMNS = ["run_id", "model", "task", "kv", "policy", "layer", "head", "kind", "sqnr_db", "attn_rel_err"]
SAMPLE_COLUMNS = ["run_id", "cell_id", "model", "task", "kv", "policy", "doc_id", "metric", "value"]

Cells = Iterable[Mapping[str, Any]]


# ---------------------------------------------------------------------------- cell records
def run_cells(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The cells of one run dir (none if it has none yet), tagged with ``run_id`` and ``_run_dir``."""
    cells = []
    for cell in records.read_cells(run_dir):
        cell = dict(cell)
        cell.setdefault("run_id", Path(run_dir).name)
        cell["_run_dir"] = str(run_dir)
        cells.append(cell)
    return cells


def load_cells(spec: PathSpec) -> list[dict[str, Any]]:
    """Every cell record of every run named by ``spec`` (dicts as in ``cells/<cell_id>.json``)."""
    return [cell for run_dir in resolve_run_dirs(spec) for cell in run_cells(run_dir)]


def policy_label(kv_config: Mapping[str, Any]) -> str:
    """Short description of how the cache treats scales and windows: ``prefill/serving+res128``."""
    if not kv_config:
        return ""
    text = f"{kv_config.get('scale_policy', '?')}/{kv_config.get('read_mode', '?')}"
    if kv_config.get("sink_tokens"):
        text += f"+sink{kv_config['sink_tokens']}"
    if kv_config.get("residual_length"):
        text += f"+res{kv_config['residual_length']}"
    if kv_config.get("skip_layers"):
        text += "+skip" + ",".join(str(i) for i in kv_config["skip_layers"])
    if kv_config.get("k_center"):
        text += "+kcenter"
    return text


def _identity(cell: Mapping[str, Any]) -> dict[str, Any]:
    return {"run_id": cell.get("run_id"), "model": cell.get("model"), "task": cell.get("task"), "kv": cell.get("kv"),
            "policy": policy_label(cell.get("kv_config") or {}), "bits_per_element": cell.get("bits_per_element"),
            "engine": cell.get("engine") or "none"}


def _ordered(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A frame with ``columns`` first (NaN where absent), then whatever else the rows carry."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    for column in columns:
        if column not in frame:
            frame[column] = math.nan
    return frame[columns + [c for c in frame.columns if c not in columns]]


# ---------------------------------------------------------------------------- frames of cells
def tidy_frame(cells: Cells) -> pd.DataFrame:
    """One row per run x model x task x metric x kv: the frame every table and plot starts from.

    Columns :data:`TIDY_COLUMNS`; ``value``/``stderr``/``bits_per_element`` are floats (NaN when
    unknown), ``n`` a nullable integer. Rows: cells as given, metrics in the order the task
    reported them.
    """
    rows = []
    for cell in cells:
        kv_config = cell.get("kv_config") or {}
        for metric, m in (cell.get("metrics") or {}).items():
            rows.append({**_identity(cell), "metric": metric, "k_format": kv_config.get("k_format"),
                         "v_format": kv_config.get("v_format"),
                         "value": m.get("value"), "stderr": m.get("stderr"), "n": m.get("n")})
    frame = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    for column in ("bits_per_element", "value", "stderr"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    return frame


def samples_frame(cells: Cells, *, task: str | None = None, kv: str | None = None,
                  model: str | None = None) -> pd.DataFrame:
    """Per-sample outcomes, long: one row per cell x sample x numeric metric (filters optional).

    Long rather than wide because tasks have different metrics; the scalar keys a sample
    carries besides ``metrics`` (``context_len``, ``depth``, ``target``, ...) become columns.
    Cells must carry ``_run_dir`` (as :func:`run_cells` / :func:`load_cells` tag them).
    """
    rows: list[dict[str, Any]] = []
    for cell in cells:
        if (task and cell["task"] != task) or (kv and cell["kv"] != kv) or (model and cell["model"] != model):
            continue
        ident = {**_identity(cell), "cell_id": cell["cell_id"]}
        del ident["bits_per_element"]
        for sample in records.read_samples(cell["_run_dir"], cell["cell_id"]):
            scalars = {k: v for k, v in sample.items()
                       if k not in ("metrics", "task", "kv", "model") and not isinstance(v, (dict, list))}
            # a task group's subtasks (MMLU subjects) restart doc_id: keep the sample's own task
            scalars["sample_task"] = sample.get("task", cell["task"])
            for metric, value in (sample.get("metrics") or {}).items():
                if isinstance(value, (int, float)):
                    rows.append({**scalars, **ident, "metric": metric, "value": float(value)})
    return _ordered(rows, SAMPLE_COLUMNS)


def _extra_rows(cells: Cells, key: str) -> list[dict[str, Any]]:
    """Rows of ``cell["extra"][key]`` tables, each tagged with its cell's identity."""
    return [{**_identity(cell), **row} for cell in cells for row in ((cell.get("extra") or {}).get(key) or [])]


def grid_frame(cells: Cells) -> pd.DataFrame:
    """Retrieval grids (``extra["grid"]``): accuracy per context length x needle depth x kv."""
    return _ordered(_extra_rows(cells, "grid"), GRID_COLUMNS)


def per_layer_frame(cells: Cells) -> pd.DataFrame:
    """Per-layer fidelity (``extra["per_layer"]``): SQNR etc. per layer x head x kind (k or v).

    ``sqnr_db`` is NaN where the round trip was exact (BF16 storing a BF16 model: the ratio is
    infinite and the cell stores null) or unknown; plots list such formats as lossless.
    """
    frame = _ordered(_extra_rows(cells, "per_layer"), LAYER_COLUMNS)
    for column in ("sqnr_db", "attn_rel_err"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


# ---------------------------------------------------------------------------- frames of runs
def load_results(spec: PathSpec) -> pd.DataFrame:
    """:func:`tidy_frame` of every run named by ``spec``."""
    return tidy_frame(load_cells(spec))


def load_samples(spec: PathSpec, *, task: str | None = None, kv: str | None = None,
                 model: str | None = None) -> pd.DataFrame:
    """:func:`samples_frame` of every run named by ``spec``."""
    return samples_frame(load_cells(spec), task=task, kv=kv, model=model)


def load_grid(spec: PathSpec) -> pd.DataFrame:
    """:func:`grid_frame` of every run named by ``spec``."""
    return grid_frame(load_cells(spec))


def load_per_layer(spec: PathSpec) -> pd.DataFrame:
    """:func:`per_layer_frame` of every run named by ``spec``."""
    return per_layer_frame(load_cells(spec))
