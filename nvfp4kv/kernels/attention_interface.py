"""``attn_implementation="nvfp4kv_decode"``: fused packed-KV decode attention for transformers.

Registered through ``transformers.AttentionInterface`` (no model code is patched), together
with the SDPA mask builder under the same name, so a model loaded with
``attn_implementation="nvfp4kv_decode"`` gets exactly the masks SDPA would get.

How the attention function sees the packed cache (the hook a cache implements):

1. The cache layer builds a :class:`PackedKVView` of what it stores for this layer: the K/V
   formats, their packed parts ``[B, Hkv, Tp, ...]`` and global scales, the logical position of
   the first packed token, and the full-precision extra tokens (sinks, residual window) with
   their logical positions.
2. In ``update()`` it hands the view over with :func:`attach_packed_view` on the key tensor it
   returns (transformers passes that tensor to the attention function unchanged), and/or puts
   it into the forwarded kwargs dict (``kwargs["kwargs"]`` of ``layer.update`` in
   transformers 5.x, which the attention layer later splats into the attention call) under
   :data:`PACKED_VIEW_KWARG`.

3. On every ``update`` it also *offers* itself as a reader with :func:`offer_fused_reader`;
   when this function is the attention function and could run the kernel, it calls the
   layer's ``claim_fused_reader()``. A layer claimed on its previous call knows its reader
   is the fused kernel and returns stand-ins (:func:`make_standin`) on the next decode step
   instead of dequantizing its whole history. The claim is renewed on every call, so a
   layer read by any other attention function always returns real K/V.

The function then runs :func:`~nvfp4kv.kernels.decode_attention.decode_attention` when it can
(one query token, a packed format the kernel reads, a CUDA tensor or the Triton interpreter,
no dropout / softcap / attention sinks / position bias) and otherwise calls transformers' own
SDPA function on the K/V the cache returned: same math, so that is not a change of numerics,
and it is logged once per reason. A cache that returns *stand-in* K/V (to skip dequantizing
on decode steps) marks them with :func:`make_standin`; then a fallback is impossible and
the function raises instead of attending over placeholders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KVFormat, Parts
try:
    from nvfp4kv.kernels.decode_attention import (
        KIND_FP8,
        KIND_MX16,
        KIND_MXFP4,
        KIND_NVFP4,
        PackedOperand,
        decode_attention,
    )
except ImportError:  # no Triton: the cache-side hooks below still work, the kernel never runs
    decode_attention = None  # type: ignore[assignment]

logger = logging.getLogger("nvfp4kv.kernels")

ATTN_IMPLEMENTATION = "nvfp4kv_decode"
#: kwarg name under which a cache may forward the view to the attention function
PACKED_VIEW_KWARG = "nvfp4kv_packed"
_TENSOR_ATTR = "_nvfp4kv_packed"
#: kwarg name / key-tensor attribute under which a cache layer offers itself as a reader probe
READER_PROBE_KWARG = "nvfp4kv_reader"
_PROBE_ATTR = "_nvfp4kv_reader"
#: formats the kernel reads (token-wise parts only)
FUSED_FORMATS = ("nvfp4", "fp4_mx_block16", "mxfp4", "fp8_e4m3")
_STANDIN_ATTR = "_nvfp4kv_standin"


@dataclass(frozen=True)
class PackedKVView:
    """What one cache layer stores, as the fused decode kernel reads it.

    ``k_parts`` / ``v_parts``: the formats' parts, ``[B, Hkv, Tp, ...]`` (Tp may be 0).
    ``k_global_scale`` / ``v_global_scale``: FP32, broadcastable to ``[B, Hkv, Tp, 1]`` (None for
    formats without one). Packed token ``n`` is at logical position ``packed_start + n``.
    ``raw_k`` / ``raw_v``: full-precision extra tokens ``[B, Hkv, E, D]`` (sinks and/or the
    residual window), at logical positions ``raw_positions`` (int ``[E]``; default: right after
    the packed tokens). Logical positions index the attention mask's last dim.
    """

    k_format: KVFormat
    v_format: KVFormat
    k_parts: Parts
    v_parts: Parts
    k_global_scale: torch.Tensor | None
    v_global_scale: torch.Tensor | None
    packed_start: int = 0
    raw_k: torch.Tensor | None = None
    raw_v: torch.Tensor | None = None
    raw_positions: torch.Tensor | None = None

    @property
    def num_packed(self) -> int:
        return int(next(iter(self.k_parts.values())).shape[2]) if self.k_parts else 0

    @property
    def num_raw(self) -> int:
        return 0 if self.raw_k is None else int(self.raw_k.shape[2])


def packed_operand(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand | None:
    """The kernel's view of one side (K or V), or None when the kernel cannot read ``fmt``."""
    name = fmt.name
    if name == "nvfp4":
        if global_scale is None:
            return None
        return PackedOperand(KIND_NVFP4, parts["codes"], parts["scales"], global_scale)
    if name == "fp4_mx_block16":
        return PackedOperand(KIND_MX16, parts["codes"], parts["scales"], None)
    if name == "mxfp4":
        return PackedOperand(KIND_MXFP4, parts["codes"], parts["scales"], None)
    if name == "fp8_e4m3":
        scale = parts["scale"] if getattr(fmt, "scaling", "tensor") == "token" else global_scale
        if scale is None:
            return None
        return PackedOperand(KIND_FP8, parts["codes"], None, scale)
    return None


