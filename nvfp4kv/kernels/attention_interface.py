"""``attn_implementation="nvfp4kv_decode"``: fused packed-KV decode attention for transformers.

Registered through ``transformers.AttentionInterface`` (no model code is patched), together
with the SDPA mask builder under the same name, so a model loaded with
``attn_implementation="nvfp4kv_decode"`` gets exactly the masks SDPA would get.

The cache hands its packed K/V over through one channel, documented in
:mod:`nvfp4kv.kernels.packed_view`: a :class:`~nvfp4kv.kernels.packed_view.PackedKVHandoff`
in the attention kwargs (key :data:`PACKED_KV_KWARG`). This function pops it, accepts it when
it could run the kernel for this kind of call (so the layer may hand over stand-ins next
time), and runs :func:`~nvfp4kv.kernels.decode_attention.decode_attention` when it can: one
query token, formats whose classes declare a fused decode builder, a CUDA tensor or the
Triton interpreter, no dropout / softcap / attention sinks / position bias. Otherwise it calls
transformers' own SDPA function on the K/V the cache returned: same math, so that is not a
change of numerics, and it is logged once per reason. Given stand-ins (the cache skipped
dequantizing), a fallback is impossible and it raises instead.

Row-invariant attention for left-padded batches (:class:`row_invariant_attention`): SDPA over a
padded batch does not give a row what it gets alone (a decode step over ``n`` keys plus masked
pads is reduced in another order than over the ``n`` keys alone, so the last bits differ).
``nvfp4kv_rows_sdpa`` calls transformers' SDPA function once per padded row, on that row's real
queries and keys only and with exactly the arguments an unpadded call would get (no mask where
SDPA's own mask builder would skip it), so each row's attention output is bit-identical to the row
computed alone; an unpadded batch is one plain call. The lm-eval model switches a model to it only
for the duration of its own calls. Other implementations (``eager``, whose function is
model-specific, ``nvfp4kv_decode``, flash kernels) are left as they are.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.numerics import saturating_cast
from nvfp4kv.kernels.packed_operand import packed_operand
from nvfp4kv.kernels.packed_view import (
    PACKED_KV_KWARG,
    PackedKVHandoff,
    PackedKVView,
    make_standins,
    publish,
    take,
)

try:
    from nvfp4kv.kernels.decode_attention import decode_attention
except ImportError:  # no Triton: the cache-side channel still works, the kernel never runs
    decode_attention = None  # type: ignore[assignment]

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PACKED_KV_KWARG",
    "PackedKVHandoff",
    "PackedKVView",
    "call_blocker",
    "fused_unavailable_reason",
    "make_standins",
    "nvfp4kv_decode_attention",
    "packed_operand",
    "publish",
    "register_attention",
    "row_invariant_attention",
]

logger = logging.getLogger("nvfp4kv.kernels")

ATTN_IMPLEMENTATION = "nvfp4kv_decode"


def _kernel_can_run(t: torch.Tensor) -> bool:
    if decode_attention is None:
        return False
    if t.device.type == "cuda":
        return True
    from nvfp4kv.kernels.backend import triton_interpreting

    return t.device.type == "cpu" and triton_interpreting()


def call_blocker(query: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> str | None:
    """Why no decode step of this attention call could take the fused path (None: it could)."""
    if decode_attention is None:
        return "Triton is not installed (pip install 'nvfp4kv[gpu]')"
    if dropout > 0:
        return "attention dropout"
    for key in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(key) is not None:
            return f"{key!r} is not supported by the fused kernel"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if not _kernel_can_run(query):
        return f"query on {query.device} (the Triton kernel needs CUDA or TRITON_INTERPRET=1)"
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"query dtype {query.dtype}"
    return None


def fused_unavailable_reason(
    query: torch.Tensor, view: PackedKVView | None, dropout: float, kwargs: dict[str, Any]
) -> str | None:
    """Why this call cannot take the fused path (None when it can)."""
    if view is None:
        return "the cache published no packed view for this layer"
    if query.shape[2] != 1:
        return "prefill (more than one query token)"
    blocker = call_blocker(query, dropout, kwargs)
    if blocker is not None:
        return blocker
    if packed_operand(view.k_format, view.k_parts, view.k_global_scale) is None or packed_operand(
        view.v_format, view.v_parts, view.v_global_scale
    ) is None:
        return f"formats {view.k_format.name}/{view.v_format.name} have no fused decode kernel"
    return None


_FALLBACK_LOGGED: set[str] = set()


def nvfp4kv_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (signature of ``sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handoff = take(kwargs)
    if handoff is not None and call_blocker(query, dropout, kwargs) is None:
        handoff.accept()  # this layer's next decode step may hand over stand-ins
    view = handoff.view if handoff is not None else None
    reason = fused_unavailable_reason(query, view, dropout, kwargs)
    if reason is not None:
        if handoff is not None and handoff.standins:
            raise BackendUnavailableError(
                f"nvfp4kv_decode got stand-in K/V (the cache skipped dequantizing) but cannot run "
                f"the fused kernel: {reason}. Fix: let the cache return real K/V in this case, or "
                f"use attn_implementation='sdpa'."
            )
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            logger.info("nvfp4kv_decode: SDPA for this call (same math): %s", reason)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    assert view is not None
    k_op = packed_operand(view.k_format, view.k_parts, view.k_global_scale)
    v_op = packed_operand(view.v_format, view.v_parts, view.v_global_scale)
    assert k_op is not None and v_op is not None
    raw = view.raw_k is not None and view.raw_v is not None and view.num_raw > 0
    # raw tokens read as the cache reads them: cast to the query dtype, saturating
    raw_k = saturating_cast(view.raw_k, query.dtype) if raw else None
    raw_v = saturating_cast(view.raw_v, query.dtype) if raw else None
    out = decode_attention(
        query, k_op, v_op, scale=scaling, packed_start=view.packed_start,
        raw_k=raw_k, raw_v=raw_v, raw_positions=view.raw_positions if raw else None,
        attn_mask=attention_mask,
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function and its (SDPA) mask builder under ``name``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, nvfp4kv_decode_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---------------------------------------------------------------------------- row-invariant attention
#: attention implementation -> its row-invariant twin
ROW_INVARIANT = {"sdpa": "nvfp4kv_rows_sdpa"}


def _leading_pads(mask: torch.Tensor, keys: int) -> list[int]:
    """Left pad keys per row of a 4-D mask ``[B, 1|H, q, >=keys]`` (bool: True attends; float:
    0 attends), read from the row's last query, which sees every real key."""
    last = mask[:, 0, -1, :keys]
    attends = last if last.dtype == torch.bool else last == 0
    return [int(n) for n in (attends.long().cumsum(-1) == 0).sum(-1).tolist()]


