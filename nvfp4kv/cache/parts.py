"""Operations on a format's packed *parts* that follow the contract in :mod:`nvfp4kv.formats.base`.

Every part is laid out ``[B, H, t, ...]`` with ``t = T`` (token-wise) or ``t = T // token_group``
(shared by a group of tokens), so the cache can append, slice and batch-index parts without
knowing which format produced them. Slicing by tokens is only defined on group boundaries; the
callers (the cache stream) keep it that way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4kv.formats.base import Parts


def cat_parts(old: Parts | None, new: Parts) -> Parts:
    """Append ``new`` after ``old`` along the token axis (dim 2)."""
    if old is None:
        return dict(new)
    if old.keys() != new.keys():
        raise ValueError(f"parts disagree: {sorted(old)} vs {sorted(new)}")
    return {name: torch.cat([old[name], new[name]], dim=2) for name in old}


def slice_parts(parts: Parts, start: int, stop: int, total: int) -> Parts:
    """Tokens ``[start, stop)`` of parts that hold ``total`` tokens (group-aligned bounds)."""
    out = {}
    for name, tensor in parts.items():
        rows = tensor.shape[2]
        lo, hi = start * rows, stop * rows
        if lo % total or hi % total:
            raise ValueError(
                f"part {name!r} ({rows} rows for {total} tokens) cannot be cut at tokens [{start}, {stop}): "
                f"not on a token-group boundary"
            )
        out[name] = tensor[:, :, lo // total : hi // total]
    return out


def map_parts(parts: Parts | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> Parts | None:
    """Apply a batch-dim operation (beam reorder, repeat, select) to every part."""
    if parts is None:
        return None
    return {name: fn(tensor) for name, tensor in parts.items()}


def parts_nbytes(parts: Parts | None) -> int:
    """Bytes held by the parts' tensors (what the storage really costs)."""
    if parts is None:
        return 0
    return sum(t.numel() * t.element_size() for t in parts.values())
