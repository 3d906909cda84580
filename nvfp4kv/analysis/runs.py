"""Find sweep run directories: one dir, a glob, a parent of many runs, or "the newest one".

Researchers rarely want to type a run id: notebooks default to the newest run, scripts accept
a parent directory and merge every run beneath it, and CI points notebooks at a fixture through
``$NVFP4KV_RESULTS``. All of that resolves here, so every loader accepts the same inputs.
A *run dir* is any directory with a ``cells/`` subdirectory (see RESULTS_LAYOUT).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

#: environment variable that overrides the default results path (CI points it at a fixture)
RESULTS_ENV = "NVFP4KV_RESULTS"
DEFAULT_RUNS_ROOT = Path("results") / "runs"

PathLike = str | os.PathLike[str]
PathSpec = PathLike | Iterable[PathLike]

_GLOB_CHARS = set("*?[")


def is_run_dir(path: Path) -> bool:
    """A run dir holds ``cells/`` (one JSON per finished cell)."""
    return (path / "cells").is_dir()


def _run_dirs_under(path: Path) -> list[Path]:
    """``path`` itself if it is a run dir, else every run dir beneath it (sweep/run_id nesting)."""
    if is_run_dir(path):
        return [path]
    return sorted(p.parent for p in path.rglob("cells") if p.is_dir())


def resolve_run_dirs(spec: PathSpec) -> list[Path]:
    """Every run dir named by ``spec`` (a run dir, a glob, a parent dir, or a list of those).

    Order is stable (sorted, duplicates dropped) so merged frames are reproducible.
    """
    items: list[PathLike] = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        candidates = [Path(p) for p in sorted(glob.glob(text))] if _GLOB_CHARS & set(text) else [Path(text)]
        for candidate in candidates:
            if candidate.is_dir():
                found.extend(_run_dirs_under(candidate))
    unique = sorted({p.resolve() for p in found})
    if not unique:
        raise FileNotFoundError(
            f"No sweep run directory (a directory with cells/) found at {spec}. Run a sweep first "
            f"(python -m experiments.run +sweep=smoke), or pass a run dir, a parent such as results/runs, "
            f"or a glob like 'results/runs/smoke/*'."
        )
    return unique


def _newest_write(run_dir: Path) -> float:
    """When a run last produced a cell: resumed runs count as new, not when they started."""
    cell_times = [p.stat().st_mtime for p in (run_dir / "cells").glob("*.json")]
    return max(cell_times, default=run_dir.stat().st_mtime)


def latest_run(root: PathLike = DEFAULT_RUNS_ROOT) -> Path:
    """The run dir under ``root`` that wrote a cell most recently (ties: the larger run id)."""
    runs = resolve_run_dirs(root)
    return max(runs, key=lambda p: (_newest_write(p), p.name))


def find_repo_root(start: PathLike | None = None) -> Path | None:
    """The nearest ancestor holding ``pyproject.toml`` and ``nvfp4kv/`` (notebooks run from notebooks/)."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "nvfp4kv").is_dir():
            return candidate
    return None


def default_results_path(*, required: bool = True) -> Path | None:
    """``$NVFP4KV_RESULTS`` if set, else the newest run under the repo's ``results/runs``.

    This is what notebooks call in their first cell, so a notebook opened from anywhere in the
    repo shows the latest sweep and CI can redirect it without editing the notebook. With
    ``required=False`` a missing results tree gives ``None`` instead of the error that says how
    to produce one (for notebooks whose results section is optional).
    """
    override = os.environ.get(RESULTS_ENV)
    if override:
        return Path(override)
    root = find_repo_root()
    try:
        return latest_run((root / DEFAULT_RUNS_ROOT) if root else DEFAULT_RUNS_ROOT)
    except FileNotFoundError:
        if required:
            raise
        return None
