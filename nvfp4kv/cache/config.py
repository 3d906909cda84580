"""``KVCacheConfig``: every choice that decides what a quantized KV cache stores and reads.

One frozen dataclass, validated when built, so that a bad Hydra override fails before a model is
loaded, with a message that names the fix. It round-trips through :meth:`KVCacheConfig.to_dict`
/ :meth:`KVCacheConfig.from_dict` (JSON/YAML-ready) so a results record says exactly which cache
produced a number, and :attr:`KVCacheConfig.label` gives the short name tables use.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The closed choices and the parser of a KV setting live in torch-free nvfp4kv.config (the Hydra
# schemas use the same ones): "torch" is the only backend in this package, the rest in nvfp4kv.kernels.
from nvfp4kv.config.choices import (  # noqa: F401  (re-exported)
    BACKENDS,
    NONFINITE_POLICIES,
    READ_MODES,
    SCALE_POLICIES,
    NonFinite,  # "raise" | "map" | "keep" ("error": deprecated alias of "raise")
    ReadMode,
    ScalePolicy,
)
from nvfp4kv.config.kv import kv_values
from nvfp4kv.errors import ConfigError, UnknownFormatError
from nvfp4kv.formats.base import (
    available_formats,
    KVFormat,
    format_class,
    get_format,
    normalize_nonfinite,
)



def ensure_formats_registered() -> None:
    """Import :mod:`nvfp4kv.formats` so every built-in format is in the registry.

    Tolerates the package being absent (only while it is being written, or when a test registers a
    private format); any other import error is a real bug and propagates.
    """
    try:
        importlib.import_module("nvfp4kv.formats")
    except ModuleNotFoundError as err:
        if err.name != "nvfp4kv.formats":
            raise


def decode_scale_from_amax(fmt: KVFormat, amax: float, divisor: float | None = None) -> float:
    """The decode (global) scale ``fmt`` takes for a tensor whose largest |x| is ``amax``.

    ``divisor=None`` asks the format (``amax/(6*448)`` NVFP4, ``amax/448`` FP8: ModelOpt's
    static-scale conventions); an explicit divisor reproduces an engine's own constant (vLLM's
    ``calculate_kv_scales`` divides by 200 for K and 100 for V). Formats without a global scale
    return 1.0 (never read).
    """
    if not fmt.uses_global_scale:
        return 1.0
    if divisor is not None:
        return float(amax) / float(divisor)
    import torch

    scale = fmt.global_scale(torch.full((1, 1, 1, 1), float(amax), dtype=torch.float32))
    return 1.0 if scale is None else float(scale.reshape(-1)[0])


def default_options(format_name: str, which: Literal["k", "v"]) -> dict[str, Any]:
    """The options a format gets for K or V before the user's own, as its class declares them
    (``KVFormat.default_options``; e.g. KIVI's axes for int4/int2). Unknown names get none
    here; building the format reports them."""
    ensure_formats_registered()
    try:
        factory = format_class(format_name)
    except UnknownFormatError:
        return {}
    return dict(getattr(factory, "default_options", {}).get(which, {}))


@dataclass(frozen=True)
class KVCacheConfig:
    """What the KV cache stores and what attention reads back.

    **Formats.** ``k_format`` / ``v_format`` name registered formats (``bf16``, ``fp8_e4m3``,
    ``nvfp4``, ``fp4_mx_block16``, ``mxfp4``, ``int4``, ``int2``); ``k_options`` / ``v_options``
    are passed to the format's constructor (e.g. FP8 scale granularity, KIVI ``group_size``).
    ``int4``/``int2`` default to KIVI's layout: keys ``axis="channel"``, values ``axis="token"``.

    **Global scale** (formats with a per-tensor/per-head scale: NVFP4, FP8), ``scale_policy``:

    - ``"prefill"`` (default): computed from the first write (the prompt, sink tokens excluded)
      and frozen, as HF's ``Fp8QuantizedLayer`` does; later outliers saturate. Costs one FP32 per
      layer per K/V. No engine takes a scale from each request; it is the default because README's
      policy table (``+sweep=policies``, ``policies_qwen``) measured it within the interval of
      calibrated ``static`` for NVFP4 on both models, where ``unit`` (vLLM/SGLang without
      checkpoint scales) drifts 3x further on Qwen, and it needs no calibration file.
    - ``"dynamic"``: recomputed for every write (every chunk leaving the residual window) and
      recorded per token row, a ``[1, h, T, 1]`` FP32 tensor: 4 bytes per token per scale head,
      counted in :meth:`~nvfp4kv.cache.QuantizedKVCache.nbytes`. The accuracy upper bound for a
      per-tensor scale; no engine does this per decode step.
    - ``"static"``: ``static_scales[layer] = (k_scale, v_scale)``, given in
      ``scale_convention`` (``"decode"``: ``amax/(6*448)`` for NVFP4, i.e. ModelOpt's exported
      ``k_scale``; other NVFP4 conventions are converted by
      :func:`nvfp4kv.formats.conventions.to_decode_scale`). Formats without a global scale ignore it.
      Or ``static_scales_file``: a calibration file (``python -m experiments.calibrate``) holding
      per-layer amax, from which each format takes its own scale (ModelOpt: ``amax/(6*448)``
      NVFP4, ``amax/448`` FP8). What TensorRT-LLM/ModelOpt serve with.
    - ``"checkpoint"``: ``k_scale``/``v_scale`` tensors read from a checkpoint's safetensors
      (``checkpoint_scales``, default the model's own directory) under the names vLLM's and
      SGLang's loaders accept (:mod:`nvfp4kv.calibration.checkpoint`); a checkpoint without them
      is refused, naming the fix.
    - ``"first_batch"``: vLLM's ``calculate_kv_scales``: the scale of every layer is computed from
      the first forward that reaches it and then frozen for every later request sharing the
      cache's scale store (:class:`~nvfp4kv.cache.first_batch.FrozenScales`; the lm-eval model
      keeps one per KV setting). ``first_batch_divisors=[k, v]`` gives the engine's constants
      (vLLM: ``amax/200`` K, ``amax/100`` V); by default the format's own (``amax/(6*448)``,
      ``amax/448``). Batch-wide by definition: a request's codes depend on which request came first.
    - ``"unit"``: scale 1.0 (vLLM and SGLang with an FP8 checkpoint that carries no scales).

    **Full-precision windows** (KIVI-style): the first ``sink_tokens`` tokens and the newest
    ``residual_length`` tokens are stored in the model's dtype; a token is quantized once it leaves
    the residual window, in multiples of the format's ``token_group``, and never re-quantized.
    ``skip_layers`` are stored in BF16 whatever the formats.

    **k_center** (research, no engine does it): store each sequence's keys minus their per-channel
    mean over the prompt (:mod:`nvfp4kv.cache.k_center`). Attention is unchanged by a shift common
    to all keys, so only the rounding changes: the format no longer spends its range on a constant
    offset (Qwen2's key bias makes some channels ~300x their spread). Costs ``4 * head_dim`` bytes
    per KV head per sequence and layer, counted in ``nbytes``.

    **read_mode**, i.e. which attention reads see quantized K/V:

    - ``"serving"`` (default): a multi-token write (a prefill chunk) attends to its own raw K/V
      plus the dequantized prefix, while a single-token decode step reads everything dequantized,
      itself included. What SGLang's FlashInfer and Triton backends do (prefill kernels use the
      fresh K/V they were handed); the optimistic side of the engines' default paths (below).
    - ``"quantized"``: every read is dequantized, prefill chunk included (equivalent to
      fake-quantizing K/V after RoPE). What vLLM V1 (FlashAttention, FlashInfer), SGLang's default
      fa3/trtllm_mha backends and TensorRT-LLM do: they write K/V to the paged cache first and
      run the prompt's attention over it (docs/engines.md, with the source lines).
    - ``"raw_fresh"``: the freshly written tokens are always returned raw, decode steps included
      (what HF's ``QuantizedCache`` effectively does on prefill; the optimistic bound).

    Reads always return what is stored: sink, residual and not-yet-full-group tokens are full
    precision in every mode.

    **Other knobs.** ``dequant_cache``: CPU fast path that keeps the dequantized values of stored
    tokens so a step dequantizes only new ones (identical outputs; the extra memory is reported
    as ``fastpath_bytes``, never hidden in ``nbytes``). ``backend``: ``"torch"`` (the bit-exact
    references, any device) or a kernel backend resolved by :func:`nvfp4kv.kernels.get_backend`.

    **nonfinite**, the NaN/Inf policy, applied to the incoming K/V of every update, so it holds
    for every path that reads them (the raw prefill chunk of ``serving`` reads, sink and residual
    windows, packed tokens):

    - ``"raise"`` (default): :class:`~nvfp4kv.errors.NonFiniteKVError` naming the layer, K or V,
      the position and the fix; nothing is stored.
    - ``"map"``: NaN -> 0, +-Inf -> +-(largest finite ``|x|`` of that write of K or V), so
      attention stays finite (see :mod:`nvfp4kv.cache.checks` for why not the dtype's max).
    - ``"keep"``: no check, no mapping; NaN/Inf reach attention through raw reads and go through
      the formats' arithmetic as they are. A research option, to see what bad numerics do.

    ``"error"`` is accepted as a deprecated alias of ``"raise"`` (DeprecationWarning).
    Independently of this policy, finite K/V always read back finite: formats saturate at the
    read dtype's largest value (FP16 65504) instead of overflowing to Inf.
    """

    k_format: str = "nvfp4"
    v_format: str = "nvfp4"
    k_options: dict[str, Any] = field(default_factory=dict)
    v_options: dict[str, Any] = field(default_factory=dict)
    scale_policy: ScalePolicy = "prefill"
    static_scales: dict[int, tuple[float, float]] | None = None
    scale_convention: str = "decode"
    static_scales_file: str | None = None
    checkpoint_scales: str | None = None
    first_batch_divisors: tuple[float, float] | None = None
    residual_length: int = 0
    sink_tokens: int = 0
    skip_layers: tuple[int, ...] = ()
    read_mode: ReadMode = "serving"
    dequant_cache: bool = False
    nonfinite: NonFinite = "raise"
    backend: str = "torch"
    k_center: bool = False

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._normalize_nonfinite()  # first: the formats are built with it
        for which in ("k", "v"):
            self._check_format(which)
        self._check_choice("scale_policy", self.scale_policy, SCALE_POLICIES)
        self._check_choice("read_mode", self.read_mode, READ_MODES)
        self._check_choice("backend", self.backend, BACKENDS)
        for name in ("residual_length", "sink_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (number of tokens kept full precision); got {value!r}. Set {name}=0 to keep none.")
        if not isinstance(self.dequant_cache, bool):
            raise ConfigError(f"dequant_cache must be true or false; got {self.dequant_cache!r}. Set dequant_cache=true (CPU) or false (long GPU contexts).")
        if not isinstance(self.k_center, bool):
            raise ConfigError(f"k_center must be true or false; got {self.k_center!r}. Set k_center=true to store keys "
                              f"minus their per-channel prompt mean, false (default) to store them as they are.")
        object.__setattr__(self, "skip_layers", self._normalized_skip_layers())
        self._check_policy_inputs()
        object.__setattr__(self, "static_scales", self._normalized_static_scales())
        self._check_convention()

    def _normalize_nonfinite(self) -> None:
        """Accept the deprecated ``"error"`` (as ``"raise"``); refuse unknown values with the fix."""
        if self.nonfinite not in NONFINITE_POLICIES and self.nonfinite != "error":
            self._check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        object.__setattr__(self, "nonfinite", normalize_nonfinite(self.nonfinite, stacklevel=5))

    @staticmethod
    def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not supported; use one of {', '.join(choices)}.")

    def _check_format(self, which: Literal["k", "v"]) -> None:
        fmt_field, opt_field = f"{which}_format", f"{which}_options"
        name, options = getattr(self, fmt_field), getattr(self, opt_field)
        if not isinstance(name, str):
            raise ConfigError(f"{fmt_field} must be a format name (a string); got {name!r}. Set {fmt_field}=<name>, one of {', '.join(available_formats())}.")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{opt_field} must be a mapping of format options; got {options!r}. Give a mapping, e.g. {opt_field}={{}}.")
        merged = {**default_options(name, which), **dict(options)}
        object.__setattr__(self, opt_field, merged)
        self.build_format(which)  # raises UnknownFormatError / ConfigError now, not mid-generation

    def _normalized_skip_layers(self) -> tuple[int, ...]:
        layers = self.skip_layers
        if layers is None:
            return ()
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        try:
            out = tuple(sorted({int(i) for i in layers}))
        except (TypeError, ValueError):
            raise ConfigError(f"skip_layers must be a list of layer indices; got {self.skip_layers!r}. Use e.g. skip_layers=[0,1].") from None
        if any(i < 0 for i in out):
            raise ConfigError(f"skip_layers holds a negative index: {list(out)}. Use 0-based layer indices.")
        return out

    def _check_policy_inputs(self) -> None:
        """Each scale source belongs to one policy; a source given to another is a mistake, said so."""
        owners = {"static_scales_file": "static", "checkpoint_scales": "checkpoint",
                  "first_batch_divisors": "first_batch"}
        for name, policy in owners.items():
            if getattr(self, name) is not None and self.scale_policy != policy:
                raise ConfigError(f"{name} was given but scale_policy={self.scale_policy!r} ignores it; set "
                                  f"scale_policy={policy} or drop {name}.")
        if self.first_batch_divisors is not None:
            try:
                k_div, v_div = (float(x) for x in self.first_batch_divisors)
            except (TypeError, ValueError):
                raise ConfigError(f"first_batch_divisors must be [k_divisor, v_divisor]; got {self.first_batch_divisors!r}. "
                                  f"E.g. first_batch_divisors=[200,100] (vLLM's K/V_SCALE_CONSTANT).") from None
            if not all(math.isfinite(d) and d > 0 for d in (k_div, v_div)):
                raise ConfigError(f"first_batch_divisors must be finite and > 0; got {self.first_batch_divisors!r}.")
            object.__setattr__(self, "first_batch_divisors", (k_div, v_div))
        if self.static_scales_file is not None:
            if self.scale_convention != "decode":
                raise ConfigError("static_scales_file holds amax, from which each format derives its own decode scale; "
                                  f"scale_convention={self.scale_convention!r} does not apply. Drop scale_convention.")
            derived = self._scales_from_file()
            if self.static_scales and self._normalized_pairs(self.static_scales) != derived:
                raise ConfigError(f"static_scales and static_scales_file={self.static_scales_file!r} disagree; give one "
                                  f"of them (the file's scales are derived from its amax).")
            object.__setattr__(self, "static_scales", derived)

    def _scales_from_file(self) -> dict[int, tuple[float, float]]:
        """The file's per-layer amax as (K, V) decode scales of this config's formats."""
        from nvfp4kv.calibration.scales_file import load_scales_file

        amax = load_scales_file(str(self.static_scales_file)).amax_pairs()
        k_fmt, v_fmt = self.build_format("k"), self.build_format("v")
        return {i: (decode_scale_from_amax(k_fmt, k), decode_scale_from_amax(v_fmt, v)) for i, (k, v) in sorted(amax.items())}

    @staticmethod
    def _normalized_pairs(scales: Mapping[Any, Any]) -> dict[int, tuple[float, float]]:
        try:
            return {int(i): tuple(float(x) for x in pair) for i, pair in sorted(scales.items(), key=lambda kv: int(kv[0]))}  # type: ignore[misc]
        except (TypeError, ValueError):
            return {}

    def _normalized_static_scales(self) -> dict[int, tuple[float, float]] | None:
        scales = self.static_scales
        if self.scale_policy != "static":
            if scales:
                raise ConfigError(
                    f"static_scales were given but scale_policy={self.scale_policy!r} ignores them; "
                    f"set scale_policy='static' or drop static_scales."
                )
            return None
        if not scales or not isinstance(scales, Mapping):
            raise ConfigError(
                "scale_policy='static' needs static_scales: a mapping {layer_index: (k_scale, v_scale)} "
                f"in the '{self.scale_convention}' convention, or static_scales_file (python -m experiments.calibrate); "
                f"got {scales!r}. Give static_scales, or use scale_policy=prefill."
            )
        out: dict[int, tuple[float, float]] = {}
        for key, pair in scales.items():
            try:
                layer = int(key)
                k_scale, v_scale = (float(s) for s in pair)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"static_scales[{key!r}] must be a (k_scale, v_scale) pair of numbers keyed by layer index; "
                    f"got {pair!r}. Fix that entry, e.g. static_scales={{0: [0.01, 0.02]}}."
                ) from None
            for s in (k_scale, v_scale):
                if not math.isfinite(s) or s <= 0:
                    raise ConfigError(f"static_scales[{layer}] = {pair!r}: scales must be finite and > 0. Recalibrate that layer, or "
                                      f"give a positive scale (amax/(6*448) for NVFP4, amax/448 for FP8).")
            out[layer] = (k_scale, v_scale)
        return dict(sorted(out.items()))

    def _check_convention(self) -> None:
        if self.scale_convention == "decode":
            return
        try:
            from nvfp4kv.formats.conventions import available_conventions
        except ModuleNotFoundError:
            raise ConfigError(
                f"scale_convention={self.scale_convention!r} needs nvfp4kv.formats.conventions, which is "
                f"not installed; give scales in the 'decode' convention."
            ) from None
        if self.scale_convention not in available_conventions():
            raise ConfigError(
                f"Unknown scale_convention {self.scale_convention!r}; use one of {', '.join(available_conventions())}."
            )
        if self.scale_policy == "static":
            defaults = {name: self.build_format_named(name) for name in (self.k_format, self.v_format)}
            others = {name for name, fmt in defaults.items()
                      if fmt.uses_global_scale and not fmt.supports_scale_convention(self.scale_convention)}
            if others:
                raise ConfigError(
                    f"scale_convention={self.scale_convention!r} is an NVFP4 convention, but static scales are also "
                    f"used by {sorted(others)}; give all scales in the 'decode' convention (each format's own "
                    f"decode scale, e.g. amax/448 for FP8)."
                )

    # ------------------------------------------------------------------ formats
    def build_format(self, which: Literal["k", "v"]) -> KVFormat:
        """The K or V format object (with its options and this config's nonfinite policy)."""
        name = self.k_format if which == "k" else self.v_format
        options = self.k_options if which == "k" else self.v_options
        return self.build_format_named(name, options, which)

    def build_format_named(self, name: str, options: Mapping[str, Any] | None = None,
                           which: str = "k") -> KVFormat:
        ensure_formats_registered()
        options = dict(options or {})
        options.setdefault("nonfinite", self.nonfinite)
        try:
            return get_format(name, **options)
        except UnknownFormatError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"Format {name!r} rejected the options {options!r} ({err}); fix {which}_options "
                f"(see the format's class for its fields)."
            ) from None

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, not tuples) that :meth:`from_dict` turns back into this config."""
        out = dataclasses.asdict(self)
        out["skip_layers"] = list(self.skip_layers)
        if self.first_batch_divisors is not None:
            out["first_batch_divisors"] = list(self.first_batch_divisors)
        if self.static_scales is not None:
            out["static_scales"] = {int(k): list(v) for k, v in self.static_scales.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVCacheConfig:
        """Build from a dict (e.g. ``to_dict()`` output, a JSON record or a Hydra DictConfig), its keys
        and values checked by the one parser of a KV setting (:func:`nvfp4kv.config.kv.kv_values`)."""
        if not isinstance(data, Mapping):  # DictConfig is a Mapping too
            raise ConfigError(f"KVCacheConfig.from_dict needs a mapping; got {type(data).__name__}. Pass a dict of "
                              f"KVCacheConfig fields, e.g. {{'k_format': 'nvfp4', 'v_format': 'nvfp4'}}.")
        return cls(**kv_values(data))

    # ------------------------------------------------------------------ naming
    @property
    def label(self) -> str:
        """Short name for tables: ``nvfp4``, ``k-fp8_e4m3/v-nvfp4``, ``nvfp4+res128``.

        Only what differs from the defaults is spelled out (options beyond the KIVI axes, policy,
        windows, skipped layers, read mode), so two configs with the same label store the same bits
        (the backend and the CPU fast path change no bits and are not part of the label).
        """
        k = self.k_format + self._options_suffix("k")
        v = self.v_format + self._options_suffix("v")
        name = k if k == v else f"k-{k}/v-{v}"
        extras = []
        if self.scale_policy != "prefill":
            extras.append(self.scale_policy)
        if self.scale_policy == "static" and self.scale_convention != "decode":
            extras.append(self.scale_convention)
        if self.sink_tokens:
            extras.append(f"sink{self.sink_tokens}")
        if self.residual_length:
            extras.append(f"res{self.residual_length}")
        if self.skip_layers:
            extras.append("skip" + ",".join(str(i) for i in self.skip_layers))
        if self.k_center:
            extras.append("kcenter")
        if self.read_mode != "serving":
            extras.append(self.read_mode)
        if self.nonfinite != "raise":
            extras.append(f"{self.nonfinite}nonfinite")  # mapnonfinite / keepnonfinite
        return "+".join([name, *extras])

    def _options_suffix(self, which: Literal["k", "v"]) -> str:
        name = self.k_format if which == "k" else self.v_format
        options = self.k_options if which == "k" else self.v_options
        defaults = default_options(name, which)
        extra = {key: val for key, val in options.items() if defaults.get(key, object()) != val}
        if not extra:
            return ""
        return "(" + ",".join(f"{key}={extra[key]}" for key in sorted(extra)) + ")"
