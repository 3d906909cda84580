"""Triton ``fp4_mx_block16`` (SGLang) and ``mxfp4`` (OCP) quantize, bit-exact with the references.

Both use power-of-two block scales whose exponent comes from the FP32 bit pattern, exactly
as the references take it from ``frexp`` (no transcendental ``log2``, whose last bit would
depend on the device's math library; Triton's ``log2`` is an approximation on GPU):

- ``fp4_mx_block16``: ``ceil(log2(max(amax / 6, 1e-10)))`` = the exponent field, plus one
  unless the ratio is an exact power of two; ``amax / 6`` is an IEEE division.
- ``mxfp4``: ``clamp(floor(log2(amax)) - 2, -127, 127)`` = the exponent field minus 129.

Dequantize is the shared FP4 kernel of :mod:`nvfp4kv.kernels.triton_fp4`.

:data:`TRITON_MX16` / :data:`TRITON_MXFP4` and :func:`decode_operand_mx16` /
:func:`decode_operand_mxfp4` are what the two format classes declare as their Triton kernels
and fused decode operands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.kernels.launch_utils import as_4d, rows_per_program
from nvfp4kv.kernels.packed_operand import ENC_E2M1_POW2, PackedOperand
from nvfp4kv.kernels.triton_common import ceil_log2, e2m1_away_code, e2m1_rne_code, floor_log2, pow2_from_biased
from nvfp4kv.kernels.triton_fp4 import (
    SCALE_E8M0_NAN,
    SCALE_UE8M0_INF,
    _load_pairs,
    _row_coords,
    _store_codes,
    as_pair_words,
    dequantize_fp4,
)

#: FP32 value of the ``1e-10`` floor SGLang puts under ``amax / 6`` (so the ratio is normal)
MX16_MIN_RATIO = float(torch.tensor(1e-10, dtype=torch.float32))


@triton.jit
def _mx_quant_kernel(
    XW, sx_b, sx_h, sx_t, C, S, H, T, R, min_ratio,
    NB: tl.constexpr, NB_P2: tl.constexpr, HB: tl.constexpr, BLOCK_R: tl.constexpr,
    IN_KIND: tl.constexpr, SGLANG: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b, h, t = _row_coords(rows, H, T)
    lo, hi = _load_pairs(XW, sx_b, sx_h, sx_t, b, h, t, rmask, NB, NB_P2, HB, IN_KIND)
    amax = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=2)
    if SGLANG:
        # e = ceil(log2(max(amax / 6, 1e-10))), exactly
        e = ceil_log2(tl.maximum(tl.div_rn(amax, 6.0), min_ratio))
    else:
        # OCP: clamp(floor(log2(amax)) - 2, -127, 127); zero amax -> -127
        e = tl.where(amax > 0, floor_log2(amax) - 2, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
    # x / 2^e == x * 2^-e exactly (same real value, both correctly rounded)
    inv = pow2_from_biased(127 - e)[:, :, None]
    if SGLANG:
        code_lo = e2m1_away_code(lo * inv)
        code_hi = e2m1_away_code(hi * inv)
    else:
        code_lo = e2m1_rne_code(lo * inv)
        code_hi = e2m1_rne_code(hi * inv)
    _store_codes(C, rows, rmask, code_lo, code_hi, NB, NB_P2, HB)
    blk = tl.arange(0, NB_P2)
    tl.store(S + rows.to(tl.int64)[:, None] * NB + blk[None, :], (e + 127).to(tl.uint8),
             mask=rmask[:, None] & (blk < NB)[None, :])


def _quantize_mx(x: torch.Tensor, block: int, sglang: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % block:
        raise ValueError(f"{name} needs head_dim divisible by {block}, got {x.shape[-1]}")
    x4 = as_4d(x)
    bsz, nh, nt, d = x4.shape
    nb = d // block
    codes = torch.empty((*x.shape[:-1], d // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], nb), dtype=torch.uint8, device=x.device)
    rows = bsz * nh * nt
    if rows == 0:
        return codes, scales
    xw, in_kind = as_pair_words(x4)
    nb_p2 = triton.next_power_of_2(nb)
    block_r = rows_per_program(nb_p2 * block)
    _mx_quant_kernel[(triton.cdiv(rows, block_r),)](
        xw, *xw.stride()[:3], codes, scales, nh, nt, rows, MX16_MIN_RATIO,
        NB=nb, NB_P2=nb_p2, HB=block // 2, BLOCK_R=block_r, IN_KIND=in_kind, SGLANG=sglang,
        enable_fp_fusion=False,
    )
    return codes, scales


def quantize_fp4_mx_block16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`nvfp4kv.formats.fp4_mx_block16.quantize_fp4_mx_block16` (finite x)."""
    return _quantize_mx(x, 16, True, "fp4_mx_block16")


def dequantize_fp4_mx_block16(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *, satfinite: bool = False
) -> torch.Tensor:
    """Triton twin of :func:`nvfp4kv.formats.fp4_mx_block16.dequantize_fp4_mx_block16`
    (``satfinite=True``: of the format's ``dequantize``)."""
    return dequantize_fp4(codes, scales, None, dtype, block=16, scale_kind=SCALE_UE8M0_INF, satfinite=satfinite)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`nvfp4kv.formats.mxfp4.quantize_mxfp4` (finite x)."""
    return _quantize_mx(x, 32, False, "mxfp4")


def dequantize_mxfp4(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *, satfinite: bool = False
) -> torch.Tensor:
    """Triton twin of :func:`nvfp4kv.formats.mxfp4.dequantize_mxfp4` (``satfinite=True``: of
    the format's ``dequantize``)."""
    return dequantize_fp4(codes, scales, None, dtype, block=32, scale_kind=SCALE_E8M0_NAN, satfinite=satfinite)


# ---------------------------------------------------------------------------- what the formats declare
@dataclass(frozen=True)
class MXTriton:
    """A power-of-two-scaled FP4 format's Triton kernels under the backend interface."""

    quantize_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dequantize_fn: Callable[..., torch.Tensor]

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts:
        codes, scales = self.quantize_fn(x)
        return {"codes": codes, "scales": scales}

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return self.dequantize_fn(parts["codes"], parts["scales"], dtype, satfinite=True)


TRITON_MX16 = MXTriton(quantize_fp4_mx_block16, dequantize_fp4_mx_block16)
TRITON_MXFP4 = MXTriton(quantize_mxfp4, dequantize_mxfp4)


def decode_operand_mx16(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand:
    """fp4_mx_block16 parts as the fused decode kernel reads them (power-of-two scale per 16)."""
    return PackedOperand(ENC_E2M1_POW2, parts["codes"], parts["scales"], None, block=16)


def decode_operand_mxfp4(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand:
    """mxfp4 parts as the fused decode kernel reads them (E8M0 scale per 32)."""
    return PackedOperand(ENC_E2M1_POW2, parts["codes"], parts["scales"], None, block=32)
