"""``PackedKVLayer``: one attention layer's K/V cache, stored packed, under transformers' layer contract.

It subclasses :class:`transformers.cache_utils.DynamicLayer` so that everything transformers
asks of a layer (mask sizes, ``get_seq_length``, beam reordering, crop, batch repeat/select)
works, but keeps K and V in two :class:`~nvfp4kv.cache.stream.PackedStream` objects instead of
``self.keys`` / ``self.values`` (which stay empty). ``update`` returns K/V in the dtype of the
incoming states (the query's dtype: SDPA and eager attention reject mixed or FP8 inputs), and
which tokens come back dequantized is the config's ``read_mode``
(see :class:`~nvfp4kv.cache.config.KVCacheConfig`).

Fused decode (``attn_implementation="nvfp4kv_decode"``): every ``update`` publishes one
:class:`~nvfp4kv.kernels.packed_view.PackedKVHandoff` in the attention kwargs transformers
forwards to ``cache.update`` (the one channel, documented in :mod:`nvfp4kv.kernels.packed_view`).
That attention function *accepts* it when it could run the fused kernel; on the next decode
step the layer then returns zero-memory stand-ins and hands over its
:meth:`PackedKVLayer.packed_view` instead of dequantizing its whole history, so the kernel
reads the packed bytes directly. Any other attention function never accepts, and gets real K/V.

``update`` is atomic (nothing changes unless K and V are both stored) and applies the NaN/Inf
policy to the incoming K/V before any path reads them, the raw prefill chunk included (see
:mod:`nvfp4kv.cache.checks`).

Padded batches (:meth:`PackedKVLayer.set_padding`, from
:meth:`~nvfp4kv.cache.QuantizedKVCache.set_padding`): the K/V at a row's left pad positions are
replaced by zeros before anything else sees them (so whatever the model computed there, NaN from
a fully masked pad query included, never reaches a check, a scale or a read), and the streams
keep pads out of scales, sinks and token groups (:mod:`nvfp4kv.cache.stream`). Attention still
gets K/V at every position, pads included, as transformers' masks expect; the mask hides them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from nvfp4kv.cache.checks import (
    check_against_stored,
    check_kv_states,
    map_nonfinite_write,
    raise_if_nonfinite,
)
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.cache.k_center import center_keys, key_offset
from nvfp4kv.cache.stream import PackedStream, append_pair, pair_ready
from nvfp4kv.errors import BlockSizeError, KVStateError
from nvfp4kv.formats.base import KVFormat, normalize_nonfinite
from nvfp4kv.formats.numerics import has_nonfinite
from nvfp4kv.kernels.backend import KernelBackend, TorchBackend
from nvfp4kv.kernels.packed_operand import fused_reads_format
from nvfp4kv.kernels.packed_view import PackedKVHandoff, PackedKVView, has_channel, make_standins, publish


class PackedKVLayer(DynamicLayer):
    """K and V of one full-attention layer, stored in ``k_format`` / ``v_format``.

    ``static_scales`` is ``(k_scale, v_scale)`` as FP32 tensors in each format's decode
    convention (already converted), used by the ``static`` and ``checkpoint`` policies;
    ``frozen_scales`` and ``scale_divisors`` serve the ``first_batch`` policy.
    """

    def __init__(
        self,
        k_format: KVFormat,
        v_format: KVFormat,
        *,
        layer_idx: int,
        codec: KernelBackend | None = None,
        read_mode: str = "serving",
        sink_tokens: int = 0,
        residual_length: int = 0,
        scale_policy: str = "prefill",
        static_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        keep_dequantized: bool = False,
        nonfinite: str = "raise",
        is_skip: bool = False,
        frozen_scales: FrozenScales | None = None,
        scale_divisors: tuple[float, float] | None = None,
        k_center: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        #: store keys minus each sequence's per-channel prompt mean (nvfp4kv.cache.k_center)
        self.k_center = k_center
        #: that mean, ``[B, H, 1, D]`` FP32, set by the first write (None: not centering / empty)
        self.k_offset: torch.Tensor | None = None
        #: a ``skip_layers`` entry (BF16 storage) rather than a quantized layer
        self.is_skip = is_skip
        #: head_dim of K and V, known after the first update
        self.head_dims: tuple[int, int] = (0, 0)
        self.read_mode = read_mode
        #: NaN/Inf policy: "raise", "map" or "keep" (see nvfp4kv.cache.checks); "error" = "raise"
        self.nonfinite = normalize_nonfinite(nonfinite)
        #: the attention function of the previous call accepted packed views (renewed every call)
        self._fused_reader = False
        #: left pad tokens per batch row of the coming writes (None: no padding); see set_padding
        self.pads: tuple[int, ...] | None = None
        codec = codec or TorchBackend()
        common: dict[str, Any] = dict(
            sink_tokens=sink_tokens, residual_length=residual_length, scale_policy=scale_policy,
            keep_dequantized=keep_dequantized,
        )
        common["frozen_scales"] = frozen_scales
        k_div, v_div = scale_divisors if scale_divisors is not None else (None, None)
        self.k_stream = PackedStream(k_format, codec, label=f"layer {layer_idx} K", static_scale=static_scales[0],
                                     scale_divisor=k_div, **common)
        self.v_stream = PackedStream(v_format, codec, label=f"layer {layer_idx} V", static_scale=static_scales[1],
                                     scale_divisor=v_div, **common)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_idx}, k={self.k_format.name}, v={self.v_format.name})"

    @property
    def k_format(self) -> KVFormat:
        return self.k_stream.fmt

    @property
    def v_format(self) -> KVFormat:
        return self.v_stream.fmt

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Exact rollback is possible only when no token group can be cut (see PackedStream.crop)."""
        return self.k_format.token_group == 1 and self.v_format.token_group == 1

    # ------------------------------------------------------------------ padding
    def set_padding(self, pads: tuple[int, ...] | list[int] | None) -> None:
        """Row ``b`` of the coming writes starts with ``pads[b]`` pad tokens (left padding).

        Call on an empty layer. Pad positions are stored as zeros and kept out of scales, sink
        windows and token groups, so each row stores exactly what it would store alone.
        """
        if self.get_seq_length():
            raise ValueError(f"Layer {self.layer_idx}: set_padding must be called before the first update")
        self.k_stream.set_padding(pads)
        self.v_stream.set_padding(pads)
        self.pads = self.k_stream.pads

    def _zero_pads(self, x: torch.Tensor, n_before: int) -> torch.Tensor:
        """``x`` (tokens from position ``n_before``) with every row's pad positions set to zero."""
        pads = self.pads
        if pads is None or n_before >= max(pads):
            return x
        if len(pads) != x.shape[0]:
            raise KVStateError(f"Layer {self.layer_idx}: set_padding gave {len(pads)} rows but the batch has "
                               f"{x.shape[0]}; give one pad length per row.")
        position = torch.arange(n_before, n_before + x.shape[2], device=x.device)
        pad = torch.tensor(pads, device=x.device)
        real = (position[None, :] >= pad[:, None])[:, None, :, None]
        return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))

    # ------------------------------------------------------------------ the layer contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.head_dims = (key_states.shape[-1], value_states.shape[-1])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V ``[B, H_kv, t, D]`` and return the K/V attention reads.

        Atomic: shapes, dtypes, devices and the NaN/Inf policy are checked before anything
        changes, and any later failure (a format or kernel raising while K or V is encoded,
        say) restores the layer exactly as it was, so K and V never get out of step.
        """
        where = f"Layer {self.layer_idx}"
        self._check_states(key_states, value_states, where)
        n_before = self.get_seq_length()
        key_states = self._zero_pads(key_states, n_before)
        value_states = self._zero_pads(value_states, n_before)
        stacked = self._paired_finite(key_states, value_states, where, n_before)
        if stacked is None:
            key_states = self._apply_nonfinite(key_states, where, "K", n_before)
            value_states = self._apply_nonfinite(value_states, where, "V", n_before)
        saved = dict(vars(self)), self.k_stream.snapshot(), self.v_stream.snapshot()
        try:
            if self.k_center:
                key_states, stacked = self._centered(key_states, value_states, n_before, stacked)
            return self._store_and_read(key_states, value_states, n_before, kwargs, stacked)
        except BaseException:
            self._restore(saved)
            raise

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor, where: str) -> None:
        """Everything that can be refused before storing: shapes, dtype, device, block sizes."""
        check_kv_states(key_states, value_states, where)
        stored = self.k_stream.stored_example() if self.get_seq_length() else None
        check_against_stored(key_states, value_states, where,
                             head_dims=self.head_dims if self.is_initialized else None, stored=stored)
        for which, fmt, x in (("K", self.k_format, key_states), ("V", self.v_format, value_states)):
            if x.shape[-1] % fmt.block_size:
                raise BlockSizeError(
                    f"{where} {which}: format {fmt.name!r} quantizes blocks of {fmt.block_size} along head_dim, "
                    f"but head_dim is {x.shape[-1]}. Use a format whose block divides {x.shape[-1]} "
                    f"(e.g. 'fp8_e4m3'), or keep this layer in BF16 with skip_layers."
                )

    def _paired_finite(self, k: torch.Tensor, v: torch.Tensor, where: str, n_before: int) -> torch.Tensor | None:
        """``torch.stack([k, v])`` when this write can be encoded as a pair (:func:`pair_ready`:
        a decode step of the common configuration) and holds no NaN/Inf; else None, and the
        NaN/Inf policy is applied to K and V one by one (:meth:`_apply_nonfinite`).

        Why: one NaN/Inf check of the stack instead of one per K and V, and the stack is what
        :func:`append_pair` encodes (its format step encoder may skip its own check, since the
        policy has been applied). Under ``"raise"`` a stack holding NaN/Inf raises the error
        naming K or V; under ``"map"`` it is left to the per-piece mapping; ``"keep"`` never
        stacks here (nothing is checked, so nothing is known finite).
        """
        if self.nonfinite == "keep" or not pair_ready(self.k_stream, self.v_stream, k, v):
            return None
        stacked = torch.stack([k, v])
        if not has_nonfinite(stacked):
            return stacked
        if self.nonfinite == "raise":
            raise_if_nonfinite(k, where, "K", n_before)
            raise_if_nonfinite(v, where, "V", n_before)
        return None

    def _apply_nonfinite(self, x: torch.Tensor, where: str, which: str, n_before: int) -> torch.Tensor:
        """The NaN/Inf policy on incoming K or V, before any path can read them (see checks.py)."""
        if self.nonfinite == "raise":
            if has_nonfinite(x):  # one cheap reduction; the error's position only when needed
                raise_if_nonfinite(x, where, which, n_before)
        elif self.nonfinite == "map":
            return map_nonfinite_write(x)
        return x

    def _centered(self, k: torch.Tensor, v: torch.Tensor, n_before: int,
                  stacked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` minus this sequence's key offset (set from this write when it is the first), pads
        kept zero; and the K/V stack rebuilt from it when the pair path had built one."""
        if n_before == 0 or self.k_offset is None:
            self.k_offset = key_offset(k, self.pads, n_before)
        k = self._zero_pads(center_keys(k, self.k_offset), n_before)
        return k, (torch.stack([k, v]) if stacked is not None else None)

    def _restore(self, saved: tuple[dict[str, Any], dict[str, object], dict[str, object]]) -> None:
        """Put the layer back as :meth:`update` found it (attributes and both streams)."""
        layer_state, k_state, v_state = saved
        vars(self).clear()
        vars(self).update(layer_state)
        self.k_stream.restore(k_state)
        self.v_stream.restore(v_state)

    def _store_and_read(
        self, key_states: torch.Tensor, value_states: torch.Tensor, n_before: int, kwargs: dict[str, Any],
        stacked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not append_pair(self.k_stream, self.v_stream, key_states, value_states, stacked):
            self.k_stream.append(key_states)
            self.v_stream.append(value_states)
        fused_reader, self._fused_reader = self._fused_reader, False
        # a decode step reads every token as stored; raw_fresh reads the new token raw instead
        reads_as_stored = key_states.shape[-2] == 1 and self.read_mode != "raw_fresh"
        view = self.packed_view() if fused_reader and reads_as_stored and has_channel(kwargs) else None
        if view is not None:
            k_out, v_out = make_standins(view, key_states, self.get_seq_length())
        else:
            fresh_raw = self.read_mode == "raw_fresh" or (self.read_mode == "serving" and key_states.shape[-2] > 1)
            k_out = self._read(self.k_stream, key_states, n_before, fresh_raw)
            v_out = self._read(self.v_stream, value_states, n_before, fresh_raw)
            single = self._single_token_rows(key_states.shape[-2], n_before) if fresh_raw else None
            if single is not None:  # those rows alone would be a decode step: they read as stored
                k_out = torch.where(single, self._read(self.k_stream, key_states, n_before, False), k_out)
                v_out = torch.where(single, self._read(self.v_stream, value_states, n_before, False), v_out)
        publish(kwargs, PackedKVHandoff(view, standins=view is not None, on_accept=self.claim_fused_reader))
        return k_out, v_out

    def _single_token_rows(self, t: int, n_before: int) -> torch.Tensor | None:
        """Under ``serving`` reads, the rows of a padded multi-token write that hold exactly one
        real token (a one-token prompt beside longer ones), as a ``[B, 1, 1, 1]`` mask; alone,
        such a write is a decode step, which reads itself as stored. None when there are none."""
        if self.pads is None or self.read_mode != "serving" or n_before >= max(self.pads):
            return None
        real = [t - min(max(pad - n_before, 0), t) for pad in self.pads]
        if 1 not in real:
            return None
        device = self.k_stream.stored_example().device  # type: ignore[union-attr]
        return torch.tensor([n == 1 for n in real], device=device).reshape(-1, 1, 1, 1)

    def claim_fused_reader(self) -> None:
        """The attention function reading this call's output accepted packed views
        (:meth:`PackedKVHandoff.accept`): the next decode step may hand over stand-ins."""
        self._fused_reader = True

    def packed_view(self) -> PackedKVView | None:
        """What this layer stores, as the fused decode kernel reads it.

        None when nothing is packed yet or a format is not one the kernel reads (no declared
        fused decode, token groups, BF16 skip layers). Raw tokens are the sink and the pending
        window, with their logical positions, built on the packed data's device.
        """
        ks, vs = self.k_stream, self.v_stream
        if ks.parts is None or vs.parts is None:
            return None
        if not (fused_reads_format(self.k_format) and fused_reads_format(self.v_format)):
            return None
        device = next(iter(ks.parts.values())).device
        raw_k = [t for t in (ks.sink, ks.pending) if t is not None]
        raw_v = [t for t in (vs.sink, vs.pending) if t is not None]
        positions = None
        if raw_k:
            end = ks.n_sink + ks.n_packed
            positions = torch.cat([torch.arange(ks.n_sink, device=device),
                                   torch.arange(end, end + ks.n_pending, device=device)])
        return PackedKVView(
            self.k_format, self.v_format, ks.parts, vs.parts,
            ks.read_scale(0, ks.n_packed), vs.read_scale(0, vs.n_packed), packed_start=ks.n_sink,
            raw_k=_cat_tokens(raw_k), raw_v=_cat_tokens(raw_v), raw_positions=positions,
        )

    @staticmethod
    def _read(stream: PackedStream, fresh: torch.Tensor, n_before: int, fresh_raw: bool) -> torch.Tensor:
        if stream.n_tokens == 0 or (fresh_raw and n_before == 0):
            return fresh
        if not fresh_raw:
            return stream.read(fresh.dtype)
        return torch.cat([stream.read(fresh.dtype, upto=n_before), fresh], dim=-2)

    def get_seq_length(self) -> int:
        """Every stored token: sink + packed + pending (masks and positions depend on it)."""
        return self.k_stream.n_tokens

    def reset(self) -> None:
        """Drop every stored token and the padding (a reset layer is an empty one)."""
        super().reset()
        self._fused_reader = False
        self.pads = None
        self.k_offset = None
        self.k_stream.reset()
        self.v_stream.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` newest tokens (transformers 5 passes a negative count).

        Exact for token-wise formats; for ``token_group > 1`` see :meth:`PackedStream.crop`.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value ({tokens_to_remove}) is not supported; pass a negative "
                f"number of tokens to remove, as transformers does."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.k_stream.crop(-tokens_to_remove)
        self.v_stream.crop(-tokens_to_remove)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.k_offset is not None:
            self.k_offset = fn(self.k_offset)
        if self.get_seq_length() > 0:
            self.k_stream.map_batch(fn)
            self.v_stream.map_batch(fn)
            self.pads = self.k_stream.pads
        elif self.pads is not None:  # padding announced, nothing stored yet: rows follow the map
            self.set_padding(fn(torch.tensor(self.pads)).tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder every stored tensor (packed parts included) along the batch."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Storage held for K and V (parts, scales, sink, pending, the key offset); not the fast path."""
        offset = 0 if self.k_offset is None else self.k_offset.numel() * self.k_offset.element_size()
        return self.k_stream.nbytes() + self.v_stream.nbytes() + offset

    def fastpath_nbytes(self) -> int:
        return self.k_stream.fastpath_nbytes() + self.v_stream.fastpath_nbytes()

    def reserved_nbytes(self) -> int:
        """Spare capacity of the growth buffers (allocated, holding no token yet)."""
        return self.k_stream.reserved_nbytes() + self.v_stream.reserved_nbytes()


def _cat_tokens(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    if not pieces:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
