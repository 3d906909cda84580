"""lm-eval's output as this project's records: metrics per task or group, one sample per document."""

from __future__ import annotations

import math
from typing import Any

from nvfp4kv.errors import ConfigError
from nvfp4kv.eval.api import MetricValue


def _leaf_tasks(output: dict[str, Any], top: str) -> list[str]:
    """The leaf tasks under ``top`` (itself if it is a task)."""
    groups = output.get("group_subtasks", {})
    if top not in groups:
        return [top]
    leaves: list[str] = []
    for child in groups[top]:
        leaves.extend(_leaf_tasks(output, child))
    return leaves


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _metrics(output: dict[str, Any], top: str, leaves: list[str],
             wanted: tuple[str, ...] | None) -> dict[str, MetricValue]:
    row = output["results"].get(top) or output.get("groups", {}).get(top)
    if row is None:
        raise RuntimeError(f"lm-eval returned no results for {top!r}; got {sorted(output['results'])}")
    n_samples = output.get("n-samples", {})
    n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves) or None
    metrics: dict[str, MetricValue] = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        number = _number(value)
        if number is None or number == -1.0:  # RULER reports -1 for lengths it did not run
            continue
        name, _, filter_name = key.partition(",")
        stderr = _number(row.get(f"{name}_stderr,{filter_name}"))
        metrics[key] = MetricValue(value=number, stderr=stderr, n=n)
    if wanted:
        chosen = {k: v for k, v in metrics.items() if k in wanted or k.split(",")[0] in wanted}
        missing = [w for w in wanted if not any(k == w or k.split(",")[0] == w for k in chosen)]
        if missing:
            raise ConfigError(f"Metric(s) {missing} not produced by {top!r}; available: {sorted(metrics)}.")
        metrics = chosen
    return metrics


def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars/arrays and tuples from lm-eval become floats/lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    from lm_eval.utils import handle_non_serializable

    return _jsonable(handle_non_serializable(value))


def _prediction(sample: dict[str, Any]) -> Any:
    """A human-readable prediction: generated text, or the argmax choice of a loglikelihood task."""
    resps = sample.get("filtered_resps")
    if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 and isinstance(resps[0][1], bool):
        logprobs = [float(r[0]) for r in resps]
        return max(range(len(logprobs)), key=logprobs.__getitem__)
    raw = sample.get("resps")
    if raw and isinstance(raw[0], (list, tuple)) and raw[0] and isinstance(raw[0][0], str):
        return raw[0][0]
    return resps[0] if isinstance(resps, list) and len(resps) == 1 else resps


def _samples(output: dict[str, Any], leaves: list[str]) -> list[dict[str, Any]]:
    """One record per document: metrics of every filter merged, keyed ``metric,filter``."""
    records: list[dict[str, Any]] = []
    qualify = len(leaves) > 1
    for task in leaves:
        by_doc: dict[Any, dict[str, Any]] = {}
        for sample in output.get("samples", {}).get(task, []):
            doc_id = sample["doc_id"]
            record = by_doc.setdefault(doc_id, {
                "doc_id": f"{task}:{doc_id}" if qualify else doc_id,
                "subtask": task,
                "metrics": {},
                "target": _jsonable(sample.get("target")),
                "prediction": _jsonable(_prediction(sample)),
                "filtered": {},
            })
            filter_name = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                value = _number(sample.get(metric))
                if value is not None and value != -1.0:
                    record["metrics"][f"{metric},{filter_name}"] = value
            record["filtered"][filter_name] = _jsonable(sample.get("filtered_resps"))
        records.extend(by_doc.values())
    return records
