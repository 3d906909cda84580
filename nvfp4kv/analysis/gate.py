"""The accuracy gate's decision: a gate sweep's records against the committed baseline.

The gate is a sweep (``configs/sweep/gate.yaml``, quick: ``gate_quick.yaml``) run by
:func:`nvfp4kv.eval.sweep.run_sweep`; :func:`decide` reads its run directory, turns each cell's
per-sample records into per-unit series (:func:`run_document`) and compares them unit by unit with
the baseline document (``results/baselines/gate.json``) by the rule of
:mod:`nvfp4kv.metrics.regression` (paired: McNemar for 0/1 units, seeded paired bootstrap for
continuous ones, Bonferroni over checks and both tails). ``experiments/gate.py`` is the CLI.

Series per format (a *unit* is what is paired with the baseline):

- fidelity task: per scored position ``L<context>/w<window>/p<position>``: ``kl``, ``nll`` (lower
  is better), ``top1_agree`` (0/1); per ``l<layer>/h<head>/<k|v>`` row of the cell's
  ``extra.per_layer``: ``sqnr_db`` (an exact round trip is stored as ``SQNR_EXACT_DB``) and
  ``attn_rel_err``;
- lm_eval task: per question ``acc`` (0/1) and ``gold_logp``, ``log p(gold | the choices)``;
- passkey task: per trial ``acc`` (0/1, underpowered at the gate's 4 trials: shown, never decisive).

The baseline document also stores the suite (the task settings, :func:`suite_of`) and each
format's KV config: a baseline made with other settings cannot judge a run (:func:`suite_mismatch`,
exit 2 in the CLI) until it is regenerated deliberately.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvfp4kv import results
from nvfp4kv.metrics.regression import SQNR_EXACT_DB, Check, Series, compare_runs, failed

SCHEMA_VERSION = 1
#: the baseline's suite layout: these task names, in this order (the mmlu task's limit is ``mmlu_limit``)
FAMILIES = ("fidelity", "mmlu", "passkey")
#: task config keys that are not part of the suite: where data lives changes no number
_NOT_SUITE = {"limit", "module", "data_dir"}
#: KV config fields that change no stored bit (a new field with its default value changes none either,
#: so only fields present in both the baseline and this run are compared)
_NO_BIT_CHANGE = {"backend", "dequant_cache"}
#: fidelity sample metric -> (series, direction, 0/1); per_layer column -> (series, direction)
_FIDELITY_SERIES = {"kl_mean": ("kl", "lower", False), "nll_mean": ("nll", "lower", False),
                    "top1_agree": ("top1_agree", "higher", True)}
_LAYER_SERIES = {"sqnr_db": ("sqnr_db", "higher"), "attn_rel_err": ("attn_rel_err", "lower")}


def _round(x: float) -> float:
    """Values are stored to 7 significant digits; current runs are rounded the same way."""
    return float(f"{x:.7g}")


# ---------------------------------------------------------------------------- suite identity
def suite_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The suite a resolved gate sweep config runs, in the baseline's layout."""
    tasks = config.get("tasks") or {}

    def task(name: str) -> dict[str, Any] | None:
        if name not in tasks:
            return None
        return {**{k: v for k, v in tasks[name].items() if k not in _NOT_SUITE}, "name": name}

    mmlu = tasks.get("mmlu")
    limit = None if mmlu is None else mmlu.get("limit", config.get("limit"))
    sweep = config.get("sweep") or {}
    return {"name": sweep.get("suite", sweep.get("name")), "fidelity": task("fidelity"), "mmlu": task("mmlu"),
            "mmlu_limit": limit or 0, "passkey": task("passkey"), "model": config["model"]["name_or_path"],
            **({"other_tasks": sorted(set(tasks) - set(FAMILIES))} if set(tasks) - set(FAMILIES) else {})}


