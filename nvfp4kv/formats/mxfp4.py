"""``mxfp4``: OCP Microscaling MXFP4 (OCP MX spec v1.0).

Per 32 elements one E8M0 scale (a power of two; byte = exponent + 127, 255 = NaN), elements
E2M1; no tensor scale. The shared exponent is ``floor(log2(block_amax)) - 2`` (2 is E2M1's
largest exponent), clamped to E8M0's finite range ``[-127, 127]``. Elements are
``rne_e2m1(x / 2^X)`` with saturation: because the exponent only looks at the binade of the
block max, ``block_amax / 2^X`` lies in ``[4, 8)`` and values above 6 are clipped to 6 (the
accuracy cost that NVFP4's finer FP8 scale avoids).

``floor(log2(.))`` is read from the FP32 exponent with ``torch.frexp`` (exact, subnormals
included), not from a transcendental ``log2``, so kernels reproduce it with integer ops.

An all-zero block (``log2(0) = -inf``) takes the smallest scale, byte 0 (``2^-127``), with zero
codes; the spec leaves it open, and any scale decodes zeros to zeros. Blocks whose max is
below ``2^-125`` also get the smallest scale. Non-finite input with ``nonfinite="map"``:
NaN -> 0, +-Inf -> +-(largest finite ``|x|`` in the tensor); with ``"keep"`` NaN encodes as
0 and Inf as +-6 at its block's scale (scales come from the finite values).

Finite in, finite out: :meth:`MXFP4Format.dequantize` saturates outputs beyond the output
dtype's range at its largest finite value; the pure :func:`dequantize_mxfp4` is the plain
arithmetic the kernels reproduce.

Kernels (declared on the class): Triton quantize/dequantize and the fused decode operand in
:mod:`nvfp4kv.kernels.triton_mx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from nvfp4kv.formats.base import FormatKernels, KVFormat, Parts, register_format
from nvfp4kv.formats.e2m1 import decode_packed_e2m1, pack_nibbles, rne_e2m1_codes
from nvfp4kv.formats.numerics import exp2_exact, finite_abs, has_nonfinite, map_nonfinite, saturate_

MXFP4_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
E2M1_EMAX = 2
_MIN_EXPONENT, _MAX_EXPONENT = -127, 127


def mxfp4_shared_exponent(block_amax: torch.Tensor) -> torch.Tensor:
    """``clamp(floor(log2(block_amax)) - 2, -127, 127)`` (int32); zero amax -> -127."""
    _, frexp_exponent = torch.frexp(block_amax.float())  # amax = m * 2^k, m in [0.5, 1)
    exponent = frexp_exponent.to(torch.int32) - 1 - E2M1_EMAX
    exponent = torch.where(block_amax > 0, exponent, torch.full_like(exponent, _MIN_EXPONENT))
    return exponent.clamp(_MIN_EXPONENT, _MAX_EXPONENT)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` ``[..., D]`` (``D % 32 == 0``).

    Returns packed codes uint8 ``[..., D/2]`` and E8M0 scale bytes uint8 ``[..., D/32]``.
    """
    xf = x.float()
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    exponent = mxfp4_shared_exponent(finite_abs(blocks).amax(dim=-1, keepdim=True))
    codes = rne_e2m1_codes(blocks / exp2_exact(exponent))
    scale_bytes = (exponent + E8M0_BIAS).to(torch.uint8).squeeze(-1)
    return pack_nibbles(codes.flatten(-2)), scale_bytes


def dequantize_mxfp4(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode ``lut[code] * 2^(byte - 127)``; byte 255 (E8M0 NaN) decodes its block to NaN."""
    values = decode_packed_e2m1(codes)
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    byte = scales.to(torch.int32)
    scale = torch.where(
        byte == E8M0_NAN,
        torch.full((), float("nan"), device=scales.device),
        exp2_exact(byte - E8M0_BIAS),
    ).unsqueeze(-1)
    return (blocks * scale).flatten(-2).to(dtype)


@register_format("mxfp4")
@dataclass(frozen=True)
class MXFP4Format(KVFormat):
    """OCP MXFP4 K/V: parts ``codes`` ``[B,H,T,D/2]`` and ``scales`` ``[B,H,T,D/32]`` (uint8)."""

    kernels = FormatKernels(
        triton="nvfp4kv.kernels.triton_mx:TRITON_MXFP4",
        fused_decode="nvfp4kv.kernels.triton_mx:decode_operand_mxfp4",
    )

    rowwise: ClassVar[bool] = True  # every [..., D] row on its own (see KVFormat.rowwise)
    name: str = field(default="mxfp4", init=False)

    @property
    def block_size(self) -> int:
        return MXFP4_BLOCK

    def bits_per_element(self, head_dim: int) -> float:
        return 4.0 + 8.0 / MXFP4_BLOCK

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self.check_input(x)
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, finite_abs(x).amax())
        codes, scales = quantize_mxfp4(x)
        return {"codes": codes, "scales": scales}

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return saturate_(dequantize_mxfp4(parts["codes"], parts["scales"], dtype))
