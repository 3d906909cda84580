"""Evaluation: the task-family registry (:mod:`nvfp4kv.eval.api`) and the families shipped here.

Importing this package registers the task kinds ``lm_eval`` (:mod:`nvfp4kv.eval.lmeval_tasks`)
and ``passkey`` (:mod:`nvfp4kv.eval.passkey`), so a runner only needs ``import nvfp4kv.eval``
before ``get_task_runner(kind)``. The lm-eval model class (:class:`~nvfp4kv.eval.lm.KVQuantLM`,
registered in lm-eval as ``nvfp4kv``) is imported lazily: it pulls in lm-eval's HF backend.
"""

from __future__ import annotations

from typing import Any

from nvfp4kv.eval import lmeval_tasks, passkey  # noqa: F401  (registers the task kinds)
from nvfp4kv.eval.api import CellResult, MetricValue, get_task_runner, register_task_kind, task_kinds

__all__ = ["CellResult", "MetricValue", "get_task_runner", "register_task_kind", "task_kinds", "KVQuantLM"]


def __getattr__(name: str) -> Any:
    if name == "KVQuantLM":
        from nvfp4kv.eval.lm import KVQuantLM

        return KVQuantLM
    raise AttributeError(f"module 'nvfp4kv.eval' has no attribute {name!r}")
