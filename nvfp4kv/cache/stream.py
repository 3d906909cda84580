"""One layer's K (or V) as actually stored: sink | packed tokens | pending full-precision tokens.

Token order along the sequence is always::

    [ sink: first ``sink_tokens``, full precision ]
    [ packed: the format's parts (uint8 codes, scale bytes) + global scale ]
    [ pending: the newest ``residual_length`` tokens, plus any tokens waiting for a full
      ``token_group`` (KIVI per-channel keys), full precision ]

A token moves from *pending* to *packed* once it has left the residual window and a whole
token group is available; it is quantized exactly once and its codes never change afterwards
(new tokens are concatenated, nothing is re-encoded). The stream owns the global-scale policy
(``prefill`` freezes it at the first write, ``dynamic`` records one per write, ``static`` is
given) because the format itself is stateless.

Every write rebinds attributes to new tensors and never changes a stored token's bytes in
place: the growing tensors (parts, the dynamic scale record, the fast path's dequantized copy)
live in preallocated buffers with spare capacity (:func:`~nvfp4kv.cache.parts.append_tokens`,
doubling), and an append writes only past the used length, then rebinds the attribute to the
longer view; sink and pending (bounded by the windows) are concatenated. So a step costs
O(new tokens), not O(context), and :meth:`PackedStream.snapshot` /
:meth:`PackedStream.restore` can still undo a failed write exactly (an atomic update): the old
views keep their bytes. Stored bytes are counted by used length (``nbytes``); a buffer's spare
capacity (at most as much again) is not storage the format needs.
"""

from __future__ import annotations

import math

import torch

from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.cache.parts import append_parts, append_tokens, map_parts, parts_nbytes, slice_parts
from nvfp4kv.errors import NVFP4KVError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.formats.numerics import saturating_cast
from nvfp4kv.kernels.backend import KernelBackend


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Append along tokens; the result never aliases a caller's tensor (honest nbytes)."""
    return new.clone() if old is None else torch.cat([old, new.to(old.dtype)], dim=2)


