"""A task family defined outside nvfp4kv, loaded by the sweep through a task's ``module:`` key."""

from __future__ import annotations

from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind, task_kinds


def constant(task_cfg, bundle, kv, *, limit, seed, lm=None, progress=True) -> CellResult:
    return CellResult(metrics={"score": MetricValue(float(task_cfg.get("value", 1.0)), None, 1)},
                      samples=[{"doc_id": 0, "metrics": {"score": float(task_cfg.get("value", 1.0))}}])


if "external_constant" not in task_kinds():
    register_task_kind("external_constant")(constant)
