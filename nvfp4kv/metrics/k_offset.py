"""How much of each layer's keys is a per-channel offset, and what that offset costs a KV format.

Why this exists: on Qwen2.5-Coder-1.5B calibrated NVFP4 KV loses every long-context needle, and the
ablation (``+sweep=long_context_qwen_ablation``) puts the loss on K, whatever the scale policy. This
module measures the mechanism on real activations (captured by :mod:`nvfp4kv.metrics.capture`):

- ``offset_share``: the fraction of a layer's key energy that is its per-channel mean over tokens,
  ``T * sum_c m_c^2 / sum(K^2)`` (1.0: the keys are a constant vector plus nothing);
- ``offset_to_spread``: the largest ``|m_c| / std_c`` over channels and heads (how many times a
  channel's offset exceeds its variation across tokens);
- per format, the error attention sees when only K is rounded, ``||O_hat - O|| / ||O||`` averaged
  over KV heads (:func:`nvfp4kv.metrics.layer_error.layer_errors`' ``attn_rel_err``, the format's
  dynamic scale), for the raw keys and for the keys minus their mean with the mean added back after
  rounding (what ``k_center`` stores; attention is invariant to the shift itself).

A layer whose error falls by an order of magnitude under centering loses its precision to the offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nvfp4kv.formats.base import KVFormat
from nvfp4kv.metrics.capture import AttentionInputs
from nvfp4kv.metrics.layer_error import _attention, rel_err, roundtrip


def offset_stats(k: torch.Tensor) -> dict[str, float]:
    """``offset_share``, ``offset_to_spread`` and ``amax`` of keys ``[B, H, T, D]``."""
    x = k.float()
    mean = x.mean(dim=2, keepdim=True)
    std = x.std(dim=2, keepdim=True)
    energy = float((x**2).sum())
    share = float((mean**2).sum()) * x.shape[2] / energy if energy > 0 else 0.0
    return {
        "amax": float(x.abs().max()),
        "offset_share": share,
        "offset_to_spread": float((mean.abs() / std.clamp_min(1e-12)).max()),
    }


def _head_outputs(rec: AttentionInputs, k: torch.Tensor) -> list[torch.Tensor]:
    """Per KV head, causal attention of its query heads over keys ``k`` and the exact values."""
    q, v = rec.q.float(), rec.v.float()
    group = max(1, rec.group_size)
    return [_attention(q[0, head * group : (head + 1) * group], k[0, head], v[0, head], rec.scaling)
            for head in range(k.shape[1])]


def key_attention_error(rec: AttentionInputs, fmt: KVFormat, center: bool,
                        reference: list[torch.Tensor] | None = None) -> float:
    """Mean over KV heads of the attention error when only K goes through ``fmt`` (V exact).

    ``reference``: the exact per-head outputs (:func:`_head_outputs` of the raw keys), computed
    here when not given; :func:`offset_report` computes them once per layer for every format.
    """
    k = rec.k.float()
    if center:
        mean = k.mean(dim=2, keepdim=True)
        k_hat = roundtrip(fmt, k - mean) + mean
    else:
        k_hat = roundtrip(fmt, k)
    reference = reference if reference is not None else _head_outputs(rec, k)
    errors = [rel_err(ref, out) for ref, out in zip(reference, _head_outputs(rec, k_hat))]
    return sum(errors) / len(errors)


def offset_report(captured: Mapping[int, AttentionInputs], formats: Mapping[str, KVFormat]) -> list[dict[str, Any]]:
    """One row per layer: offset statistics and, per format, ``attn_err_<name>`` (raw keys) and
    ``attn_err_<name>_centered``."""
    rows = []
    for layer in sorted(captured):
        rec = captured[layer]
        row: dict[str, Any] = {"layer": layer, **offset_stats(rec.k)}
        reference = _head_outputs(rec, rec.k.float())
        for name, fmt in formats.items():
            row[f"attn_err_{name}"] = key_attention_error(rec, fmt, False, reference)
            row[f"attn_err_{name}_centered"] = key_attention_error(rec, fmt, True, reference)
        rows.append(row)
    return rows
