"""``QuantizedKVCache``: a transformers ``Cache`` whose full-attention layers store K/V packed.

Build one per ``generate`` call with :func:`make_cache` (a cache continues from whatever it
holds, so reusing one would prepend the previous prompt) and hand it to the model under the
keyword :func:`cache_kwarg_name` returns (``cache`` in transformers 5, ``past_key_values``
before)::

    cache = make_cache(model, KVCacheConfig(k_format="nvfp4", v_format="nvfp4"))
    out = model.generate(**inputs, max_new_tokens=32, **{cache_kwarg_name(model): cache})

Layer types come from the model config, as in ``DynamicCache(config=...)``: full-attention
layers get a :class:`~nvfp4kv.cache.layer.PackedKVLayer` (BF16 storage for ``skip_layers``),
sliding-window/chunked layers keep transformers' ``DynamicSlidingWindowLayer`` unchanged (they
hold at most a window of tokens, so they are left unquantized, and ``memory_report`` says so),
and any other layer type (linear attention, dummy) gets transformers' own layer class.

Batches: every row is stored as it would be alone (per-row global scales; ``first_batch`` is the
one batch-wide policy, by definition). A left-padded batch must say so before its first forward,
``cache.set_padding(pad_lengths)`` (one count of leading pad tokens per row, e.g.
``(attention_mask == 0).sum(-1)`` for a left-padded mask): pad positions are then stored as zeros
and kept out of every scale, sink window and token group (:mod:`nvfp4kv.cache.stream`). The cache
never sees the attention mask, so without ``set_padding`` pad tokens count as real ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from nvfp4kv.cache.checks import check_kv_states
from nvfp4kv.cache.config import KVCacheConfig
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.cache.layer import PackedKVLayer
from nvfp4kv.cache.memory import layer_memory
from nvfp4kv.calibration.checkpoint import read_checkpoint_scales
from nvfp4kv.errors import BlockSizeError, ConfigError
from nvfp4kv.formats.base import KVFormat
from nvfp4kv.kernels.backend import KernelBackend, resolve_backend

#: layer types stored packed; everything else keeps transformers' own layer class
QUANTIZED_LAYER_TYPES = ("full_attention",)


class QuantizedKVCache(Cache):
    """A cache storing every full-attention layer's K/V per ``config``.

    ``model_config`` (the model's ``PretrainedConfig``) gives the layer types and head_dim, so
    problems (a block size that does not divide head_dim, missing static scales, a skip index
    past the last layer) are reported when the cache is built. Without it, every layer is
    created lazily as a full-attention packed layer (handy for tests on raw tensors).
    """

    def __init__(self, config: KVCacheConfig, model_config: Any | None = None,
                 frozen_scales: FrozenScales | None = None) -> None:
        self.kv_config = config
        #: first_batch policy: scales frozen by the first forward, shared with other caches given the same store
        self.frozen_scales = frozen_scales if frozen_scales is not None else FrozenScales()
        #: scale_policy=checkpoint: (k_scale, v_scale) per layer read from the checkpoint
        self._checkpoint_scales: dict[int, tuple[float, float]] | None = None
        #: called as ``observer(layer_idx, key, value)`` before each write is stored: how a prefill's
        #: raw K/V are recorded to be shared with other formats (nvfp4kv/eval/prefill_share.py)
        self.write_observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        #: left pad tokens per batch row of the coming writes (set_padding); None: no padding
        self.pads: tuple[int, ...] | None = None
        #: the backend every layer encodes/decodes with (chosen once, here, from config.backend)
        self.codec: KernelBackend = resolve_backend(config.backend)
        self._k_format = config.build_format("k")
        self._v_format = config.build_format("v")
        self._bf16_format = config.build_format_named("bf16") if config.skip_layers else None
        if model_config is None:
            super().__init__(layer_class_to_replicate=self._next_lazy_layer)  # type: ignore[arg-type]
            return
        if config.scale_policy == "checkpoint":
            self._checkpoint_scales = read_checkpoint_scales(self._checkpoint_path(model_config))
        text_config = model_config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        if isinstance(layer_kwargs, Mapping):  # transformers <= 5.17: one kwargs dict shared by all layers
            layer_kwargs = [dict(layer_kwargs) for _ in layer_types]
        self._check_model(text_config, layer_types)
        layers = [self._layer_for(i, t, kw) for i, (t, kw) in enumerate(zip(layer_types, layer_kwargs))]
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K/V ``[B, H_kv, T, D]`` for ``layer_idx`` and return what attention reads.

        Malformed K/V (not 4-D, not floating point, K and V of different batch/heads/tokens or
        devices) are refused with :class:`~nvfp4kv.errors.KVStateError` before anything changes,
        not even a lazily created layer; packed layers then check the rest and roll back on any
        failure (see :meth:`PackedKVLayer.update`).
        """
        check_kv_states(key_states, value_states, f"Layer {layer_idx}")
        if self.write_observer is not None:
            self.write_observer(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_padding(self, pad_lengths: Sequence[int] | torch.Tensor | None) -> None:
        """Announce a left-padded batch: row ``b`` of the coming writes starts with
        ``pad_lengths[b]`` pad tokens. Call on an empty cache, before the first forward (once per
        batch; a fresh cache per batch, as always).

        Pad positions are stored as zeros, and kept out of every data-derived global scale, sink
        window and token group, so each row's codes, scales and reads are exactly those it would
        get alone (:mod:`nvfp4kv.cache.stream`). ``None`` or all zeros: no padding. Layers
        transformers keeps unquantized (sliding window) store pads as they are (nothing in them
        depends on other positions). Row operations (``batch_select_indices``, beam
        ``reorder_cache``, ``batch_repeat_interleave``) carry the padding along with the rows.
        """
        if self.get_seq_length():
            raise ValueError("set_padding must be called on an empty cache, before the first forward "
                             "(build a fresh cache per batch with make_cache).")
        if isinstance(pad_lengths, torch.Tensor):
            pad_lengths = pad_lengths.reshape(-1).tolist()
        pads = tuple(int(p) for p in pad_lengths) if pad_lengths is not None else ()
        if any(p < 0 for p in pads):
            raise ValueError(f"pad lengths must be >= 0; got {list(pads)}")
        self.pads = pads if any(pads) else None
        for layer in self.layers:
            if isinstance(layer, PackedKVLayer):
                layer.set_padding(self.pads)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_pads(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_pads(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_pads(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map_pads(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keep the cache's own record of the padding in step with its layers' rows."""
        if self.pads is not None:
            self.pads = tuple(fn(torch.tensor(self.pads)).tolist())

    # ------------------------------------------------------------------ building layers
    def _next_lazy_layer(self) -> PackedKVLayer:
        layer = self._packed_layer(len(self.layers))
        if self.pads is not None:
            layer.set_padding(self.pads)
        return layer

    def _layer_for(self, idx: int, layer_type: str, kwargs: dict[str, Any]) -> Any:
        if layer_type in QUANTIZED_LAYER_TYPES:
            return self._packed_layer(idx)
        return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)

    def _packed_layer(self, idx: int) -> PackedKVLayer:
        cfg = self.kv_config
        if idx in cfg.skip_layers:
            assert self._bf16_format is not None
            return PackedKVLayer(self._bf16_format, self._bf16_format, layer_idx=idx, codec=self.codec,
                                 read_mode=cfg.read_mode, nonfinite=cfg.nonfinite, is_skip=True)
        return PackedKVLayer(
            self._k_format, self._v_format, layer_idx=idx, codec=self.codec, read_mode=cfg.read_mode,
            sink_tokens=cfg.sink_tokens, residual_length=cfg.residual_length, scale_policy=cfg.scale_policy,
            static_scales=self._static_scales(idx), keep_dequantized=cfg.dequant_cache, nonfinite=cfg.nonfinite,
            frozen_scales=self.frozen_scales, scale_divisors=cfg.first_batch_divisors, k_center=cfg.k_center,
        )

    def _checkpoint_path(self, model_config: Any) -> str:
        path = self.kv_config.checkpoint_scales or getattr(model_config, "_name_or_path", None)
        if not path:
            raise ConfigError("scale_policy=checkpoint but neither checkpoint_scales nor the model's own directory is "
                              "known; set checkpoint_scales=/path/to/checkpoint.")
        return str(path)

    def _static_scales(self, idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        cfg = self.kv_config
        if cfg.scale_policy not in ("static", "checkpoint") or not (self._k_format.uses_global_scale
                                                                   or self._v_format.uses_global_scale):
            return (None, None)
        scales = cfg.static_scales if cfg.scale_policy == "static" else self._checkpoint_scales
        if scales is None:  # checkpoint policy on a cache built without the model's config
            raise ConfigError("scale_policy=checkpoint needs the model config (make_cache(model, ...)) to find the "
                              "checkpoint; or use scale_policy=static with static_scales.")
        if idx not in scales:
            source = "static_scales" if cfg.scale_policy == "static" else "the checkpoint's k_scale/v_scale tensors"
            raise ConfigError(
                f"scale_policy={cfg.scale_policy!r} but {source} have no entry for layer {idx} (there are "
                f"{sorted(scales)}); give (k_scale, v_scale) for every quantized layer, or add the layer "
                f"to skip_layers."
            )
        k_scale, v_scale = scales[idx]
        return (_decode_scale(k_scale, self._k_format, cfg.scale_convention),
                _decode_scale(v_scale, self._v_format, cfg.scale_convention))

    def _check_model(self, text_config: Any, layer_types: list[str]) -> None:
        cfg = self.kv_config
        n_layers = len(layer_types)
        if any(i >= n_layers for i in cfg.skip_layers):
            raise ConfigError(f"skip_layers {list(cfg.skip_layers)} name layers past the model's {n_layers} layers "
                              f"(indices 0..{n_layers - 1}). Drop those indices from skip_layers.")
        head_dim = config_head_dim(text_config)
        if cfg.static_scales_file is not None:
            from nvfp4kv.calibration.scales_file import load_scales_file

            kv_heads, _ = attention_shape(text_config)
            load_scales_file(cfg.static_scales_file).check_model(n_layers, kv_heads, head_dim, cfg.static_scales_file)
        if cfg.static_scales is not None and any(i >= n_layers for i in cfg.static_scales):
            raise ConfigError(f"static_scales has layers {sorted(cfg.static_scales)} but the model has {n_layers} "
                              f"layers (indices 0..{n_layers - 1}): the scales belong to another model. Calibrate "
                              f"scales for this model.")
        quantized = [i for i, t in enumerate(layer_types) if t in QUANTIZED_LAYER_TYPES and i not in cfg.skip_layers]
        for which, fmt in (("K", self._k_format), ("V", self._v_format)):
            if quantized and head_dim % fmt.block_size:
                raise BlockSizeError(
                    f"{which} format {fmt.name!r} quantizes blocks of {fmt.block_size} along head_dim, but this "
                    f"model's head_dim is {head_dim}. Use a format whose block divides {head_dim} (e.g. 'fp8_e4m3'), "
                    f"or keep the layers in BF16 with skip_layers."
                )
        for idx in quantized:
            self._static_scales(idx)  # raises for a missing layer now, not mid-generation

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of K/V storage held by all layers: packed parts, global scales, sink and residual
        tensors, and unquantized layers' tensors. The CPU fast path's copies are not included
        (see :meth:`fastpath_nbytes` and :meth:`memory_report`)."""
        return sum(row["k_bytes"] + row["v_bytes"] for row in self.memory_report())

    def fastpath_nbytes(self) -> int:
        """Extra bytes the ``dequant_cache`` fast path holds (dequantized copies); 0 when off."""
        return sum(row["fastpath_bytes"] for row in self.memory_report())

    def reserved_nbytes(self) -> int:
        """Bytes the growth buffers hold ahead of the stored tokens (appends double capacity when full)."""
        return sum(row["reserved_bytes"] for row in self.memory_report())

    def memory_report(self) -> list[dict[str, Any]]:
        """One dict per layer: kind, formats, tokens, k_bytes, v_bytes, measured bits_per_element,
        the formats' nominal bits, what BF16 would hold (bf16_bytes), fastpath_bytes, and
        reserved_bytes (growth-buffer capacity allocated ahead of the tokens, not in k/v_bytes)."""
        return [layer_memory(layer, idx) for idx, layer in enumerate(self.layers)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kv_config.label}, layers={len(self.layers)})"


def _decode_scale(value: float, fmt: KVFormat, convention: str) -> torch.Tensor | None:
    """A static scale as the format's FP32 decode scale ``[1, 1, 1, 1]`` (None if unused); the
    format converts from ``convention`` (config validation already refused unsupported ones)."""
    if not fmt.uses_global_scale:
        return None
    value = fmt.static_decode_scale(value, convention)
    return torch.tensor(value, dtype=torch.float32).reshape(1, 1, 1, 1)


def config_head_dim(text_config: Any) -> int:
    """head_dim of a decoder config: stated, else ``hidden_size / attention heads``."""
    return int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)


def attention_shape(text_config: Any) -> tuple[int, int]:
    """(KV heads, head_dim) of a decoder config: the shape of what a cache stores per token and layer."""
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return int(kv_heads), config_head_dim(text_config)


def make_cache(model: Any, kv_config: KVCacheConfig | Mapping[str, Any] | None = None,
               frozen_scales: FrozenScales | None = None) -> QuantizedKVCache:
    """A fresh :class:`QuantizedKVCache` for ``model`` (build one per ``generate``/scoring call).

    ``kv_config`` may be a :class:`KVCacheConfig`, its ``to_dict()`` form, or ``None`` (defaults:
    NVFP4 for K and V). ``KVCacheConfig(k_format="bf16", v_format="bf16")`` on a BF16 model
    reproduces ``DynamicCache`` bit for bit. ``frozen_scales``: the store a ``first_batch``
    policy shares across caches (one per evaluation of one KV setting); None gives this cache its own.
    """
    if kv_config is None:
        kv_config = KVCacheConfig()
    elif not isinstance(kv_config, KVCacheConfig):
        kv_config = KVCacheConfig.from_dict(kv_config)
    return QuantizedKVCache(kv_config, model.config, frozen_scales=frozen_scales)


def cache_kwarg_name(model: Any) -> str:
    """The keyword ``model.forward`` / ``generate`` take a cache under: ``cache`` (transformers
    5, where ``past_key_values`` is deprecated) or ``past_key_values`` (earlier versions)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