def fused_reads_format(fmt: KVFormat) -> bool:
    """Whether the fused kernel can read a layer stored in ``fmt``."""
    return fmt.name in FUSED_FORMATS and fmt.token_group == 1


class FusedReaderProbe(Protocol):
    """What a cache layer offers: the attention function calls this when it can read packed views."""

    def claim_fused_reader(self) -> None: ...


def offer_fused_reader(key: torch.Tensor, update_kwargs: dict[str, Any], layer: FusedReaderProbe) -> None:
    """Let the attention function that reads ``key`` tell ``layer`` it is the fused one.

    The probe goes both ways a view goes (key-tensor attribute, forwarded kwargs); other
    attention functions ignore it, so the layer is never claimed by them.
    """
    setattr(key, _PROBE_ATTR, layer)
    forwarded = update_kwargs.get("kwargs")
    if isinstance(forwarded, dict):
        forwarded[READER_PROBE_KWARG] = layer


def attach_packed_view(key: torch.Tensor, view: PackedKVView) -> torch.Tensor:
    """Mark the key tensor a cache layer returns with its packed view (returns ``key``)."""
    setattr(key, _TENSOR_ATTR, view)
    return key


def publish_packed_view(update_kwargs: dict[str, Any], view: PackedKVView) -> None:
    """Put the view into the kwargs transformers forwards to attention (``layer.update(**kw)``).

    transformers 5.x calls ``cache.update(k, v, layer_idx, kwargs=kwargs)`` with the same dict
    it later passes to the attention function; this stores the view in it. No-op otherwise.
    """
    forwarded = update_kwargs.get("kwargs")
    if isinstance(forwarded, dict):
        forwarded[PACKED_VIEW_KWARG] = view


def make_standin(view: PackedKVView, like: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-memory K/V placeholders ``[B, Hkv, total, D]`` (stride 0) carrying ``view``.

    For a cache that skips dequantizing on decode steps: the fused function reads the view,
    and refuses (raises) to fall back to SDPA over these placeholders.
    """
    first = next(iter(view.k_parts.values()))
    b, h, d = int(first.shape[0]), int(first.shape[1]), like.shape[-1]
    k = torch.zeros((), dtype=like.dtype, device=like.device).expand(b, h, total_tokens, d)
    v = torch.zeros((), dtype=like.dtype, device=like.device).expand(b, h, total_tokens, d)
    for t in (k, v):
        setattr(t, _STANDIN_ATTR, True)
    attach_packed_view(k, view)
    return k, v


def find_packed_view(key: torch.Tensor, kwargs: dict[str, Any]) -> PackedKVView | None:
    """The view published by the cache for this call (kwargs first, then the key tensor)."""
    view = kwargs.get(PACKED_VIEW_KWARG)
    if isinstance(view, PackedKVView):
        return view
    view = getattr(key, _TENSOR_ATTR, None)
    return view if isinstance(view, PackedKVView) else None


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

    view = find_packed_view(key, kwargs)
    kwargs.pop(PACKED_VIEW_KWARG, None)
    probe = kwargs.pop(READER_PROBE_KWARG, None) or getattr(key, _PROBE_ATTR, None)
    if probe is not None and call_blocker(query, dropout, kwargs) is None:
        probe.claim_fused_reader()  # its next decode step may hand over stand-ins
    reason = fused_unavailable_reason(query, view, dropout, kwargs)
    if reason is not None:
        if getattr(key, _STANDIN_ATTR, False):
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
    raw_k = view.raw_k.to(query.dtype) if view.raw_k is not None and view.num_raw else None
    raw_v = view.raw_v.to(query.dtype) if view.raw_v is not None and view.num_raw else None
    out = decode_attention(
        query, k_op, v_op, scale=scaling, packed_start=view.packed_start,
        raw_k=raw_k, raw_v=raw_v, raw_positions=view.raw_positions if raw_k is not None else None,
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
