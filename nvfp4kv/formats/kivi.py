"""``int4`` / ``int2``: KIVI-style asymmetric integer quantization (a research baseline).

Per group, ``zero = min``, ``scale = (max - min) / (2^bits - 1)``, both stored in FP16 (option
``scale_dtype``, default ``"float16"`` as in KIVI; ``"float32"`` for values beyond FP16's
range), and ``code = clamp(round_half_even((x - zero) / scale), 0, 2^bits - 1)``;
``x_hat = code * scale + zero``. The codes are computed against the *stored* (FP16-rounded)
scale and zero, so encoding and decoding see the same numbers. FP16 scale/zero saturate at
+-65504 rather than overflow to Inf.

Groups (option ``axis``):

- ``"token"`` (KIVI's values): ``group_size`` consecutive elements of one token along
  head_dim; parts ``scale``/``zero`` ``[B, H, T, D/group_size]``. ``group_size`` must divide
  head_dim.
- ``"channel"`` (KIVI's keys, whose outliers live in fixed channels): ``group_size``
  consecutive *tokens* of one channel; parts ``scale``/``zero`` ``[B, H, T/group_size, D]``,
  so the format's ``token_group`` is ``group_size`` and ``T`` must be a multiple of it (the
  cache keeps the remainder in its full-precision residual window).

Codes are packed along head_dim, little end first: int4 two per byte (even element in the low
nibble), int2 four per byte (element ``4i+k`` in bits ``2k..2k+1``). Storage per element:
``bits + 2 * 16 / group_size`` with FP16 scale/zero (4.5 for int4 with groups of 64), on
either axis (per channel, one scale/zero pair is amortized over ``group_size`` tokens).

A constant group (``max == min``) has scale 0: codes 0, decoded exactly as ``zero``.
Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-(largest finite ``|x|`` in
the tensor); with ``"keep"`` nothing is checked or mapped: a NaN makes its group's scale and
zero NaN, an Inf saturates its group's scale (FP16: 65504).

Finite in, finite out: ``code * scale + zero`` can exceed the output dtype's range (FP16
input near 65504 with FP16 scales), so :meth:`KIVIFormat.dequantize` saturates at the dtype's
largest finite value; the pure :func:`dequantize_kivi` is the plain arithmetic.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from nvfp4kv.errors import BlockSizeError
from nvfp4kv.formats.base import KVFormat, Parts, register_format
from nvfp4kv.formats.numerics import divide, finite_abs, has_nonfinite, map_nonfinite, saturate_

KiviAxis = Literal["token", "channel"]
ScaleDtype = Literal["float16", "float32"]
_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-wide codes (2 or 4) into uint8 along the last dim, element 0 lowest."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"pack_bits({bits}) needs a last dim divisible by {per_byte}")
    codes = codes.to(torch.uint8)
    packed = torch.zeros(
        (*codes.shape[:-1], codes.shape[-1] // per_byte), dtype=torch.uint8, device=codes.device
    )
    mask = (1 << bits) - 1
    for k in range(per_byte):
        packed |= (codes[..., k::per_byte] & mask) << (bits * k)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    fields = [(packed >> (bits * k)) & mask for k in range(per_byte)]
    return torch.stack(fields, dim=-1).flatten(-2)


def _to_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``t`` to the storage dtype, saturating instead of overflowing to Inf."""
    finfo = torch.finfo(dtype)
    return t.clamp(finfo.min, finfo.max).to(dtype)


