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


def _is_prefix_of(view: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """Whether ``view`` is ``buf[:, :, :n]`` for some ``n`` (same storage start and strides)."""
    return (
        buf is not None
        and view.dtype == buf.dtype
        and view.device == buf.device
        and view.data_ptr() == buf.data_ptr()
        and view.stride() == buf.stride()
        and view.shape[:2] == buf.shape[:2]
        and view.shape[3:] == buf.shape[3:]
        and view.shape[2] <= buf.shape[2]
    )


def append_tokens(buffers: dict[str, torch.Tensor], key: str, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``old`` followed by ``new`` (cast to ``old``'s dtype) along dim 2, without re-copying ``old``.

    ``buffers[key]`` is a preallocated buffer with spare capacity along the token axis (grown by
    doubling, so an append costs O(new tokens) amortized); the result is the view of its used
    tokens, with the same values as ``torch.cat([old, new], dim=2)``. Only bytes past ``old``'s
    end are written, so any earlier view (a snapshot, a tensor handed to attention) keeps its
    values. When ``old`` is not a prefix view of ``buffers[key]`` (first write, after a crop, a
    batch reorder or a restore to an older buffer), a new buffer is allocated.
    """
    if old is None:
        buf = torch.empty(new.shape, dtype=new.dtype, device=new.device)
        buf.copy_(new)
        buffers[key] = buf
        return buf
    n, t = old.shape[2], new.shape[2]
    buf = buffers.get(key)
    if not _is_prefix_of(old, buf) or n + t > buf.shape[2]:  # type: ignore[union-attr]
        shape = (*old.shape[:2], max(n + t, 2 * n), *old.shape[3:])
        buf = torch.empty(shape, dtype=old.dtype, device=old.device)
        buf[:, :, :n].copy_(old)
        buffers[key] = buf
    buf.narrow(2, n, t).copy_(new)  # copy_ casts to the buffer's dtype
    return buf.narrow(2, 0, n + t)


def append_parts(buffers: dict[str, torch.Tensor], old: Parts | None, new: Parts) -> Parts:
    """:func:`cat_parts` with :func:`append_tokens` (the same values, no re-copy of ``old``)."""
    if old is not None and old.keys() != new.keys():
        raise ValueError(f"parts disagree: {sorted(old)} vs {sorted(new)}")
    return {name: append_tokens(buffers, f"parts.{name}", None if old is None else old[name], t)
            for name, t in new.items()}


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
