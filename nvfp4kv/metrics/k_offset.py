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


def key_attention_error(rec: AttentionInputs, fmt: KVFormat, center: bool) -> float:
    """Mean over KV heads of the attention error when only K goes through ``fmt`` (V exact)."""
    k, q, v = rec.k.float(), rec.q.float(), rec.v.float()
    if center:
        mean = k.mean(dim=2, keepdim=True)
        k_hat = roundtrip(fmt, k - mean) + mean
    else:
        k_hat = roundtrip(fmt, k)
    group = max(1, rec.group_size)
    errors = []
    for head in range(k.shape[1]):
        q_h = q[0, head * group : (head + 1) * group]
        ref = _attention(q_h, k[0, head], v[0, head], rec.scaling)
        errors.append(rel_err(ref, _attention(q_h, k_hat[0, head], v[0, head], rec.scaling)))
    return sum(errors) / len(errors)


def offset_report(captured: Mapping[int, AttentionInputs], formats: Mapping[str, KVFormat]) -> list[dict[str, Any]]:
    """One row per layer: offset statistics and, per format, ``attn_err_<name>`` (raw keys) and
    ``attn_err_<name>_centered``."""
    rows = []
    for layer in sorted(captured):
        rec = captured[layer]
        row: dict[str, Any] = {"layer": layer, **offset_stats(rec.k)}
        for name, fmt in formats.items():
            row[f"attn_err_{name}"] = key_attention_error(rec, fmt, center=False)
            row[f"attn_err_{name}_centered"] = key_attention_error(rec, fmt, center=True)
        rows.append(row)
    return rows
