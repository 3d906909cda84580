"""Task kind ``fidelity``: one cell = one KV config's fidelity against the unquantized cache.

Runs the three diagnostics of this package on the cell's model and turns them into a
:class:`~nvfp4kv.eval.api.CellResult`:

- decode-faithful next-token scoring (:mod:`nvfp4kv.metrics.fidelity`): ``kl_mean``, ``kl_p99``,
  ``top1_agree``, ``nll_mean`` and ``ppl@<L>`` per context length;
- greedy agreement: ``greedy_agree_tokens`` (mean tokens before the first divergence);
- per-layer/per-head K/V error on captured activations (:mod:`nvfp4kv.metrics.layer_error`):
  ``extra["per_layer"]`` rows plus the means ``sqnr_db_k``/``sqnr_db_v``/``attn_rel_err_k``/``attn_rel_err_v``.

Per-sample records (for paired statistics) are one per scored position (``probe="next_token"``,
metrics ``kl_mean``, ``top1_agree``, ``nll_mean``) and one per greedy prompt (``probe="greedy"``,
metric ``greedy_agree_tokens``), with ``doc_id`` numbering positions first, then prompts; the same
task settings give the same ``doc_id`` for the same position under every KV format. A per-sample
metric is named after the cell metric it averages into (as lm-eval's per-sample ``acc`` averages
into ``acc``), so paired deltas from :func:`nvfp4kv.analysis.compare` line up with the table.

Task YAML keys (defaults in :class:`FidelitySettings`): ``context_lens``, ``n_score``, ``n_windows``,
``score_chunk``, ``greedy_prompts``, ``greedy_prompt_len``, ``greedy_tokens``, ``capture_tokens``
(0 disables the per-layer capture). ``limit`` caps windows and greedy prompts; ``seed`` is
unused (every input is a fixed slice of the essays).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from nvfp4kv.config.schema import task_family_keys
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind
from nvfp4kv.metrics.capture import capture_attention
from nvfp4kv.metrics.fidelity import (
    REFERENCE,
    agreement_length,
    compare_logits,
    greedy_decode,
    make_windows,
    reference_cache,
    score_window,
    tokens_needed,
)
from nvfp4kv.metrics.layer_error import layer_errors
from nvfp4kv.metrics.text import essay_tokens


@dataclass(frozen=True)
class FidelitySettings:
    """How much text the fidelity cell scores. Costs scale with the products noted."""

    context_lens: tuple[int, ...] = (256, 1024)
    n_score: int = 128  # targets per window (and context length)
    n_windows: int = 2
    score_chunk: int = 16  # 1 = token-by-token decode (exact, ~10x slower on CPU)
    greedy_prompts: int = 2
    greedy_prompt_len: int = 128
    greedy_tokens: int = 32
    capture_tokens: int = 512  # tokens of the per-layer capture forward; 0 = skip

    @classmethod
    def from_task(cls, task_cfg: Mapping[str, Any], limit: int | None = None) -> FidelitySettings:
        """Settings from a task config (``kind``/``name``/``limit`` belong to the runner); unknown keys fail."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(task_cfg) - set(task_family_keys("fidelity")) - {"limit"})  # the schema's keys
        if unknown:
            raise ConfigError(f"Unknown key(s) {unknown} in the fidelity task config; allowed: {sorted(known)}.")
        values = {k: task_cfg[k] for k in known if k in task_cfg and task_cfg[k] is not None}
        if "context_lens" in values:
            values["context_lens"] = tuple(int(x) for x in values["context_lens"])
        settings = cls(**values)
        if limit is not None:
            settings = cls(**{**settings.__dict__, "n_windows": min(settings.n_windows, int(limit)),
                              "greedy_prompts": min(settings.greedy_prompts, int(limit))})
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.context_lens or min(self.context_lens) < 1:
            raise ConfigError(f"fidelity context_lens must be positive token counts, got {self.context_lens}.")
        for name in ("n_score", "n_windows", "score_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fidelity {name} must be >= 1 (got {getattr(self, name)}); fix configs/task/fidelity.yaml.")
        if self.n_score < 2:
            raise ConfigError("fidelity n_score must be >= 2 (one prefill prediction plus fed targets).")

    def stream_tokens(self) -> int:
        """Essay tokens used: the scored windows, then the greedy prompts after them."""
        return tokens_needed(self.context_lens, self.n_score, self.n_windows) + self.greedy_prompts * self.greedy_prompt_len


def _kv_config(kv: Any) -> Any:
    from nvfp4kv.cache import KVCacheConfig

    if isinstance(kv, KVCacheConfig):
        return kv
    if isinstance(kv, Mapping):
        return KVCacheConfig.from_dict(dict(kv))
    if isinstance(kv, str):
        return KVCacheConfig(k_format=kv, v_format=kv)
    raise ConfigError(f"fidelity needs a KVCacheConfig (or its dict / a format name), got {type(kv).__name__}.")


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def greedy_prompts(tokens: Sequence[int], settings: FidelitySettings) -> list[tuple[int, ...]]:
    """Prompts cut from the stream after the scored windows, so they are fresh text."""
    start = tokens_needed(settings.context_lens, settings.n_score, settings.n_windows)
    n = settings.greedy_prompt_len
    return [tuple(tokens[start + g * n : start + (g + 1) * n]) for g in range(settings.greedy_prompts)]


