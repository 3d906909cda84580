"""Per-layer, per-head quantization error of K and V on real activations.

Method (stated because "SQNR of the KV cache" can mean many things): one BF16 forward over
held-out text records, per layer, the post-RoPE queries, keys and values attention consumed
(:mod:`nvfp4kv.metrics.capture`). Each layer's K and V ``[1, Hkv, T, D]`` then go through the
KV format's own ``quantize``/``dequantize`` with the format's global scale computed on that
tensor (one scale per layer for K and one for V: what the cache's default ``prefill`` policy
computes from a prompt, and what ``dynamic`` computes for one write). For each KV head we report

- ``sqnr_db = 10 log10(sum x^2 / sum (x - x_hat)^2)`` over its tokens and head_dim; ``None``
  when the round trip is exact (BF16), since the ratio is infinite (JSON has no Infinity);
- ``attn_rel_err = ||O_hat - O|| / ||O||`` with ``O = softmax(Q K^T * scale + causal) V``
  over the query heads that share this KV head, where ``O_hat`` quantizes *only* this row's
  tensor (``kind="k"``: K_hat with exact V; ``kind="v"``: V_hat with exact K). Separating the
  two attributes the damage: K errors move the softmax, V errors only the average.

Not modelled here (the decode-faithful metrics in :mod:`nvfp4kv.metrics.fidelity` include
them): residual windows, sink tokens, static/prefill scale policies. Layers listed in the KV
config's ``skip_layers`` stay BF16 and report zero error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from nvfp4kv.formats.base import KVFormat
from nvfp4kv.metrics.capture import AttentionInputs


def roundtrip(fmt: KVFormat, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` through the format's quantize/dequantize with its dynamic global scale.

    ``T`` is cut to a multiple of the format's ``token_group`` (KIVI-style per-channel key
    groups); the caller compares against the same cut.
    """
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    parts = fmt.quantize(x, gs)
    return fmt.dequantize(parts, gs, torch.float32)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; ``None`` when undefined (exact round trip, or no signal)."""
    noise = float(((x.float() - x_hat.float()) ** 2).sum())
    signal = float((x.float() ** 2).sum())
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention in FP32 for ``q`` ``[G, T, D]`` against one head's ``k, v`` ``[T, D]``.

    Queries are the last ``T_q`` positions of the ``T`` keys (prefill: ``T_q == T``).
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(
        q.float(), k.float().expand(q.shape[0], -1, -1), v.float().expand(q.shape[0], -1, -1),
        attn_mask=mask, scale=scaling,
    )


def rel_err(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - ref|| / ||ref||`` (Frobenius)."""
    denom = float(ref.norm())
    return float((approx - ref).norm()) / denom if denom > 0 else 0.0


def layer_errors(
    captured: Mapping[int, AttentionInputs],
    k_format: KVFormat,
    v_format: KVFormat,
    *,
    skip_layers: Iterable[int] = (),
) -> list[dict[str, Any]]:
    """Rows ``{layer, head, kind, sqnr_db, attn_rel_err}`` for every captured layer and KV head."""
    skipped = set(skip_layers)
    rows: list[dict[str, Any]] = []
    for layer in sorted(captured):
        rec = captured[layer]
        group = max(1, rec.group_size)
        token_group = math.lcm(k_format.token_group, v_format.token_group)
        t = (rec.k.shape[2] // token_group) * token_group
        if t == 0:
            raise ValueError(f"captured only {rec.k.shape[2]} tokens; the formats need multiples of {token_group}: "
                             f"set capture_tokens to a multiple of {token_group}.")
        k, v = rec.k[:, :, :t], rec.v[:, :, :t]
        q = rec.q[:, :, :t]  # prefill capture: query i attends keys 0..i
        if layer in skipped:
            k_hat, v_hat = k.float(), v.float()
        else:
            k_hat, v_hat = roundtrip(k_format, k), roundtrip(v_format, v)
        for head in range(k.shape[1]):
            q_h = q[0, head * group : (head + 1) * group]
            k_h, v_h = k[0, head].float(), v[0, head].float()
            out = _attention(q_h, k_h, v_h, rec.scaling)
            for kind, x, x_hat, out_hat in (
                ("k", k_h, k_hat[0, head], _attention(q_h, k_hat[0, head], v_h, rec.scaling)),
                ("v", v_h, v_hat[0, head], _attention(q_h, k_h, v_hat[0, head], rec.scaling)),
            ):
                rows.append(
                    dict(layer=layer, head=head, kind=kind, sqnr_db=sqnr_db(x, x_hat), attn_rel_err=rel_err(out, out_hat))
                )
    return rows
