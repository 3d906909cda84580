"""The one contract between the sweep runner and the task families it runs.

A *cell* is one (model, task, KV config) evaluation. Every task family (lm-eval tasks, the
passkey grid, fidelity diagnostics) is a function registered here under a ``kind`` name that
turns a cell into a :class:`CellResult`; the runner owns everything around it (loading the
model once, resuming, atomic writes, tables), so a new family is one function and one YAML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvfp4kv.errors import ConfigError


@dataclass(frozen=True)
class MetricValue:
    """A metric over ``n`` samples; ``stderr`` is the standard error of ``value`` when known."""

    value: float
    stderr: float | None = None
    n: int | None = None

    @classmethod
    def mean_of(cls, values: "Sequence[float]") -> "MetricValue":
        """The mean of per-sample values with its standard error (sample std / sqrt(n), lm-eval's
        ``mean_stderr``; None for a single value), computed by numpy/scipy."""
        import numpy as np
        from scipy.stats import sem

        array = np.asarray(values, dtype=np.float64)
        stderr = float(sem(array, ddof=1)) if array.size > 1 else None
        return cls(float(array.mean()), stderr, int(array.size))


@dataclass
class CellResult:
    """What one task family returns for one cell.

    ``samples`` are per-sample records (JSON-serialisable dicts) with at least ``doc_id`` and a
    ``metrics`` dict of per-sample values, so paired statistics can match samples across KV
    formats. ``extra`` holds structured diagnostics (per-layer tables, retrieval grids).
    """

    metrics: dict[str, MetricValue]
    samples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


#: signature of a task family: (task config dict, ModelBundle, KVCacheConfig, run options) -> CellResult
TaskRunner = Callable[..., CellResult]

_TASK_KINDS: dict[str, TaskRunner] = {}


def register_task_kind(kind: str) -> Callable[[TaskRunner], TaskRunner]:
    """Decorator: register a task family under ``kind`` (the ``kind:`` key of a task YAML)."""

    def wrap(fn: TaskRunner) -> TaskRunner:
        if kind in _TASK_KINDS and _TASK_KINDS[kind] is not fn:
            raise ValueError(f"task kind {kind!r} registered twice")
        _TASK_KINDS[kind] = fn
        return fn

    return wrap


def get_task_runner(kind: str) -> TaskRunner:
    try:
        return _TASK_KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"Unknown task kind {kind!r}; known kinds: {', '.join(sorted(_TASK_KINDS)) or '(none imported)'}. "
            f"Check the task's `kind:` in configs/task/."
        ) from None


def task_kinds() -> list[str]:
    return sorted(_TASK_KINDS)


def task_config_fields(cfg: Any, *, kind: str, allowed: tuple[str, ...],
                       tuples: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """A task family's config mapping as dataclass keyword arguments: unknown keys refused (naming
    the allowed ones), ``kind`` dropped, and the fields in ``tuples`` turned into tuples of their
    element type (a scalar counts as a one-element list: Hydra overrides such as ``lengths=4096``)."""
    from nvfp4kv.eval.lmeval_config import to_plain

    cfg = to_plain(cfg)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {kind} task config; allowed: {list(allowed)}. "
                          f"Fix the key's spelling or drop it.")
    values = {k: v for k, v in cfg.items() if k != "kind"}
    for key, element in (tuples or {}).items():
        if key in values:
            items = values[key] if isinstance(values[key], (list, tuple)) else [values[key]]
            values[key] = tuple(element(x) for x in items)
    return values
