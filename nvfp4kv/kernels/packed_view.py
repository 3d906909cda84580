"""The one channel from a cache layer to ``attn_implementation="nvfp4kv_decode"``.

transformers 5.x attention layers do, per layer and per forward::

    key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    out, _ = attention_fn(self, query, key, value, mask, dropout=..., scaling=..., **kwargs)

with the *same* ``kwargs`` dict (a fresh one per attention call). That dict is the channel: a
cache layer puts one typed :class:`PackedKVHandoff` into it under :data:`PACKED_KV_KWARG`,
and the attention function pops it. Nothing is set on modules or tensors, and any other
attention function just ignores one extra keyword argument.

The protocol, per layer and per call:

1. ``update`` stores the new K/V. If the previous reader of this layer *accepted* packed views
   and this call reads every token as stored (a decode step), it returns zero-memory
   stand-ins (:func:`make_standins`) and the handoff carries the :class:`PackedKVView`;
   otherwise it returns real K/V and a handoff without a view.
2. The attention function pops the handoff. When it could run the fused kernel for this kind
   of call (Triton available, device, dtype, no dropout/softcap...), it calls
   :meth:`PackedKVHandoff.accept`, so the layer may hand over stand-ins on its *next* call.
   The acceptance lasts one call: a layer read by any other attention function stops getting
   accepted and returns real K/V again.
3. With a view, the kernel reads the packed bytes. Without one (prefill, unreadable formats)
   it runs SDPA on the real K/V; given stand-ins it cannot, and raises instead of attending
   over placeholders.

A model or transformers version that calls ``cache.update`` without ``kwargs=`` has no
channel: no handoff is published, nothing is ever accepted, and attention reads real K/V
through SDPA (same math, logged once).

This module imports neither Triton nor transformers (the cache uses it on any machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nvfp4kv.formats.base import KVFormat, Parts

#: the attention kwarg that carries a :class:`PackedKVHandoff` from the cache to attention
PACKED_KV_KWARG = "nvfp4kv_packed"


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


@dataclass(frozen=True)
class PackedKVHandoff:
    """What a cache layer tells the attention function about the K/V it just returned.

    ``view``: the packed view to read instead of the returned K/V, or None (read the K/V).
    ``standins``: the returned K/V are placeholders (only the view holds the data).
    ``on_accept``: called by :meth:`accept`; the layer's way to learn that its reader reads
    packed views (None for a cache that does not care).
    """

    view: PackedKVView | None = None
    standins: bool = False
    on_accept: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.standins and self.view is None:
            raise ValueError("a handoff with stand-in K/V must carry the packed view they stand for")

    def accept(self) -> None:
        """The attention function reads packed views: stand-ins are welcome next call."""
        if self.on_accept is not None:
            self.on_accept()


def has_channel(update_kwargs: dict[str, Any]) -> bool:
    """Whether this ``cache.update`` call forwards the attention kwargs (transformers 5.x)."""
    return isinstance(update_kwargs.get("kwargs"), dict)


def publish(update_kwargs: dict[str, Any], handoff: PackedKVHandoff) -> bool:
    """Put ``handoff`` into the attention kwargs forwarded to ``cache.update``; False if none."""
    forwarded = update_kwargs.get("kwargs")
    if not isinstance(forwarded, dict):
        return False
    forwarded[PACKED_KV_KWARG] = handoff
    return True


def take(attention_kwargs: dict[str, Any]) -> PackedKVHandoff | None:
    """Remove and return the handoff from an attention function's kwargs (None if absent)."""
    handoff = attention_kwargs.pop(PACKED_KV_KWARG, None)
    return handoff if isinstance(handoff, PackedKVHandoff) else None


def make_standins(view: PackedKVView, like: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-memory K/V placeholders ``[B, Hkv, total, D]`` (stride 0) for a layer whose
    reader accepted packed views; publish them with ``PackedKVHandoff(view, standins=True)``."""
    first = next(iter(view.k_parts.values()))
    b, h, d = int(first.shape[0]), int(first.shape[1]), like.shape[-1]
    k = torch.zeros((), dtype=like.dtype, device=like.device).expand(b, h, total_tokens, d)
    v = torch.zeros((), dtype=like.dtype, device=like.device).expand(b, h, total_tokens, d)
    return k, v
