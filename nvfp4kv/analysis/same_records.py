"""Are two runs' records the same? The check behind "a sharded / cluster run equals the in-process run".

Two runs of one config and seed must produce identical per-sample records and cell metrics,
however their cells were scheduled (one process, shards, cluster jobs, resumes). What may
differ is only *when and where* a run happened: its run id, timestamps, wall times, and the
command and run directory it recorded. Everything else is compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvfp4kv import results

#: sample keys that name the run rather than the result
_SAMPLE_KEYS_IGNORED = frozenset({"run_id"})


def _samples(run_dir: Path, cell_id: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k not in _SAMPLE_KEYS_IGNORED} for s in results.read_samples(run_dir, cell_id)]


def _metrics_equal(a: Any, b: Any, rel_tol: float) -> bool:
    """Exact equality, or (``rel_tol`` > 0) numbers equal within ``rel_tol`` at every leaf."""
    if rel_tol <= 0 or type(a) is not type(b):
        return a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_metrics_equal(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=rel_tol)
    return a == b


def record_differences(run_a: str | Path, run_b: str | Path, *, most: int = 20,
                       metrics_rel_tol: float = 0.0) -> list[str]:
    """Human-readable differences between two runs' cells (ids, metrics) and samples; empty if none.

    Samples are always compared exactly. ``metrics_rel_tol`` > 0 lets cell-level aggregates differ in
    their last bits (a change of summation order between harness versions: numpy vs a Python sum).
    """
    a, b = Path(run_a), Path(run_b)
    cells_a: Mapping[str, dict[str, Any]] = {c["cell_id"]: c for c in results.read_cells(a)}
    cells_b: Mapping[str, dict[str, Any]] = {c["cell_id"]: c for c in results.read_cells(b)}
    out: list[str] = []
    for cid in sorted(set(cells_a) ^ set(cells_b)):
        out.append(f"cell {cid} only in {a if cid in cells_a else b}")
    for cid in sorted(set(cells_a) & set(cells_b)):
        if not _metrics_equal(cells_a[cid].get("metrics"), cells_b[cid].get("metrics"), metrics_rel_tol):
            out.append(f"cell {cid}: metrics differ: {cells_a[cid].get('metrics')} vs {cells_b[cid].get('metrics')}")
        samples_a, samples_b = _samples(a, cid), _samples(b, cid)
        if len(samples_a) != len(samples_b):
            out.append(f"cell {cid}: {len(samples_a)} vs {len(samples_b)} samples")
            continue
        for index, (sa, sb) in enumerate(zip(samples_a, samples_b)):
            if sa != sb:
                keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
                out.append(f"cell {cid}: sample {index} (doc_id {sa.get('doc_id')}) differs in {keys}")
    if not cells_a and not cells_b:
        out.append(f"neither {a} nor {b} holds any cell")
    return out[:most] + ([f"... and {len(out) - most} more"] if len(out) > most else [])