def _ntok(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.shape[2]


class PackedStream:
    """K or V of one layer, stored packed per ``fmt`` with full-precision sink/residual windows.

    ``static_scale`` (FP32, broadcastable to ``[B, H, T, 1]``) is required for the ``static``
    policy and ignored otherwise; formats without a global scale ignore every policy.
    ``keep_dequantized`` enables the CPU fast path: the dequantized values of packed tokens are
    kept (decoded once, when the tokens are packed) instead of decoding all parts on every read.
    """

    def __init__(
        self,
        fmt: KVFormat,
        codec: KernelBackend,
        *,
        label: str,
        sink_tokens: int = 0,
        residual_length: int = 0,
        scale_policy: str = "prefill",
        static_scale: torch.Tensor | None = None,
        keep_dequantized: bool = False,
        frozen_scales: FrozenScales | None = None,
        scale_divisor: float | None = None,
    ) -> None:
        if scale_policy in ("static", "checkpoint") and fmt.uses_global_scale and static_scale is None:
            raise ValueError(f"{label}: the {scale_policy} scale policy needs a scale")
        self.fmt = fmt
        self.codec = codec
        self.label = label
        self.sink_tokens = sink_tokens
        self.residual_length = residual_length
        self.scale_policy = scale_policy
        self.keep_dequantized = keep_dequantized
        self._static_scale = static_scale.float() if static_scale is not None else None
        #: first_batch: the store shared by every cache of one evaluation (own store if none given)
        self._frozen = frozen_scales if frozen_scales is not None else FrozenScales()
        #: first_batch: amax divisor of the engine being reproduced (None: the format's own scale)
        self._scale_divisor = scale_divisor
        self.reset()

    def reset(self) -> None:
        """Drop every stored token (and a prefill-frozen scale)."""
        self.dtype: torch.dtype | None = None
        self.sink: torch.Tensor | None = None
        self.parts: Parts | None = None
        self.n_packed = 0
        self.pending: torch.Tensor | None = None
        #: frozen global scale (prefill/static), FP32
        self.scale: torch.Tensor | None = None
        #: dynamic policy: the global scale of every packed token row, FP32 ``[b, h, n_packed, 1]``
        self.scale_record: torch.Tensor | None = None
        #: fast path: dequantized packed tokens ``[B, H, n_packed, D]``
        self.dequantized: torch.Tensor | None = None
        #: preallocated buffers behind parts / scale_record / dequantized (see append_tokens)
        self._buffers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ transactions
    def snapshot(self) -> dict[str, object]:
        """Everything a write can change (references only: stored tensors are never mutated
        in place, so holding the old references keeps the old bytes)."""
        state = dict(vars(self))
        state["parts"] = dict(self.parts) if self.parts is not None else None
        state["_buffers"] = dict(self._buffers)
        return state

    def restore(self, state: dict[str, object]) -> None:
        """Undo every change since :meth:`snapshot` returned ``state``."""
        vars(self).clear()
        vars(self).update(state)

    def stored_example(self) -> torch.Tensor | None:
        """Any stored token-wise tensor (for batch/head/device checks), or None when empty."""
        for t in (self.sink, self.pending, self.dequantized):
            if t is not None:
                return t
        return next(iter(self.parts.values())) if self.parts else None

    # ------------------------------------------------------------------ sizes
    @property
    def n_sink(self) -> int:
        return _ntok(self.sink)

    @property
    def n_pending(self) -> int:
        return _ntok(self.pending)

    @property
    def n_tokens(self) -> int:
        return self.n_sink + self.n_packed + self.n_pending

    # ------------------------------------------------------------------ writing
    def append(self, x: torch.Tensor) -> None:
        """Store new tokens ``x`` ``[B, H, t, D]``; packs whatever has left the residual window."""
        if self.dtype is None:
            self.dtype = x.dtype
        take = min(max(self.sink_tokens - self.n_sink, 0), x.shape[2])
        if take:
            self.sink = _cat(self.sink, x[:, :, :take])
            x = x[:, :, take:]
        if x.shape[2] == 0:
            return
        if self.fmt.uses_global_scale and self.scale is None:
            self.scale = self._frozen_scale(x)
        self.pending = _cat(self.pending, x)
        self._pack_ready()

    def _frozen_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale a non-dynamic policy fixes at the first write ``x`` (None: dynamic)."""
        policy = self.scale_policy
        if policy == "prefill":
            return self._computed_scale(x)
        if policy in ("static", "checkpoint"):
            return self._static_scale.to(x.device)  # type: ignore[union-attr]
        if policy == "unit":
            return torch.ones(1, 1, 1, 1, dtype=torch.float32, device=x.device)
        if policy == "first_batch":
            frozen = self._frozen.get(self.label)
            if frozen is None:
                if self._scale_divisor is None:
                    scale = self._computed_scale(x)
                else:  # the engine's constant: one per-tensor scale amax / divisor
                    amax = torch.nan_to_num(x.detach().float().abs(), nan=0.0, posinf=0.0).amax()
                    scale = (amax / self._scale_divisor).reshape(1, 1, 1, 1)
                    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                frozen = self._frozen.freeze(self.label, scale)
            return frozen.to(x.device)
        return None

    def _pack_ready(self) -> None:
        group = self.fmt.token_group
        ready = self.n_pending - self.residual_length
        n = (ready // group) * group if ready > 0 else 0
        if n == 0:
            return
        assert self.pending is not None
        chunk = self.pending[:, :, :n]
        self.pending = self.pending[:, :, n:].clone() if n < self.n_pending else None
        self._pack(chunk)

    def _pack(self, chunk: torch.Tensor) -> None:
        n = chunk.shape[2]
        if self.scale_policy == "dynamic" and self.fmt.uses_global_scale:
            scale = self._computed_scale(chunk)
            record = scale.expand(scale.shape[0], scale.shape[1], n, 1)
            self.scale_record = append_tokens(self._buffers, "scale_record", self.scale_record, record)
            read_scale = self.scale_record[:, :, self.n_packed :]
        else:
            scale = read_scale = self.scale
        try:
            new_parts = self.codec.quantize(self.fmt, chunk, scale)
        except NVFP4KVError as err:
            raise type(err)(f"{self.label}: {err}") from err
        self.parts = append_parts(self._buffers, self.parts, new_parts)
        self.n_packed += n
        if self.keep_dequantized:
            decoded = self.codec.dequantize(self.fmt, new_parts, read_scale, self.dtype or chunk.dtype)
            self.dequantized = append_tokens(self._buffers, "dequantized", self.dequantized, decoded)

    def _computed_scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fmt.global_scale(x)
        if scale is None:
            raise TypeError(f"{self.label}: format {self.fmt.name!r} uses a global scale but global_scale() returned None")
        scale = scale.float()
        # per tensor [1,1,1,1] or per head [1,H,1,1]; anything else is reshaped to that form
        return scale if scale.dim() == 4 and scale.shape[2:] == (1, 1) else scale.reshape(1, -1, 1, 1)

    # ------------------------------------------------------------------ reading
    def read(self, dtype: torch.dtype, upto: int | None = None) -> torch.Tensor:
        """The stored tokens ``[0, upto)`` (all when ``None``), dequantized to ``dtype``."""
        upto = self.n_tokens if upto is None else upto
        pieces = []
        s = min(upto, self.n_sink)
        if s:
            pieces.append(self.sink[:, :, :s])  # type: ignore[index]
        q = min(max(upto - self.n_sink, 0), self.n_packed)
        if q:
            pieces.append(self._decoded_prefix(q, dtype))
        p = max(upto - self.n_sink - self.n_packed, 0)
        if p:
            pieces.append(self.pending[:, :, :p])  # type: ignore[index]
        pieces = [saturating_cast(t, dtype) for t in pieces]  # finite in, finite out
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            raise ValueError(f"{self.label}: nothing stored to read")
        return torch.cat(pieces, dim=2)

    def _decoded_prefix(self, q: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``q`` packed tokens, dequantized (whole groups decoded, then cut)."""
        if self.dequantized is not None:
            return self.dequantized[:, :, :q]
        assert self.parts is not None
        group = self.fmt.token_group
        aligned = min(math.ceil(q / group) * group, self.n_packed)
        parts = self.parts if aligned == self.n_packed else slice_parts(self.parts, 0, aligned, self.n_packed)
        out = self.codec.dequantize(self.fmt, parts, self.read_scale(0, aligned), dtype)
        return out if aligned == q else out[:, :, :q]

    def read_scale(self, start: int, stop: int) -> torch.Tensor | None:
        """FP32 global scale of packed tokens ``[start, stop)`` (None for formats without one):
        the frozen scale, or that slice of the per-write record (dynamic policy)."""
        if self.scale_record is not None:
            return self.scale_record[:, :, start:stop]
        return self.scale

    # ------------------------------------------------------------------ editing
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``tokens_to_remove`` tokens.

        Pending and sink tokens are cut exactly. Packed tokens are cut on token-group
        boundaries: when the cut falls inside a group (``token_group > 1``, KIVI keys), the
        group's surviving tokens are dequantized (the values attention saw) and moved back to
        the pending buffer, so they will be quantized a second time when the group fills up
        again. That is why such layers do not advertise ``is_croppable``. When everything is
        removed, a prefill-frozen scale is dropped too (the next write is a new prefill).
        """
        keep = max(self.n_tokens - tokens_to_remove, 0)
        in_pending = keep - self.n_sink - self.n_packed
        if in_pending >= 0:
            self.pending = self.pending[:, :, :in_pending].clone() if in_pending else None  # type: ignore[index]
            return
        self.pending = None
        keep_packed = max(keep - self.n_sink, 0)
        if keep_packed < self.n_packed:
            self._crop_packed(keep_packed)
        if keep < self.n_sink:
            self.sink = self.sink[:, :, :keep].clone() if keep else None  # type: ignore[index]
        if self.n_tokens == 0 and self.scale_policy == "prefill":
            self.scale = None

    def _crop_packed(self, keep: int) -> None:
        group = self.fmt.token_group
        whole = (keep // group) * group
        orphans = None
        if keep > whole:  # a group is cut: decode its survivors back to full precision
            group_parts = slice_parts(self.parts, whole, whole + group, self.n_packed)  # type: ignore[arg-type]
            decoded = self.codec.dequantize(self.fmt, group_parts, self.read_scale(whole, whole + group), self.dtype)  # type: ignore[arg-type]
            orphans = decoded[:, :, : keep - whole].clone()
        if whole:
            self.parts = {k: v.clone() for k, v in slice_parts(self.parts, 0, whole, self.n_packed).items()}  # type: ignore[arg-type]
            if self.scale_record is not None:
                self.scale_record = self.scale_record[:, :, :whole].clone()
            if self.dequantized is not None:
                self.dequantized = self.dequantized[:, :, :whole].clone()
        else:
            self.parts = self.scale_record = self.dequantized = None
        self.n_packed = whole
        self.pending = orphans

    def map_batch(self, fn) -> None:
        """Apply a batch-dim operation (beam reorder, repeat, select) to everything stored."""
        self.sink = fn(self.sink) if self.sink is not None else None
        self.pending = fn(self.pending) if self.pending is not None else None
        self.dequantized = fn(self.dequantized) if self.dequantized is not None else None
        self.parts = map_parts(self.parts, fn)
        # scales are shared by the whole batch unless a format made them per batch row
        if self.scale is not None and self.scale.shape[0] > 1:
            self.scale = fn(self.scale)
        if self.scale_record is not None and self.scale_record.shape[0] > 1:
            self.scale_record = fn(self.scale_record)

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of storage held: parts, global scales, sink and pending (not the fast path)."""
        total = parts_nbytes(self.parts)
        for t in (self.sink, self.pending, self.scale, self.scale_record):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def packed_nbytes(self) -> int:
        """Bytes of the format's parts alone (codes + block scales)."""
        return parts_nbytes(self.parts)

    def reserved_nbytes(self) -> int:
        """Bytes allocated ahead in the growth buffers (capacity not yet holding tokens).

        Why report it: appends write into buffers that double when full, so the process holds up
        to twice the used bytes between doublings; ``nbytes`` counts what the format stores, this
        counts what the allocator holds on top, so neither number hides the other.
        """
        views = [*(self.parts or {}).values(), self.scale_record, self.dequantized]
        in_use = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in views if t is not None}
        return sum(buf.numel() * buf.element_size() - in_use.get(buf.untyped_storage().data_ptr(), 0)
                   for buf in self._buffers.values())

    def fastpath_nbytes(self) -> int:
        """Extra bytes held by the CPU fast path (dequantized copies of packed tokens)."""
        t = self.dequantized
        return 0 if t is None else t.numel() * t.element_size()
