"""Triton NVFP4 quantize / dequantize, bit-exact with :mod:`nvfp4kv.formats.nvfp4`.

Per block: one ``max``, the E4M3 block scale by integer rounding, an IEEE division by the
*rounded* scale times the global scale, threshold-compare E2M1 rounding. Element pairs, tiles
and the shared FP4 dequantize kernel are in :mod:`nvfp4kv.kernels.triton_fp4`.

:data:`TRITON` and :func:`decode_operand` are what :class:`~nvfp4kv.formats.nvfp4.NVFP4Format`
declares as its Triton kernels and fused decode operand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.kernels.launch_utils import as_4d, as_scale, rows_per_program
from nvfp4kv.kernels.packed_operand import ENC_E2M1_E4M3_GLOBAL, PackedOperand
from nvfp4kv.kernels.triton_common import e2m1_rne_code, e4m3_decode, e4m3_rne_code
from nvfp4kv.kernels.triton_fp4 import (
    SCALE_E4M3_GLOBAL,
    _load_pairs,
    _row_coords,
    _store_codes,
    as_pair_words,
    dequantize_fp4,
    row_scale,
)


@triton.jit
def _nvfp4_quant_kernel(
    XW, sx_b, sx_h, sx_t, GS, sg_b, sg_h, sg_t, C, S, H, T, R,
    NB: tl.constexpr, NB_P2: tl.constexpr, BLOCK_R: tl.constexpr, IN_KIND: tl.constexpr,
    MODELOPT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b, h, t = _row_coords(rows, H, T)
    lo, hi = _load_pairs(XW, sx_b, sx_h, sx_t, b, h, t, rmask, NB, NB_P2, 8, IN_KIND)
    gs = tl.load(GS + b * sg_b + h * sg_h + t * sg_t, mask=rmask, other=0.0)

    # block scale: e4m3(min(block_amax / (6 * gs), 448)); gs <= 0 gives ratio 0
    amax = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=2)
    gs6 = gs * 6.0
    pos = gs6 > 0
    ratio = tl.where(pos[:, None], tl.div_rn(amax, tl.where(pos, gs6, 1.0)[:, None]), 0.0)
    if MODELOPT:
        scode = e4m3_rne_code(tl.minimum(tl.maximum(ratio, 0.001953125), 448.0))
        scode = tl.where(ratio == 0, 0x38, scode)
    else:
        scode = e4m3_rne_code(tl.minimum(ratio, 448.0))

    # elements: rne_e2m1(x / (float(s) * gs)); a zero decode scale gives code 0
    dscale = e4m3_decode(scode) * gs[:, None]
    nz = dscale > 0
    den = tl.where(nz, dscale, 1.0)[:, :, None]
    code_lo = tl.where(nz[:, :, None], e2m1_rne_code(tl.div_rn(lo, den)), 0)
    code_hi = tl.where(nz[:, :, None], e2m1_rne_code(tl.div_rn(hi, den)), 0)

    _store_codes(C, rows, rmask, code_lo, code_hi, NB, NB_P2, 8)
    blk = tl.arange(0, NB_P2)
    tl.store(S + rows.to(tl.int64)[:, None] * NB + blk[None, :], scode.to(tl.uint8),
             mask=rmask[:, None] & (blk < NB)[None, :])


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | float, tiny_scale: str = "zero"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`nvfp4kv.formats.nvfp4.quantize_nvfp4` for ``[..., D]`` input.

    Returns contiguous ``(codes [..., D/2], scales [..., D/16])`` uint8. ``x`` must be finite
    (the format maps NaN/Inf before it gets here).
    """
    if x.shape[-1] % 16:
        raise ValueError(f"nvfp4 needs head_dim divisible by 16, got {x.shape[-1]}")
    x4 = as_4d(x)
    bsz, nh, nt, d = x4.shape
    nb = d // 16
    codes = torch.empty((*x.shape[:-1], d // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], nb), dtype=torch.uint8, device=x.device)
    rows = bsz * nh * nt
    if rows == 0:
        return codes, scales
    gs, sg_b, sg_h, sg_t = row_scale(global_scale, x, bsz, nh, nt)
    xw, in_kind = as_pair_words(x4)
    nb_p2 = triton.next_power_of_2(nb)
    block_r = rows_per_program(nb_p2 * 16)
    _nvfp4_quant_kernel[(triton.cdiv(rows, block_r),)](
        xw, *xw.stride()[:3], gs, sg_b, sg_h, sg_t, codes, scales, nh, nt, rows,
        NB=nb, NB_P2=nb_p2, BLOCK_R=block_r, IN_KIND=in_kind, MODELOPT=(tiny_scale == "modelopt"),
        enable_fp_fusion=False,
    )
    return codes, scales


def dequantize_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype,
    *,
    satfinite: bool = False,
) -> torch.Tensor:
    """Triton twin of :func:`nvfp4kv.formats.nvfp4.dequantize_nvfp4` (``satfinite=True``: of
    :meth:`NVFP4Format.dequantize <nvfp4kv.formats.nvfp4.NVFP4Format.dequantize>`)."""
    return dequantize_fp4(codes, scales, global_scale, dtype, block=16, scale_kind=SCALE_E4M3_GLOBAL,
                          satfinite=satfinite)


# ---------------------------------------------------------------------------- what the format declares
class NVFP4Triton:
    """nvfp4's Triton kernels under the backend interface, bit-exact with the format's methods."""

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts:
        gs = fmt.global_scale(x) if global_scale is None else as_scale(global_scale, x)
        codes, scales = quantize_nvfp4(x, gs, fmt.tiny_scale)  # type: ignore[attr-defined]
        return {"codes": codes, "scales": scales}

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if global_scale is None:
            return fmt.dequantize(parts, global_scale, dtype)  # raises the reference's error
        codes = parts["codes"]
        return dequantize_nvfp4(codes, parts["scales"], as_scale(global_scale, codes), dtype, satfinite=True)


TRITON = NVFP4Triton()


def decode_operand(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand | None:
    """nvfp4 parts as the fused decode kernel reads them (None without a global scale)."""
    if global_scale is None:
        return None
    return PackedOperand(ENC_E2M1_E4M3_GLOBAL, parts["codes"], parts["scales"], global_scale, block=16)
