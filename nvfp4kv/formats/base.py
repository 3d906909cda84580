"""The contract every KV format follows, and the registry that names them.

A format is pure functions and constants (as in torchao's ``mx_formats``): it turns a K or V
tensor laid out ``[B, H, T, D]`` (batch, kv heads, tokens, head_dim) into a dict of packed
*parts* and back. The cache never looks inside the parts; it only needs to know, for each
part, how to concatenate, slice and batch-select it, which this contract fixes:

- every part has dims ``[B, H, t, ...]``: batch first (``index_select`` on dim 0 reorders
  beams), kv heads second, and a token axis at dim 2 whose length ``t`` is ``T`` for
  token-wise parts or ``T // token_group`` for parts shared by a group of tokens (KIVI's
  per-channel key scales). Appending a chunk is ``torch.cat(dim=2)``; cropping to ``n`` tokens
  keeps ``n * t // T`` rows of dim 2.
- a *global scale* (NVFP4's FP32 per-tensor decode scale, FP8's per-tensor or per-head scale)
  lives outside the parts, owned by the cache so that it can be frozen (``prefill`` / ``static``
  policies) or recorded per write (``dynamic``). It is an FP32 tensor broadcastable to
  ``[B, H, T, 1]``: shape ``[1, 1, 1, 1]`` per tensor, ``[1, H, 1, 1]`` per head, or
  ``[1, h, T, 1]`` when recorded per write.

Formats raise :class:`~nvfp4kv.errors.BlockSizeError` when ``D`` is not a multiple of their
block. NaN/Inf follow the ``nonfinite`` policy: ``"raise"`` (default;
:class:`~nvfp4kv.errors.NonFiniteKVError`), ``"map"`` (the format's documented mapping, NaN -> 0,
+-Inf -> +-its limit) or ``"keep"`` (no check, no mapping: whatever the format's arithmetic does
with them; a research option). ``"error"`` is a deprecated alias of ``"raise"``.

Finite in, finite out: for finite input, :meth:`KVFormat.dequantize` never returns Inf in any
output dtype; values beyond the dtype's range saturate at its largest finite value (see
:func:`~nvfp4kv.formats.numerics.saturate_`). Codes and scales of in-range inputs are not
affected by this.

A format owns everything that depends on *which* format it is, so nothing outside its module
branches on its name: its kernels (:class:`FormatKernels`, lazy import paths, so this package
imports without Triton), its default options for K and V (:attr:`KVFormat.default_options`) and
the static-scale conventions it understands (:meth:`KVFormat.static_decode_scale`).
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch

from nvfp4kv.errors import BlockSizeError, ConfigError, NonFiniteKVError, UnknownFormatError
from nvfp4kv.formats.numerics import has_nonfinite

NonFinitePolicy = Literal["raise", "map", "keep"]
#: every accepted ``nonfinite`` value (``"error"`` is also accepted, as a deprecated alias)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
#: old spellings still accepted, and what they mean now
NONFINITE_ALIASES: dict[str, str] = {"error": "raise"}
Parts = dict[str, torch.Tensor]
#: ``encode(x, dtype) -> (parts, decoded or None)``: see :meth:`KVFormat.step_encoder`
StepEncoder = Callable[[torch.Tensor, "torch.dtype | None"], "tuple[Parts, torch.Tensor | None]"]


def normalize_nonfinite(value: object, *, stacklevel: int = 3) -> str:
    """The canonical ``nonfinite`` policy for ``value``; warns on a deprecated alias.

    Raises ValueError (naming the accepted values) for anything else, so a typo in a sweep
    config cannot silently pick a policy.
    """
    if isinstance(value, str) and value in NONFINITE_ALIASES:
        new = NONFINITE_ALIASES[value]
        warnings.warn(
            f"nonfinite={value!r} is deprecated; use nonfinite={new!r} (same behaviour).",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    if value not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite={value!r} is not supported; use one of {', '.join(NONFINITE_POLICIES)} "
            f"(raise: refuse NaN/Inf; map: NaN -> 0, +-Inf -> +-largest finite; keep: pass them through)."
        )
    return value  # type: ignore[return-value]


KernelSlot = Literal["triton", "flashinfer", "fused_decode"]


@dataclass(frozen=True)
class FormatKernels:
    """Where a format's kernels live, as lazy ``"package.module:attribute"`` import paths.

    Declared on the format class (``kernels = FormatKernels(...)``), next to the reference it
    must match, so adding a format never means editing a table in ``nvfp4kv.kernels`` or
    ``nvfp4kv.cache``. Paths rather than objects: a format module imports on a machine
    without Triton or FlashInfer, and a backend imports a kernel module only when it runs it.
    ``None`` means "no such kernel": the Triton backend then uses the reference (same bits),
    FlashInfer refuses the format, and the fused decode attention falls back to SDPA.

    - ``triton``: an object with ``quantize(fmt, x, global_scale) -> Parts`` and
      ``dequantize(fmt, parts, global_scale, dtype) -> Tensor``, bit-exact with the format's
      own methods (saturation included).
    - ``flashinfer``: a class taking the imported ``flashinfer`` module, whose instances have
      the same two methods (not necessarily bit-exact).
    - ``fused_decode``: a function ``(fmt, parts, global_scale) -> PackedOperand | None`` giving
      the fused decode kernel's view of one side (K or V); None when these parts cannot be
      read (e.g. no global scale).
    """

    triton: str | None = None
    flashinfer: str | None = None
    fused_decode: str | None = None

    def has(self, slot: KernelSlot) -> bool:
        """Whether the format declares a kernel for ``slot`` (imports nothing)."""
        return getattr(self, slot) is not None

    def load(self, slot: KernelSlot) -> Any | None:
        """The object behind ``slot``, imported now (None when the format declares none).

        ImportError propagates: a declared kernel whose module cannot be imported (no Triton)
        is the caller's "backend unavailable" case, not a silent fallback.
        """
        path = getattr(self, slot)
        if path is None:
            return None
        module, _, attribute = path.partition(":")
        if not attribute:
            raise ValueError(f"kernel path {path!r} must be 'package.module:attribute'")
        return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class KVFormat(ABC):
    """A KV storage format, adapted to the cache's ``[B, H, T, D]`` layout.

    Subclasses are frozen dataclasses whose fields are the format's options (for example
    FP8's scale granularity), so a format instance is hashable and printable as config.
    Class attributes (not options) say what the rest of the package needs to know about it:
    :attr:`kernels` and :attr:`default_options`.
    """

    #: this format's kernels (lazy import paths); none by default
    kernels: ClassVar[FormatKernels] = FormatKernels()
    #: options a cache config applies for K (``"k"``) and V (``"v"``) before the user's own,
    #: e.g. KIVI's keys per channel and values per token
    default_options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: :meth:`quantize` and :meth:`dequantize` treat every ``[..., D]`` row on its own (given the
    #: global scale, which broadcasts from the left) and accept any number of leading dims, so
    #: K and V of one write can be encoded as one stacked ``[2, B, H, T, D]`` tensor with the
    #: same bytes (the cache's decode steps do, to halve their per-op overhead). False unless a
    #: format says so; formats whose scales span tokens or heads (KIVI) must leave it False.
    rowwise: ClassVar[bool] = False

    #: registry name, e.g. ``"nvfp4"``
    name: str = "base"
    #: ``"raise"`` (default) refuses NaN/Inf; ``"map"`` applies the format's documented mapping;
    #: ``"keep"`` neither checks nor maps (research only; see the module docstring)
    nonfinite: NonFinitePolicy = "raise"

    def __post_init__(self) -> None:
        """Normalize the NaN/Inf policy (subclasses with their own checks call this first)."""
        policy = normalize_nonfinite(self.nonfinite, stacklevel=5)
        if policy != self.nonfinite:
            object.__setattr__(self, "nonfinite", policy)

    # ---- constants every format declares -------------------------------------------------
    @property
    @abstractmethod
    def block_size(self) -> int:
        """Elements along head_dim that share one scale (1 when no block scale)."""

    @property
    def token_group(self) -> int:
        """Tokens quantized jointly along the token axis; 1 unless scales span tokens."""
        return 1

    @property
    def uses_global_scale(self) -> bool:
        """Whether :meth:`quantize` needs a global (per-tensor or per-head) scale."""
        return False

    @abstractmethod
    def bits_per_element(self, head_dim: int) -> float:
        """Storage bits per K/V element in the token-wise parts (codes + block scales).

        Global scales are a per-layer constant and are not included: the cache reports them
        separately, so the arithmetic tests can check both.
        """

    # ---- the functions -------------------------------------------------------------------
    def global_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The dynamic global scale of ``x`` (FP32, broadcastable to ``[B, H, T, 1]``)."""
        return None

    @abstractmethod
    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        """Encode ``x`` ``[B, H, T, D]`` (any float dtype) to packed parts.

        ``T`` must be a multiple of :attr:`token_group`. When the format uses a global scale
        and none is given, it computes the dynamic one from ``x``.
        """

    @abstractmethod
    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Decode parts back to ``[B, H, T, D]`` in ``dtype``.

        Values beyond ``dtype``'s range saturate at its largest finite value (finite in,
        finite out); a format may return Inf/NaN only for NaN/Inf stored under ``"keep"``.
        """

    # ---- static (calibrated) global scales -------------------------------------------------
    def supports_scale_convention(self, convention: str) -> bool:
        """Whether :meth:`static_decode_scale` understands scales given in ``convention``.

        Every format takes its own decode scale (``"decode"``); a format whose scale other
        libraries spell differently (NVFP4, see :mod:`nvfp4kv.formats.conventions`) adds theirs.
        """
        return convention == "decode"

    def static_decode_scale(self, value: float, convention: str) -> float:
        """A calibrated global scale given in ``convention``, as this format's decode scale."""
        if convention != "decode":
            raise ConfigError(
                f"KV format {self.name!r} takes static scales in the 'decode' convention (its own "
                f"decode scale), not {convention!r}."
            )
        return value

    # ---- the decode-step fast path -----------------------------------------------------------
    def step_encoder(self, global_scale: torch.Tensor | None) -> StepEncoder | None:
        """A function encoding *finite* input with this (frozen) ``global_scale`` in few ops, or
        None when this format (or this scale, or its device) has none.

        Why: a decode step encodes one token per layer, where the cost is the number of tensor
        ops, not their size; constants that depend only on the frozen scale are derived once
        here instead of on every call. The returned ``encode(x, dtype)`` must give exactly
        ``parts = self.quantize(x, global_scale)`` and, when ``dtype`` is not None,
        ``self.dequantize(parts, global_scale, dtype)`` (else None), bit for bit, for every
        finite ``x`` (the caller has applied the NaN/Inf policy, so no check is repeated).
        ``x`` may have any number of leading dims (K and V stacked) and ``global_scale`` must
        broadcast to it from the left, as for :attr:`rowwise` formats. The default: none.
        """
        return None

    # ---- shared checks ---------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise the errors the contract promises, each naming its fix."""
        d = x.shape[-1]
        if d % self.block_size:
            raise BlockSizeError(
                f"KV format {self.name!r} quantizes blocks of {self.block_size} along head_dim, "
                f"but head_dim is {d}. Use a format whose block divides {d} "
                f"(e.g. 'fp8_e4m3'), or keep this layer in BF16 with skip_layers."
            )
        if self.nonfinite == "raise" and has_nonfinite(x):
            raise NonFiniteKVError(
                f"KV format {self.name!r} got NaN/Inf in its input; these formats cannot encode "
                f"them. Fix the model's numerics, or pass nonfinite='map' to apply the "
                f"documented mapping (NaN -> 0, +-Inf -> +-max)."
            )


_REGISTRY: dict[str, Callable[..., KVFormat]] = {}


def register_format(name: str) -> Callable[[Callable[..., KVFormat]], Callable[..., KVFormat]]:
    """Class decorator: make a format constructible by name through :func:`get_format`."""

    def wrap(factory: Callable[..., KVFormat]) -> Callable[..., KVFormat]:
        if name in _REGISTRY:
            raise ValueError(f"KV format {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def format_class(name: str) -> Callable[..., KVFormat]:
    """The registered factory (the format class) for ``name``, for its class attributes."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFormatError(
            f"Unknown KV format {name!r}. Known formats: {', '.join(available_formats())}. "
            f"Pick one of these (Hydra: kv=<name> or kv.k_format=<name>)."
        ) from None


def available_formats() -> list[str]:
    """Names accepted by :func:`get_format`, sorted."""
    return sorted(_REGISTRY)


def get_format(name: str | KVFormat, **options: object) -> KVFormat:
    """Build a registered format by name with its options (a KVFormat passes through)."""
    if isinstance(name, KVFormat):
        return name
    return format_class(name)(**options)