def _grouped(x: torch.Tensor, axis: KiviAxis, group_size: int) -> tuple[torch.Tensor, int]:
    """View ``x`` ``[..., T, D]`` so that each group lies along one dim; returns (view, dim)."""
    *lead, t, d = x.shape
    if axis == "token":
        return x.reshape(*lead, t, d // group_size, group_size), -1
    return x.reshape(*lead, t // group_size, group_size, d), -2


def quantize_kivi(
    x: torch.Tensor,
    bits: int,
    axis: KiviAxis = "token",
    group_size: int = 32,
    scale_dtype: ScaleDtype = "float16",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode finite ``x`` ``[..., T, D]``: returns ``(codes, scale, zero)``.

    ``codes`` uint8 ``[..., T, D * bits / 8]``; ``scale``/``zero`` in ``scale_dtype``, shaped
    ``[..., T, D/group_size]`` (token axis) or ``[..., T/group_size, D]`` (channel axis).
    """
    qmax = (1 << bits) - 1
    storage = _SCALE_DTYPES[scale_dtype]
    grouped, dim = _grouped(x.float(), axis, group_size)
    low = grouped.amin(dim=dim, keepdim=True)
    high = grouped.amax(dim=dim, keepdim=True)
    zero = _to_storage(low, storage)
    scale = _to_storage(divide(high - low, float(qmax)), storage)
    zero_f, scale_f = zero.float(), scale.float()
    nonzero = scale_f > 0
    ratio = (grouped - zero_f) / torch.where(nonzero, scale_f, torch.ones_like(scale_f))
    codes = torch.where(nonzero, torch.round(ratio).clamp(0, qmax), torch.zeros_like(ratio))
    codes = codes.to(torch.uint8).reshape(x.shape)
    return pack_bits(codes, bits), scale.squeeze(dim), zero.squeeze(dim)


def dequantize_kivi(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    axis: KiviAxis = "token",
    group_size: int = 32,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``code * scale + zero`` (FP32 arithmetic) to ``dtype``."""
    values = unpack_bits(codes, bits).float()
    grouped, dim = _grouped(values, axis, group_size)
    decoded = grouped * scale.float().unsqueeze(dim) + zero.float().unsqueeze(dim)
    return decoded.reshape(values.shape).to(dtype)


@dataclass(frozen=True)
class KIVIFormat(KVFormat):
    """Asymmetric integer K/V; subclasses fix the bit width. Parts: codes, scale, zero.

    A cache config gives keys ``axis="channel"`` and values ``axis="token"`` (KIVI's layout:
    key outliers live in fixed channels) unless the user's options say otherwise.
    """

    default_options = {"k": {"axis": "channel"}, "v": {"axis": "token"}}

    #: ``"token"`` (groups along head_dim) or ``"channel"`` (groups along tokens)
    axis: KiviAxis = "token"
    #: elements per group: along head_dim (token axis) or tokens (channel axis)
    group_size: int = 32
    #: dtype of the stored scale and zero point
    scale_dtype: ScaleDtype = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.axis not in ("token", "channel"):
            raise ValueError(
                f"{self.name} option axis must be 'token' or 'channel', got {self.axis!r}"
            )
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(
                f"{self.name} option group_size must be a positive int, got {self.group_size!r}"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"{self.name} option scale_dtype must be one of {sorted(_SCALE_DTYPES)}, "
                f"got {self.scale_dtype!r}"
            )

    @property
    @abstractmethod
    def bits(self) -> int:
        """Bits per code (4 or 2)."""

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def block_size(self) -> int:
        """What head_dim must be a multiple of: the group (token axis) or the packing width."""
        return self.group_size if self.axis == "token" else self.codes_per_byte

    @property
    def token_group(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    def bits_per_element(self, head_dim: int) -> float:
        scale_bits = torch.finfo(_SCALE_DTYPES[self.scale_dtype]).bits
        return self.bits + 2.0 * scale_bits / self.group_size

    def check_input(self, x: torch.Tensor) -> None:
        d = x.shape[-1]
        if self.axis == "token" and (d % self.group_size or self.group_size % self.codes_per_byte):
            raise BlockSizeError(
                f"KV format {self.name!r} (axis='token') quantizes groups of {self.group_size} "
                f"along head_dim, but head_dim is {d}. Set group_size to a divisor of {d} that "
                f"is a multiple of {self.codes_per_byte}, or use axis='channel'."
            )
        if x.shape[-2] % self.token_group:
            raise ValueError(
                f"KV format {self.name!r} (axis='channel') quantizes groups of {self.group_size} "
                f"tokens, but got {x.shape[-2]} tokens. Pass a multiple of {self.group_size} "
                f"tokens (the cache keeps the rest in its residual window)."
            )
        super().check_input(x)

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self.check_input(x)
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, finite_abs(x).amax())
        codes, scale, zero = quantize_kivi(
            x, self.bits, self.axis, self.group_size, self.scale_dtype
        )
        return {"codes": codes, "scale": scale, "zero": zero}

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return saturate_(dequantize_kivi(
            parts["codes"],
            parts["scale"],
            parts["zero"],
            self.bits,
            self.axis,
            self.group_size,
            dtype,
        ))


@register_format("int4")
@dataclass(frozen=True)
class Int4Format(KIVIFormat):
    """4-bit KIVI-style integer K/V."""

    name: str = field(default="int4", init=False)

    @property
    def bits(self) -> int:
        return 4


@register_format("int2")
@dataclass(frozen=True)
class Int2Format(KIVIFormat):
    """2-bit KIVI-style integer K/V."""

    name: str = field(default="int2", init=False)

    @property
    def bits(self) -> int:
        return 2