def run_fidelity_cell(bundle: Any, kv: Any, settings: FidelitySettings, *, progress: bool = False,
                      task_name: str = "fidelity") -> CellResult:
    """All fidelity diagnostics for one KV config; see the module docstring for the outputs."""
    from nvfp4kv.cache import cache_kwarg_name, make_cache

    from nvfp4kv.cache.first_batch import FrozenScales

    kv = _kv_config(kv)
    model, tokenizer = bundle.model, bundle.tokenizer
    frozen_scales = FrozenScales()  # first_batch: the cell's first forward fixes the scales
    cache_kwarg = cache_kwarg_name(model)
    n_stream = max(settings.stream_tokens(), settings.capture_tokens)
    tokens = REFERENCE.get(model, ("tokens", n_stream), lambda: essay_tokens(tokenizer, n_stream))
    windows = make_windows(tokens, settings.context_lens, settings.n_score, settings.n_windows)

    samples: list[dict[str, Any]] = []
    by_length: dict[int, list[float]] = {L: [] for L in settings.context_lens}
    for window in tqdm(windows, desc=f"fidelity [{kv.label}]", disable=not progress):
        ref = REFERENCE.get(
            model, ("window", window, settings.score_chunk),
            lambda: score_window(model, window, reference_cache(model), cache_kwarg, settings.score_chunk),
        )
        got = score_window(model, window, make_cache(model, kv, frozen_scales), cache_kwarg, settings.score_chunk)
        per_pos = compare_logits(ref, got, window.targets)
        for i, target in enumerate(window.targets):
            nll = float(per_pos["nll"][i])
            by_length[window.context_len].append(nll)
            samples.append({
                "doc_id": len(samples), "task": task_name, "probe": "next_token",
                "context_len": window.context_len, "window": window.index, "position": window.start + i,
                "target": int(target), "prediction": int(per_pos["prediction"][i]),
                "metrics": {"kl_mean": float(per_pos["kl"][i]), "top1_agree": float(per_pos["top1_agree"][i]),
                            "nll_mean": nll},
            })
    kls = [s["metrics"]["kl_mean"] for s in samples]
    top1 = [s["metrics"]["top1_agree"] for s in samples]
    nlls = [s["metrics"]["nll_mean"] for s in samples]
    metrics: dict[str, MetricValue] = {
        "kl_mean": MetricValue.mean_of(kls),
        "kl_p99": MetricValue(_quantile(kls, 0.99), None, len(kls)),
        "top1_agree": MetricValue.mean_of(top1),
        "nll_mean": MetricValue.mean_of(nlls),
    }
    for length, values in by_length.items():
        nll = MetricValue.mean_of(values)
        ppl = math.exp(nll.value)
        metrics[f"ppl@{length}"] = MetricValue(ppl, ppl * nll.stderr if nll.stderr is not None else None, nll.n)

    agreements = []
    for g, prompt in enumerate(greedy_prompts(tokens, settings)):
        ref_tokens = REFERENCE.get(
            model, ("greedy", prompt, settings.greedy_tokens),
            lambda: greedy_decode(model, prompt, settings.greedy_tokens, reference_cache(model), cache_kwarg),
        )
        got_tokens = greedy_decode(model, prompt, settings.greedy_tokens, make_cache(model, kv, frozen_scales), cache_kwarg)
        agree = agreement_length(ref_tokens, got_tokens)
        agreements.append(float(agree))
        samples.append({
            "doc_id": len(samples), "task": task_name, "probe": "greedy", "prompt": g,
            "target": tokenizer.decode(ref_tokens), "prediction": tokenizer.decode(got_tokens),
            "metrics": {"greedy_agree_tokens": float(agree)},
        })
    if agreements:
        metrics["greedy_agree_tokens"] = MetricValue.mean_of(agreements)

    extra: dict[str, Any] = {"settings": {f.name: getattr(settings, f.name) for f in fields(settings)},
                             "method": "decode-faithful, chunk-wise (score_chunk tokens per forward) vs DynamicCache"}
    if settings.capture_tokens > 0:
        captured = REFERENCE.get(model, ("capture", settings.capture_tokens),
                                 lambda: _capture(model, tokens[: settings.capture_tokens]))
        rows = layer_errors(captured, kv.build_format("k"), kv.build_format("v"), skip_layers=kv.skip_layers or ())
        extra["per_layer"] = rows
        for kind in ("k", "v"):
            sq = [r["sqnr_db"] for r in rows if r["kind"] == kind and r["sqnr_db"] is not None]
            if sq:
                metrics[f"sqnr_db_{kind}"] = MetricValue.mean_of(sq)
            metrics[f"attn_rel_err_{kind}"] = MetricValue.mean_of([r["attn_rel_err"] for r in rows if r["kind"] == kind])
    return CellResult(metrics=metrics, samples=samples, extra=extra)


def _capture(model: Any, tokens: Sequence[int]) -> dict[int, Any]:
    """One BF16 forward over ``tokens`` recording every layer's attention inputs."""
    device = next(model.parameters()).device
    with capture_attention(model) as records, torch.no_grad():
        model(input_ids=torch.tensor([list(tokens)], device=device), use_cache=False)
    return dict(records)


@register_task_kind("fidelity")
def fidelity_task(task_cfg: Mapping[str, Any], bundle: Any, kv: Any, *, limit: int | None = None,
                  seed: int = 0, lm: Any = None, progress: bool = True) -> CellResult:
    """The ``fidelity`` task kind (``kind: fidelity`` in ``configs/task/*.yaml``)."""
    settings = FidelitySettings.from_task(task_cfg, limit)
    return run_fidelity_cell(bundle, kv, settings, progress=progress, task_name=str(task_cfg.get("name", "fidelity")))
