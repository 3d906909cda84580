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

Batches are stored so that a row's codes do not depend on its neighbours or on its padding
(:meth:`PackedStream.set_padding` gives each row's number of *left* pad tokens; the layer has
already zeroed them):

- Global scales computed from the data (``prefill``, ``dynamic``) are computed **per row**, from
  that row's real tokens only (``[B, 1, 1, 1]`` or ``[B, H, 1, 1]``): exactly what the row would
  get alone. ``first_batch`` is batch-wide by definition (one scale from the real tokens of every
  row of the first forward). ``static``/``checkpoint``/``unit`` scales are constants.
- Token-wise formats without a sink (the common case) keep one batched layout: pad tokens are
  stored (as zeros) at the positions they hold, the residual window is the newest tokens of every
  row alike, and a token's codes depend only on its own values and its row's scale.
- Where the layout itself would couple a row to its padding (a sink window, which must hold each
  row's *first real* tokens, or a ``token_group > 1`` format, whose groups must start at each row's
  first real token), a padded batch is stored **row by row**: one child stream per row receiving
  only that row's real tokens, i.e. exactly the stream the row would have alone. Reads put each
  row back at its padded positions (zeros at pads). Slower (a loop over rows), exact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.cache.parts import append_parts, append_tokens, map_parts, parts_nbytes, slice_parts
