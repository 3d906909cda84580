"""``fp4_mx_block16``: SGLang's ``KVFP4QuantizeUtil`` (PR #10078), reproduced exactly.

Shipped as ``--kv-cache-dtype fp4_e2m1`` and later renamed; it is *not* NVFP4: a power-of-two
scale per 16 elements, no FP8 block scale, no tensor scale, and ties rounded away from zero.

- block scale exponent ``e = ceil(log2(max(block_amax / 6, 1e-10)))``, stored as the byte
  ``e + 127``; so ``|x / 2^e| <= 6`` and nothing is clipped. An all-zero block gets
  ``e = ceil(log2(1e-10)) = -33``, byte 94.
- magnitude code = how many of the bounds ``0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5`` ``|x/2^e|``
  is ``>=`` (ties away from zero: 0.25 -> 0.5, 2.5 -> 3, 5 -> 6); sign bit ``x/2^e < 0`` (so
  -0 -> +0); NaN -> code 0. Nibbles packed as in :mod:`nvfp4kv.formats.e2m1`.
- decode ``lut[code] * 2^(byte - 127)``.

Everything is computed in FP32, as SGLang does under ``torch.compile`` (eager SGLang on BF16
input computes ``block_amax / 6`` and ``log2`` in BF16 and can land one exponent higher).
``ceil(log2(r))`` is taken *exactly*, from the FP32 exponent of ``r`` (``frexp``), not from
a ``log2`` call: this is device-independent and a kernel repeats it with integer ops. It
equals SGLang's ``ceil(torch.log2(r))`` in FP32 for every BF16 and FP16 input (checked
exhaustively over all their finite values in the tests). Only for FP32 input whose
``block_amax / 6`` lies a few FP32 ulps above a power of two does a rounded FP32 ``log2``
return the integer itself, where SGLang keeps the lower exponent (the block max then
encodes as 6 instead of 3 at twice the scale); this reference takes the exact exponent.
The division by 6 is a true IEEE division (see :mod:`nvfp4kv.formats.numerics`).

Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-(largest finite ``|x|`` in
the tensor); the format has no fixed maximum, so Inf takes the largest value the data sets.
NaN elements of a pure :func:`quantize_fp4_mx_block16` call encode as 0 and do not affect their
block's scale (SGLang's ``max`` would propagate NaN into an undefined scale byte); so does
``nonfinite="keep"`` (Inf encodes as +-6 at its block's scale).

Finite in, finite out: rounding up can exceed the input's range (an FP16 57984 has scale 2^14
and rounds to code 4, i.e. 65536, beyond FP16's 65504), so
:meth:`FP4MXBlock16Format.dequantize` saturates outputs at the output dtype's largest finite
value, as a ``satfinite`` conversion does. The pure :func:`dequantize_fp4_mx_block16` is the
plain arithmetic the kernels reproduce (it overflows to Inf there; the kernels saturate too
when they serve the format's own ``dequantize``).

Kernels (declared on the class): Triton quantize/dequantize and the fused decode operand in
:mod:`nvfp4kv.kernels.triton_mx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from nvfp4kv.formats.base import FormatKernels, KVFormat, Parts, register_format
from nvfp4kv.formats.e2m1 import (
    E2M1_BOUNDS,
    E2M1_MAX,
    SIGN_BIT,
    decode_packed_e2m1,
    pack_nibbles,
)
from nvfp4kv.formats.numerics import (
    ceil_log2_exact,
    divide,
    exp2_exact,
    finite_abs,
    has_nonfinite,
    map_nonfinite,
    saturate_,
)

MX16_BLOCK = 16
EXPONENT_BIAS = 127
#: the floor SGLang puts under ``block_amax / 6`` before ``log2``
MIN_SCALE_RATIO = 1e-10


def away_e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """4-bit codes of ``y`` with ties rounded away from zero (SGLang's threshold count)."""
    y = y.float()
    a = y.abs()
    magnitude = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for bound in E2M1_BOUNDS:
        magnitude += (a >= bound).to(torch.uint8)
    return ((y < 0).to(torch.uint8) * SIGN_BIT) | magnitude


def mx16_block_exponent(block_amax: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(max(block_amax / 6, 1e-10)))`` (int32), exactly (see module docstring)."""
    ratio = torch.clamp(divide(block_amax, E2M1_MAX), min=MIN_SCALE_RATIO)
    return ceil_log2_exact(ratio)


def quantize_fp4_mx_block16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` ``[..., D]`` (``D % 16 == 0``).

    Returns ``(codes, scales)``: packed codes uint8 ``[..., D/2]`` and exponent bytes uint8
    ``[..., D/16]`` (``e + 127``).
    """
    xf = x.float()
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // MX16_BLOCK, MX16_BLOCK)
    block_amax = finite_abs(blocks).amax(dim=-1, keepdim=True)
    exponent = mx16_block_exponent(block_amax)
    codes = away_e2m1_codes(blocks / exp2_exact(exponent))
    scale_bytes = (exponent + EXPONENT_BIAS).to(torch.uint8).squeeze(-1)
    return pack_nibbles(codes.flatten(-2)), scale_bytes


def dequantize_fp4_mx_block16(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode: ``lut[code] * 2^(byte - 127)``."""
    values = decode_packed_e2m1(codes)
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // MX16_BLOCK, MX16_BLOCK)
    scale = exp2_exact(scales.to(torch.int32) - EXPONENT_BIAS).unsqueeze(-1)
    return (blocks * scale).flatten(-2).to(dtype)


@register_format("fp4_mx_block16")
@dataclass(frozen=True)
class FP4MXBlock16Format(KVFormat):
    """SGLang block-16 FP4 K/V: uint8 ``codes`` ``[B,H,T,D/2]`` and ``scales`` ``[B,H,T,D/16]``."""

    kernels = FormatKernels(
        triton="nvfp4kv.kernels.triton_mx:TRITON_MX16",
        fused_decode="nvfp4kv.kernels.triton_mx:decode_operand_mx16",
    )

    rowwise: ClassVar[bool] = True  # every [..., D] row on its own (see KVFormat.rowwise)
    name: str = field(default="fp4_mx_block16", init=False)

    @property
    def block_size(self) -> int:
        return MX16_BLOCK

    def bits_per_element(self, head_dim: int) -> float:
        return 4.0 + 8.0 / MX16_BLOCK

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self.check_input(x)
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, finite_abs(x).amax())
        codes, scales = quantize_fp4_mx_block16(x)
        return {"codes": codes, "scales": scales}

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return saturate_(dequantize_fp4_mx_block16(parts["codes"], parts["scales"], dtype))
