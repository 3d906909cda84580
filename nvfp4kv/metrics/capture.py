"""Record the real query/key/value tensors every attention layer sees, without patching the model.

transformers routes attention through ``AttentionInterface``: a model's attention module calls
whichever function is registered under ``config._attn_implementation``. We register one more
function, ``"nvfp4kv_capture"``, that stores its inputs and delegates to the stock SDPA
function (with SDPA's mask builder registered under the same name), so the forward pass is
numerically the one ``attn_implementation="sdpa"`` runs. What it records is exactly what
attention consumes: queries after RoPE (and any q-norm), keys/values after RoPE as returned by
the cache's ``update`` (raw, since capture runs with a plain cache), before GQA repetition.
:func:`capture_attention` switches the implementation for the duration of a ``with`` block and
restores the previous one, so the model is left as it was found.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

CAPTURE_IMPLEMENTATION = "nvfp4kv_capture"

_RECORDS: contextvars.ContextVar[dict[int, "AttentionInputs"] | None] = contextvars.ContextVar(
    "nvfp4kv_attention_records", default=None
)
_registered = False


@dataclass(frozen=True)
class AttentionInputs:
    """One layer's attention inputs: ``q`` ``[B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.q.shape[1] // self.k.shape[1]


def _capturing_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs: Any):
    """Store the inputs (detached copies) under the layer index, then run stock SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records = _RECORDS.get()
    if records is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        records[int(module.layer_idx)] = AttentionInputs(
            q=query.detach().clone(), k=key.detach().clone(), v=value.detach().clone(), scaling=float(scaling)
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register the capture function and its mask builder once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    _registered = True


@contextmanager
def capture_attention(model: Any) -> Iterator[dict[int, AttentionInputs]]:
    """Within the block, every forward of ``model`` records ``{layer_idx: AttentionInputs}``.

    A layer called twice (a second forward) overwrites its record: capture one forward.
    """
    _register()
    previous = model.config._attn_implementation
    records: dict[int, AttentionInputs] = {}
    token = _RECORDS.set(records)
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        yield records
    finally:
        model.set_attn_implementation(previous)
        _RECORDS.reset(token)
