"""The records of a sweep run: atomic writes, cell JSON and per-sample JSONL, their paths.

This module writes and reads records and nothing else. Everything derived from them (the tidy
frame, ``results.csv``, ``table.md``, ``plots/``, figures, notebook tables) is built by
:mod:`nvfp4kv.analysis` from these files alone: records -> analysis -> tables and figures.

Layout of a run dir (read by :mod:`nvfp4kv.analysis`, the gate and the notebooks)::

    <run_dir>/sweep.yaml               resolved sweep config
    <run_dir>/cells/<cell_id>.json     one per finished (model, task, kv) cell
    <run_dir>/samples/<cell_id>.jsonl  one line per evaluated sample
    <run_dir>/results.csv              derived (analysis.report): one row per model x task x metric x kv
    <run_dir>/table.md                 derived: Markdown, Δ vs the BF16 baseline, paired CI, McNemar p
    <run_dir>/plots/*.png              derived: accuracy per format, retrieval and per-layer heatmaps

Why atomic writes: a sweep is resumed by skipping cells whose JSON exists, so a cell JSON must
never exist half-written (a killed job would otherwise be "resumed" from garbage). Every file is
written to a temporary sibling and ``os.replace``\\ d into place, and a cell's samples are written
*before* its JSON: the JSON is the commit marker of the cell.

Everything derived is rebuilt from the cell files alone (:func:`nvfp4kv.analysis.report.write_report`),
so it is always consistent with what is on disk, whichever runs (or resumed runs) produced the cells.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_SAFE_ID = re.compile(r"[^A-Za-z0-9._=+-]+")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# ---------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    The temporary file lives in the same directory (``os.replace`` is only atomic within one
    filesystem) and is removed if anything fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch scalars become numbers, tuples lists, NaN/Inf ``None``.

    JSON has no NaN or Infinity; Python's ``json`` would write them anyway and produce files
    other readers reject, so non-finite floats become ``null`` (meaning "not available").
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    text = json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    lines = [json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------- cells
def safe_id(text: str) -> str:
    """A filesystem-safe version of a model/task/kv name (``/`` and spaces become ``-``)."""
    return _SAFE_ID.sub("-", str(text)).strip("-") or "x"


def cell_id(model: str, task: str, kv: str) -> str:
    """``<model>__<task>__<kv>`` with each part made filesystem-safe (RESULTS_LAYOUT)."""
    return "__".join(safe_id(part).replace("__", "_") for part in (model, task, kv))


def cell_path(run_dir: str | os.PathLike[str], cid: str) -> Path:
    return Path(run_dir) / "cells" / f"{cid}.json"


def samples_path(run_dir: str | os.PathLike[str], cid: str) -> Path:
    return Path(run_dir) / "samples" / f"{cid}.jsonl"


def write_cell(run_dir: str | os.PathLike[str], cell: Mapping[str, Any],
               samples: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write one finished cell: samples first, then the cell JSON (the commit marker)."""
    cid = cell["cell_id"]
    atomic_write_jsonl(samples_path(run_dir, cid), samples)
    return atomic_write_json(cell_path(run_dir, cid), cell)


def read_cell(run_dir: str | os.PathLike[str], cid: str) -> dict[str, Any] | None:
    path = cell_path(run_dir, cid)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_cells(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished cell of a run, sorted by cell id (temporary files are ignored)."""
    cell_dir = Path(run_dir) / "cells"
    if not cell_dir.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(cell_dir.glob("*.json"))
            if not p.name.startswith(".")]


def read_samples(run_dir: str | os.PathLike[str], cid: str) -> list[dict[str, Any]]:
    path = samples_path(run_dir, cid)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