from nvfp4kv.errors import NVFP4KVError
from nvfp4kv.formats.base import KVFormat, Parts, StepEncoder
from nvfp4kv.formats.numerics import finite_abs, saturating_cast
from nvfp4kv.kernels.backend import KernelBackend, TorchBackend


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

    def set_padding(self, pads: Sequence[int] | None) -> None:
        """Row ``b`` of the coming writes starts with ``pads[b]`` pad tokens (left padding).

        Call on an empty stream, before the first write. Pad positions are kept out of every
        data-derived scale and out of sink windows and token groups (see the module docstring);
        ``None`` or all zeros: no padding.
        """
        if self.n_tokens:
            raise ValueError(f"{self.label}: set_padding must be called before the first write")
        pads = tuple(int(p) for p in pads) if pads is not None else ()
        if any(p < 0 for p in pads):
            raise ValueError(f"{self.label}: pad lengths must be >= 0, got {list(pads)}")
        self.pads: tuple[int, ...] | None = pads if any(pads) else None

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
        #: left pad tokens per batch row (None: none); see set_padding
        self.pads: tuple[int, ...] | None = None
        #: a padded batch stored row by row: one child stream per row (None: batched layout)
        self._rows: list[PackedStream] | None = None
        #: row-by-row storage: tokens stored, pads included (the batched layout's n_tokens)
        self._row_total = 0
        #: append_pair's derived constants: (k scale, v scale, stacked scale, step encoder)
        self._pair_cache: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                StepEncoder | None] | None = None

    # ------------------------------------------------------------------ transactions
    def snapshot(self) -> dict[str, object]:
        """Everything a write can change (references only: stored tensors are never mutated
        in place, so holding the old references keeps the old bytes)."""
        state = dict(vars(self))
        state["parts"] = dict(self.parts) if self.parts is not None else None
        state["_buffers"] = dict(self._buffers)
        if self._rows is not None:
            state["_rows"] = list(self._rows)
            state["_row_states"] = [row.snapshot() for row in self._rows]
        return state

    def restore(self, state: dict[str, object]) -> None:
        """Undo every change since :meth:`snapshot` returned ``state``."""
        state = dict(state)
        row_states = state.pop("_row_states", None)
        vars(self).clear()
        vars(self).update(state)
        if row_states is not None:
            for row, row_state in zip(self._rows, row_states):  # type: ignore[arg-type]
                row.restore(row_state)

    def stored_example(self) -> torch.Tensor | None:
        """Any stored token-wise tensor (for batch/head/device checks), or None when empty."""
        if self._rows is not None:
            return self._row_like.expand(len(self._rows), *self._row_like.shape[1:])
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
        if self._rows is not None:
            return self._row_total
        return self.n_sink + self.n_packed + self.n_pending

    @property
    def row_by_row(self) -> bool:
        """Whether this (padded) batch is stored row by row (see the module docstring)."""
        return self._rows is not None

    # ------------------------------------------------------------------ writing
    def append(self, x: torch.Tensor) -> None:
        """Store new tokens ``x`` ``[B, H, t, D]``; packs whatever has left the residual window."""
        if self.dtype is None:
            self.dtype = x.dtype
        if self._rows is None and self.n_tokens == 0 and self.pads is not None and (
                self.sink_tokens > 0 or self.fmt.token_group > 1):
            self._start_rows(x)
        if self._rows is not None:
            self._append_rows(x)
            return
        take = min(max(self.sink_tokens - self.n_sink, 0), x.shape[2])
        if take:
            self.sink = _cat(self.sink, x[:, :, :take])
            x = x[:, :, take:]
        if x.shape[2] == 0:
            return
        if self.fmt.uses_global_scale and self.scale is None:
            self.scale = self._frozen_scale(x, self.n_tokens)
        if self.pending is None and self._ready(x.shape[2]) == x.shape[2]:
            # everything leaves the window at once (no residual window, whole groups: every
            # decode step of the common case): pack x itself, no pending copy in between
            self._pack(x)
            return
        self.pending = _cat(self.pending, x)
        self._pack_ready()

    # ------------------------------------------------------------------ rows
    def _real_rows(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Each row's real (non-pad) tokens of ``x``, whose first token is at position ``start``."""
        pads = self.pads or (0,) * x.shape[0]
        if len(pads) != x.shape[0]:
            raise ValueError(f"{self.label}: set_padding gave {len(pads)} rows but the batch has {x.shape[0]}")
        return [x[b : b + 1, :, max(pad - start, 0):] for b, pad in enumerate(pads)]

    def _row_scales(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Per-row global scale of ``x`` (tokens from position ``start``), each from that row's
        real tokens alone: ``[B, 1, 1, 1]`` or ``[B, H, 1, 1]`` (``[1, ...]`` for one row). A row
        with no real token here gets the scale of zeros (it scales only pads)."""
        if x.shape[0] == 1 and self.pads is None:
            return self._computed_scale(x)
        scales = [self._computed_scale(real if real.shape[2] else torch.zeros_like(x[:1, :, :1]))
                  for real in self._real_rows(x, start)]
        return torch.cat(scales, dim=0)

    def _batch_real(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The real tokens of every row of ``x`` as one ``[1, H, n, D]`` tensor (batch-wide amax)."""
        if x.shape[0] == 1 and self.pads is None:
            return x
        real = torch.cat([r.reshape(1, r.shape[1], -1, r.shape[3]) for r in self._real_rows(x, start)], dim=2)
        return real if real.shape[2] else torch.zeros_like(x[:1, :, :1])

    def _child(self) -> PackedStream:
        return PackedStream(self.fmt, self.codec, label=self.label, sink_tokens=self.sink_tokens,
                            residual_length=self.residual_length, scale_policy=self.scale_policy,
                            static_scale=self._static_scale, keep_dequantized=self.keep_dequantized,
                            frozen_scales=self._frozen, scale_divisor=self._scale_divisor)

    def _start_rows(self, x: torch.Tensor) -> None:
        """Switch this padded batch to row-by-row storage (before its first write)."""
        self._rows = [self._child() for _ in range(x.shape[0])]
        self._row_total = 0
        self._row_like = x[:1, :, :0]  # heads, head_dim, device of the rows (no data)
        if self.scale_policy == "first_batch" and self.fmt.uses_global_scale and self._frozen.get(self.label) is None:
            # batch-wide by definition: the real tokens past each row's sink, of every row
            pads = self.pads or (0,) * x.shape[0]
            real = [x[b : b + 1, :, pad + self.sink_tokens:] for b, pad in enumerate(pads)]
            real = [r for r in real if r.shape[2]]
            if real:
                self._frozen_scale(torch.cat(real, dim=2), 0, batch_real=False)

    def _append_rows(self, x: torch.Tensor) -> None:
        assert self._rows is not None
        for row, real in zip(self._rows, self._real_rows(x, self._row_total)):
            if real.shape[2]:
                row.append(real)
        self._row_total += x.shape[2]

    def _read_rows(self, dtype: torch.dtype, upto: int) -> torch.Tensor:
        """Every row's stored tokens ``[0, upto)`` at their padded positions (zeros at pads)."""
        assert self._rows is not None
        pads = self.pads or (0,) * len(self._rows)
        like = self._row_like
        out = torch.zeros((len(self._rows), like.shape[1], upto, like.shape[3]), dtype=dtype, device=like.device)
        for b, (row, pad) in enumerate(zip(self._rows, pads)):
            if upto > pad and row.n_tokens:
                out[b : b + 1, :, pad:upto] = row.read(dtype, upto=upto - pad)
        return out

    # ------------------------------------------------------------------ scales
    def _frozen_scale(self, x: torch.Tensor, start: int, batch_real: bool = True) -> torch.Tensor | None:
        """The scale a non-dynamic policy fixes at the first write ``x`` (tokens from position
        ``start``; None: dynamic). ``prefill``: per row; ``first_batch``: batch-wide."""
        policy = self.scale_policy
        if policy == "prefill":
            if self.pads is not None and any(r.shape[2] == 0 for r in self._real_rows(x, start)):
                raise ValueError(
                    f"{self.label}: a row's first write holds only padding, so the prefill scale of that "
                    f"row is undefined; write each prompt's tokens in the first update (one prefill)."
                )
            return self._row_scales(x, start)
        if policy in ("static", "checkpoint"):
            return self._static_scale.to(x.device)  # type: ignore[union-attr]
        if policy == "unit":
            return torch.ones(1, 1, 1, 1, dtype=torch.float32, device=x.device)
        if policy == "first_batch":
            frozen = self._frozen.get(self.label)
            if frozen is None:
                if batch_real:  # batch-wide by definition: the real tokens of every row
                    x = self._batch_real(x, start)
                if self._scale_divisor is None:
                    scale = self._computed_scale(x)
                else:  # the engine's constant: one per-tensor scale amax / divisor
                    amax = finite_abs(x.detach()).amax()
                    scale = (amax / self._scale_divisor).reshape(1, 1, 1, 1)
                    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                frozen = self._frozen.freeze(self.label, scale)
            return frozen.to(x.device)
        return None

    def _ready(self, pending: int) -> int:
        """How many of ``pending`` tokens waiting in full precision are packed now: those past
        the residual window, in whole token groups."""
        group = self.fmt.token_group
        ready = pending - self.residual_length
        return (ready // group) * group if ready > 0 else 0

    def _pack_ready(self) -> None:
        n = self._ready(self.n_pending)
        if n == 0:
            return
        assert self.pending is not None
        chunk = self.pending[:, :, :n]
        self.pending = self.pending[:, :, n:].clone() if n < self.n_pending else None
        self._pack(chunk)

    def _pack(self, chunk: torch.Tensor) -> None:
        n = chunk.shape[2]
        if self.scale_policy == "dynamic" and self.fmt.uses_global_scale:
            scale = self._row_scales(chunk, self.n_sink + self.n_packed)
            record = scale.expand(scale.shape[0], scale.shape[1], n, 1)
            self.scale_record = append_tokens(self._buffers, "scale_record", self.scale_record, record)
            read_scale = self.scale_record[:, :, self.n_packed :]
        else:
            scale = read_scale = self.scale
        try:
            new_parts = self.codec.quantize(self.fmt, chunk, scale)
        except NVFP4KVError as err:
            raise type(err)(f"{self.label}: {err}") from err
        decoded = None
        if self.keep_dequantized:
            decoded = self.codec.dequantize(self.fmt, new_parts, read_scale, self.dtype or chunk.dtype)
        self._commit(new_parts, decoded, n)

    def _commit(self, new_parts: Parts, decoded: torch.Tensor | None, n: int) -> None:
        """Append ``n`` freshly packed tokens (and, on the fast path, their decoded values)."""
        self.parts = append_parts(self._buffers, self.parts, new_parts)
        self.n_packed += n
        if decoded is not None:
            self.dequantized = append_tokens(self._buffers, "dequantized", self.dequantized, decoded)

    def _packs_whole(self, x: torch.Tensor) -> bool:
        """Whether :meth:`append` of ``x`` would pack all of it at once with a frozen scale (no
        sink still filling, nothing pending, no residual window left to fill, whole groups, a
        batched layout): the decode steps :func:`append_pair` may encode together."""
        return (
            self._rows is None and self.n_tokens > 0 and self.pending is None
            and self.n_sink >= self.sink_tokens and self.dtype == x.dtype
            and self._ready(x.shape[2]) == x.shape[2]
            and (not self.fmt.uses_global_scale or (self.scale is not None and self.scale_policy != "dynamic"))
        )

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
        if self._rows is not None:
            return self._read_rows(dtype, self.n_tokens if upto is None else upto)
        if (upto is None and self.dequantized is not None and self.sink is None and self.pending is None
                and self.dequantized.dtype == dtype):
            return self.dequantized  # the fast path's whole store (a decode step's common read)
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
        if self._rows is not None:
            for row in self._rows:
                row.crop(min(tokens_to_remove, row.n_tokens))
            self._row_total = max(self._row_total - tokens_to_remove, 0)
            return
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
        """Apply a batch-dim operation (beam reorder, repeat, select) to everything stored:
        tokens, per-row scales, the padding, and (row-by-row storage) the rows themselves."""
        example = self.stored_example()
        batch = None if example is None else example.shape[0]
        if batch is not None:
            rows = fn(torch.arange(batch)).tolist()  # which old row each new row is
            if self.pads is not None:
                self.pads = tuple(self.pads[i] for i in rows)
            if self._rows is not None:
                self._rows = [self._rows[i].clone() for i in rows]
                return
        self.sink = fn(self.sink) if self.sink is not None else None
        self.pending = fn(self.pending) if self.pending is not None else None
        self.dequantized = fn(self.dequantized) if self.dequantized is not None else None
        self.parts = map_parts(self.parts, fn)
        # per-row scales follow their rows; a [1, ...] scale shared by a larger batch stays shared
        if self.scale is not None and self.scale.shape[0] == batch:
            self.scale = fn(self.scale)
        if self.scale_record is not None and self.scale_record.shape[0] == batch:
            self.scale_record = fn(self.scale_record)

    def clone(self) -> PackedStream:
        """An independent copy sharing only immutable things (format, codec, the first_batch
        store): stored tensors are never written in place, and the copy gets its own buffers."""
        new = copy.copy(self)
        new.parts = dict(self.parts) if self.parts is not None else None
        new._buffers = {}
        if self._rows is not None:
            new._rows = [row.clone() for row in self._rows]
        return new

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of storage held: parts, global scales, sink and pending (not the fast path)."""
        if self._rows is not None:
            return sum(row.nbytes() for row in self._rows)
        total = parts_nbytes(self.parts)
        for t in (self.sink, self.pending, self.scale, self.scale_record):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def packed_nbytes(self) -> int:
        """Bytes of the format's parts alone (codes + block scales)."""
        if self._rows is not None:
            return sum(row.packed_nbytes() for row in self._rows)
        return parts_nbytes(self.parts)

    def reserved_nbytes(self) -> int:
        """Bytes allocated ahead in the growth buffers (capacity not yet holding tokens).

        Why report it: appends write into buffers that double when full, so the process holds up
        to twice the used bytes between doublings; ``nbytes`` counts what the format stores, this
        counts what the allocator holds on top, so neither number hides the other.
        """
        if self._rows is not None:
            return sum(row.reserved_nbytes() for row in self._rows)
        views = [*(self.parts or {}).values(), self.scale_record, self.dequantized]
        in_use = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in views if t is not None}
        return sum(buf.numel() * buf.element_size() - in_use.get(buf.untyped_storage().data_ptr(), 0)
                   for buf in self._buffers.values())

    def fastpath_nbytes(self) -> int:
        """Extra bytes held by the CPU fast path (dequantized copies of packed tokens)."""
        if self._rows is not None:
            return sum(row.fastpath_nbytes() for row in self._rows)
        t = self.dequantized
        return 0 if t is None else t.numel() * t.element_size()


def pair_ready(k_stream: PackedStream, v_stream: PackedStream, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`append_pair` may encode ``k`` and ``v`` together (pure Python, no tensor op):
    a :attr:`~nvfp4kv.formats.base.KVFormat.rowwise` format shared by both streams, the reference
    backend, equal shapes and dtypes, and writes that both streams pack whole with frozen scales
    (:meth:`PackedStream._packs_whole`: every decode step of the common configuration)."""
    ks, vs = k_stream, v_stream
    fmt = ks.fmt
    return bool(type(fmt).rowwise and fmt == vs.fmt and type(ks.codec) is TorchBackend and vs.codec is ks.codec
                and ks.keep_dequantized == vs.keep_dequantized and k.shape == v.shape and k.dtype == v.dtype
                and ks._packs_whole(k) and vs._packs_whole(v))


def _pair_scale(ks: PackedStream, vs: PackedStream) -> tuple[bool, torch.Tensor | None, StepEncoder | None]:
    """``(ok, stacked global scale or None, step encoder or None)`` for a pair of streams.

    Why cached: the frozen scales never change in place (a write rebinds, never mutates), so
    the stacked ``[2, ...]`` scale and the format's :meth:`~nvfp4kv.formats.base.KVFormat.step_encoder`
    built from it are derived once per pair of scale tensors, not on every decode step. The
    cache lives on the K stream, keyed by the identity of both scale tensors. ``ok`` is False
    when the two scales cannot be stacked (different shapes or devices).
    """
    sk, sv = ks.scale, vs.scale
    cached = ks._pair_cache
    if cached is not None and cached[0] is sk and cached[1] is sv:
        return True, cached[2], cached[3]
    scale = None
    if ks.fmt.uses_global_scale:
        if sk.shape != sv.shape or sk.device != sv.device:  # type: ignore[union-attr]
            return False, None, None
        scale = torch.stack([sk, sv])  # type: ignore[list-item]
    encoder = ks.fmt.step_encoder(scale)
    ks._pair_cache = (sk, sv, scale, encoder)
    return True, scale, encoder


def append_pair(k_stream: PackedStream, v_stream: PackedStream, k: torch.Tensor, v: torch.Tensor,
                stacked: torch.Tensor | None = None) -> bool:
    """Store ``k`` in ``k_stream`` and ``v`` in ``v_stream`` with *one* encode (and one decode,
    on the fast path) of both, stacked as ``[2, B, H, t, D]``; False (nothing done) when the pair
    does not qualify (:func:`pair_ready`), and the caller appends each on its own.

    Same bytes as two :meth:`PackedStream.append` calls: it is used only for a rowwise format
    (every row encoded on its own, the global scales stacked alongside), the reference backend,
    and writes that both streams pack whole with frozen scales. Halving the tensor ops of a
    one-token step is what it is for. If the encode raises, nothing is stored and False is
    returned, so the separate appends raise the error naming K or V.

    ``stacked``: ``torch.stack([k, v])`` from a caller that has checked :func:`pair_ready` and
    applied the NaN/Inf policy (so K and V are finite); the format's step encoder
    (:meth:`~nvfp4kv.formats.base.KVFormat.step_encoder`, the same bits in fewer ops, without
    re-checking) may then encode it. Without it, the format's own quantize/dequantize run.
    """
    ks, vs = k_stream, v_stream
    fmt = ks.fmt
    finite = stacked is not None
    if stacked is None:
        if not pair_ready(ks, vs, k, v):
            return False
        stacked = torch.stack([k, v])
    ok, scale, encoder = _pair_scale(ks, vs)
    if not ok:
        return False
    try:
        if finite and encoder is not None:
            parts, decoded = encoder(stacked, ks.dtype if ks.keep_dequantized else None)
        else:
            parts = ks.codec.quantize(fmt, stacked, scale)
            decoded = ks.codec.dequantize(fmt, parts, scale, ks.dtype) if ks.keep_dequantized else None  # type: ignore[arg-type]
    except NVFP4KVError:
        return False
    split = {name: part.unbind(0) for name, part in parts.items()}
    halves = (None, None) if decoded is None else decoded.unbind(0)
    n = stacked.shape[3]
    for i, stream in enumerate((ks, vs)):
        stream._commit({name: pair[i] for name, pair in split.items()}, halves[i], n)
    return True