def _rowwise(inner: Any) -> Any:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if attention_mask is None or attention_mask.dim() != 4:
            return inner(module, query, key, value, attention_mask, **kwargs)
        tq, tk = query.shape[2], key.shape[2]
        pads = _leading_pads(attention_mask, tk)
        if not any(pads):
            return inner(module, query, key, value, attention_mask, **kwargs)
        outs = []
        for b, pad in enumerate(pads):
            q0 = min(max(pad - (tk - tq), 0), tq)
            q_b, k_b, v_b = query[b : b + 1, :, q0:], key[b : b + 1, :, pad:], value[b : b + 1, :, pad:]
            out = query.new_zeros((1, tq, query.shape[1], value.shape[-1]))
            if q_b.shape[2] and k_b.shape[2]:
                # what the row alone would be given: SDPA skips the mask of a plain causal call
                alone = q_b.shape[2] == 1 or q_b.shape[2] == k_b.shape[2]
                mask_b = None if alone else attention_mask[b : b + 1, :, q0:, pad:tk]
                o, _ = inner(module, q_b, k_b, v_b, mask_b, **kwargs)
                out[:, q0:] = o
            outs.append(out)
        return torch.cat(outs, dim=0), None

    return attention


def register_row_invariant() -> None:
    """Register ``nvfp4kv_rows_sdpa`` with SDPA's mask builder; idempotent."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROW_INVARIANT["sdpa"], _rowwise(sdpa_attention_forward))
    AttentionMaskInterface.register(ROW_INVARIANT["sdpa"], sdpa_mask)


class row_invariant_attention:
    """Context manager: a model running ``sdpa`` runs ``nvfp4kv_rows_sdpa`` inside and gets its
    own implementation back on exit (any other implementation is left as it is). Re-entrant:
    only the outermost use switches."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.previous: str | None = None

    def __enter__(self) -> row_invariant_attention:
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current in ROW_INVARIANT:
            register_row_invariant()
            self.previous = current
            self.model.set_attn_implementation(ROW_INVARIANT[current])
            if getattr(self.model.config, "_attn_implementation", None) != ROW_INVARIANT[current]:
                self.previous = None  # the model cannot switch implementations: left as it is
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)
            self.previous = None
