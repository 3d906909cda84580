"""What a cache layer really holds, in bytes, and what that means per element.

Counted from the tensors the layer keeps (``numel * element_size``), never from a formula, so a
format that stores more than it claims shows up. The formats' nominal ``bits_per_element`` is
reported next to the measurement so tests (and readers) can check one against the other:
for a packed layer without sink/residual tokens, ``k_bytes`` is exactly
``B * H * T * D * k_format_bits / 8`` plus the global scale.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from nvfp4kv.cache.layer import PackedKVLayer

BF16_BYTES = 2


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _elements(layer: PackedKVLayer) -> tuple[int, int]:
    """Element counts of K and V as ``[B, H, T, D]`` (from whatever tensor is stored)."""
    counts = []
    for stream in (layer.k_stream, layer.v_stream):
        shape = None
        for t in (stream.sink, stream.pending, stream.dequantized):
            if t is not None:
                shape = t.shape
                break
        if shape is None and stream.parts:
            shape = next(iter(stream.parts.values())).shape  # [B, H, rows, ...]
        if shape is None:
            counts.append(0)
            continue
        counts.append(shape[0] * shape[1] * stream.n_tokens * layer.head_dims[stream is layer.v_stream])
    return counts[0], counts[1]


def packed_layer_memory(layer: PackedKVLayer) -> dict[str, Any]:
    """Memory of one packed (or BF16 skip) layer."""
    k_el, v_el = _elements(layer)
    k_bytes, v_bytes = layer.k_stream.nbytes(), layer.v_stream.nbytes()
    d_k, d_v = layer.head_dims
    return {
        "layer": layer.layer_idx,
        "kind": "bf16_skip" if layer.is_skip else "packed",
        "k_format": layer.k_format.name,
        "v_format": layer.v_format.name,
        "tokens": layer.get_seq_length(),
        "k_bytes": k_bytes,
        "v_bytes": v_bytes,
        "bits_per_element": 8 * (k_bytes + v_bytes) / (k_el + v_el) if k_el + v_el else float("nan"),
        "k_format_bits": layer.k_format.bits_per_element(d_k) if d_k else float("nan"),
        "v_format_bits": layer.v_format.bits_per_element(d_v) if d_v else float("nan"),
        "bf16_bytes": BF16_BYTES * (k_el + v_el),
        "fastpath_bytes": layer.fastpath_nbytes(),
        "reserved_bytes": layer.reserved_nbytes(),
    }


def plain_layer_memory(layer: Any, layer_idx: int) -> dict[str, Any]:
    """Memory of a layer transformers stores unquantized (sliding-window, or any other type)."""
    keys = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
    values = getattr(layer, "values", None) if getattr(layer, "is_initialized", False) else None
    k_bytes, v_bytes = _nbytes(keys), _nbytes(values)
    elements = (keys.numel() if keys is not None else 0) + (values.numel() if values is not None else 0)
    bits = 8 * (k_bytes + v_bytes) / elements if elements else float("nan")
    return {
        "layer": layer_idx,
        "kind": "sliding" if getattr(layer, "is_sliding", False) else type(layer).__name__,
        "k_format": "unquantized",
        "v_format": "unquantized",
        "tokens": keys.shape[-2] if isinstance(layer, DynamicLayer) and keys is not None and keys.dim() == 4 else 0,
        "k_bytes": k_bytes,
        "v_bytes": v_bytes,
        "bits_per_element": bits,
        "k_format_bits": keys.element_size() * 8 if keys is not None else float("nan"),
        "v_format_bits": values.element_size() * 8 if values is not None else float("nan"),
        "bf16_bytes": BF16_BYTES * elements,
        "fastpath_bytes": 0,
        "reserved_bytes": 0,
    }


def layer_memory(layer: Any, layer_idx: int) -> dict[str, Any]:
    """One row of :meth:`~nvfp4kv.cache.QuantizedKVCache.memory_report`."""
    if isinstance(layer, PackedKVLayer):
        return packed_layer_memory(layer)
    return plain_layer_memory(layer, layer_idx)