def kv_configs_of(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{format label: KVCacheConfig.to_dict()}`` of a resolved sweep config."""
    from nvfp4kv.cache import KVCacheConfig

    return {str(label): KVCacheConfig.from_dict(dict(kv)).to_dict() for label, kv in config["kvs"].items()}


def suite_mismatch(baseline: Mapping[str, Any], suite: Mapping[str, Any],
                   kv_configs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why this baseline cannot judge a run of ``suite`` with these KV configs (``None`` if it can)."""
    if baseline.get("schema") != SCHEMA_VERSION:
        return f"baseline schema {baseline.get('schema')} != {SCHEMA_VERSION}"
    if baseline.get("suite") != dict(suite):
        return f"the baseline was made with suite {baseline.get('suite', {}).get('name')!r} and different settings"
    missing = [f for f in kv_configs if f not in baseline.get("formats", {})]
    if missing:
        return f"no baseline for format(s) {missing}"
    for fmt, new in kv_configs.items():
        old = baseline["formats"][fmt].get("kv_config", {})
        changed = sorted(k for k in set(old) & set(new) if k not in _NO_BIT_CHANGE and old[k] != new[k])
        if changed:
            return f"the KV config of {fmt!r} changed since the baseline ({', '.join(changed)})"
    return None


# ---------------------------------------------------------------------------- records -> series
def fidelity_series(name: str, samples: Sequence[Mapping[str, Any]], per_layer: Sequence[Mapping[str, Any]]
                    ) -> dict[str, dict[str, Any]]:
    """Per position (kl, nll, top1) and per layer/head/kind (sqnr, attention error) of a fidelity cell."""
    series: dict[str, dict[str, Any]] = {}
    for metric, (short, direction, binary) in _FIDELITY_SERIES.items():
        values = {f"L{s['context_len']}/w{s['window']}/p{s['position']}": _round(s["metrics"][metric])
                  for s in samples if s.get("probe") == "next_token"}
        series[f"{name}/{short}"] = {"direction": direction, "binary": binary, "values": values}
    for key, (short, direction) in _LAYER_SERIES.items():
        values = {f"l{r['layer']}/h{r['head']}/{r['kind']}": _round(SQNR_EXACT_DB if r[key] is None else r[key])
                  for r in per_layer}
        if values:
            series[f"{name}/{short}"] = {"direction": direction, "binary": False, "values": values}
    return series


def accuracy_series(name: str, samples: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """A 0/1 per-document series (MMLU question correct, passkey trial retrieved)."""
    values = {str(s["doc_id"]): _round(s["metrics"][metric]) for s in samples if metric in s.get("metrics", {})}
    return {f"{name}/{metric.split(',')[0]}": {"direction": "higher", "binary": True, "values": values}}


def choice_logprobs(sample: Mapping[str, Any]) -> list[float] | None:
    """Per-choice log-likelihoods of a multiple-choice sample record (lm_eval task kind)."""
    if sample.get("choice_logprobs"):
        return [float(x) for x in sample["choice_logprobs"]]
    filtered = (sample.get("filtered") or {}).get("none")
    if isinstance(filtered, list) and filtered and all(isinstance(r, list) and len(r) == 2 for r in filtered):
        return [float(r[0]) for r in filtered]
    return None


def gold_logprob_series(name: str, samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question ``log p(gold | the choices)``: the answer's log-likelihood renormalized over the
    choices. Continuous, so a small consistent shift is detectable where 0/1 accuracy on a few dozen
    questions (and a model near chance) cannot show it."""
    values = {}
    for s in samples:
        logprobs, target = choice_logprobs(s), s.get("target")
        if logprobs is None or not isinstance(target, int) or not 0 <= target < len(logprobs):
            continue
        top = max(logprobs)
        log_norm = top + math.log(sum(math.exp(x - top) for x in logprobs))
        values[str(s["doc_id"])] = _round(logprobs[target] - log_norm)
    return {f"{name}/gold_logp": {"direction": "higher", "binary": False, "values": values}} if values else {}


def _cell_entry(cell: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(series, summary) of one cell, by its task kind."""
    name, kind, metrics = cell["task"], cell["task_kind"], cell.get("metrics", {})
    headline = {k: v["value"] for k, v in metrics.items()}
    if kind == "fidelity":
        return (fidelity_series(name, samples, (cell.get("extra") or {}).get("per_layer", [])),
                {k: None if v is None else _round(v) for k, v in headline.items()})
    metric = "acc,none" if kind == "lm_eval" else "acc"
    series = accuracy_series(name, samples, metric)
    summary = {f"{name}_acc": None if headline.get(metric) is None else _round(headline[metric])}
    if kind == "lm_eval":
        gold = gold_logprob_series(name, samples)
        series.update(gold)
        if gold:
            values = list(gold[f"{name}/gold_logp"]["values"].values())
            summary[f"{name}_gold_logp"] = _round(sum(values) / len(values))
    return series, summary


def run_document(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A gate run's document from its records: suite, versions, and per format its KV config,
    headline ``summary`` and gated ``series``."""
    cells = results.read_cells(run_dir)
    if not cells:
        raise FileNotFoundError(f"no finished cells in {run_dir}")
    config = cells[0]["config"]
    task_order, kv_order = list(config["tasks"]), list(config["kvs"])
    cells.sort(key=lambda c: (kv_order.index(c["kv"]), task_order.index(c["task"])))
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "suite": suite_of(config), "versions": cells[0].get("versions"),
                           "formats": {}, "timings": {}}
    for cell in cells:
        entry = doc["formats"].setdefault(cell["kv"], {"kv_config": cell["kv_config"], "summary": {}, "series": {}})
        series, summary = _cell_entry(cell, results.read_samples(run_dir, cell["cell_id"]))
        entry["series"].update(series)
        entry["summary"].update(summary)
        doc["timings"][f"{cell['kv']}/{cell['task']}"] = round(float(cell.get("wall_s") or 0.0), 2)
    doc["run_s"] = round(sum(doc["timings"].values()), 2)
    return doc


def series_of(doc: Mapping[str, Any]) -> dict[str, dict[str, Series]]:
    """``{format: {metric: Series}}`` of a run or baseline document."""
    return {fmt: {name: Series.from_dict(name, data) for name, data in entry["series"].items()}
            for fmt, entry in doc["formats"].items()}


# ---------------------------------------------------------------------------- the decision
@dataclass
class GateDecision:
    """The gate's verdict on one run: ``exit_code`` 0 pass, 1 a significant change, 2 no usable baseline."""

    document: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    failed: list[Check] = field(default_factory=list)
    problem: str | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.problem else 1 if self.failed else 0


def decide(run_dir: str | os.PathLike[str], baseline: Mapping[str, Any] | None, *, alpha: float = 0.05,
           allow_improvements: bool = False, seed: int = 0) -> GateDecision:
    """Compare a gate sweep's records with the baseline document, unit by unit (module docstring)."""
    doc = run_document(run_dir)
    kvs = {fmt: entry["kv_config"] for fmt, entry in doc["formats"].items()}
    problem = "no baseline" if baseline is None else suite_mismatch(baseline, doc["suite"], kvs)
    checks = [] if problem else compare_runs(series_of(baseline), series_of(doc), alpha=alpha, seed=seed)
    bad = failed(checks, allow_improvements=allow_improvements)
    doc["checks"] = [c.to_dict() for c in checks]
    doc["status"] = "incomparable" if problem else "fail" if bad else "pass"
    return GateDecision(doc, checks, bad, problem)


# ---------------------------------------------------------------------------- printing and files
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_table(doc: Mapping[str, Any], other: Mapping[str, Any] | None = None) -> str:
    """One row per format, headline metrics as columns; ``other`` adds ``(was X)`` where it differs."""
    import pandas as pd

    rows = []
    for fmt, entry in doc["formats"].items():
        row = {"format": fmt}
        for key, value in entry["summary"].items():
            old = None if other is None else other.get("formats", {}).get(fmt, {}).get("summary", {}).get(key)
            row[key] = _fmt(value) + (f" (was {_fmt(old)})" if old is not None and old != value else "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    ordered = [c for c in ("format", "kl_mean", "kl_p99", "top1_agree", "nll_mean") if c in frame] + \
        sorted(c for c in frame if c.startswith("ppl@")) + \
        [c for c in ("greedy_agree_tokens", "sqnr_db_k", "sqnr_db_v", "attn_rel_err_k", "attn_rel_err_v",
                     "mmlu_acc", "mmlu_gold_logp", "passkey_acc") if c in frame]
    return frame[ordered].fillna("-").to_string(index=False)


def checks_table(checks: Sequence[Check]) -> str:
    import pandas as pd

    rows = [{
        "format": c.format, "metric": c.metric, "n": c.n, "test": c.test,
        "baseline": _fmt(c.baseline_mean), "current": _fmt(c.current_mean), "delta": _fmt(c.delta, 3),
        "bound": _fmt(c.bound, 3), "p(worse)": _fmt(c.p_value, 3), "status": c.status, "note": c.note,
    } for c in checks]
    return pd.DataFrame(rows).to_string(index=False) if rows else "(no checks)"


def dumps(doc: Mapping[str, Any]) -> str:
    """Indented JSON with each series' per-unit ``values`` on one line: a reviewable git diff
    (one line per changed series) at half the size of fully indented JSON."""
    compact: dict[str, str] = {}

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key == "values" and isinstance(value, Mapping):
                    token = f"@@values-{len(compact)}@@"
                    compact[token] = json.dumps(value, separators=(",", ":"))
                    out[key] = token
                else:
                    out[key] = strip(value)
            return out
        return [strip(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(strip(results.jsonable(doc)), indent=1)
    for token, value in compact.items():
        text = text.replace(json.dumps(token), value, 1)
    return text + "\n"


def write_json(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Atomic write of a gate document (:func:`dumps` layout)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return results.atomic_write_text(path, dumps(doc))


def load_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
