"""Triton FP8 E4M3 quantize / dequantize, bit-exact with :mod:`nvfp4kv.formats.fp8_e4m3`.

``code = e4m3_satfinite(x / scale)`` with the rounding done by integer operations (see
:mod:`nvfp4kv.kernels.triton_common`), ``x_hat = float(code) * scale``. The scale is a
per-row scalar view (per tensor, per head or per token; stride 0 where shared); with
``per_token=True`` the kernel computes each row's ``amax / 448`` itself, as the reference's
``scaling="token"`` does, and returns it. Dequantize with ``satfinite=True`` saturates like the
format's ``dequantize`` (finite in, finite out).

:data:`TRITON` and :func:`decode_operand` are what
:class:`~nvfp4kv.formats.fp8_e4m3.FP8E4M3Format` declares as its Triton kernels and fused
decode operand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.kernels.launch_utils import as_4d, as_scale, out_kind, rows_per_program, store_view
from nvfp4kv.kernels.packed_operand import ENC_E4M3_ROWSCALE, PackedOperand
from nvfp4kv.kernels.triton_common import bf16_rne_bits, e4m3_decode, e4m3_encode_signed, satfinite
from nvfp4kv.kernels.triton_fp4 import _row_coords, row_scale


@triton.jit
def _fp8_quant_kernel(
    X, sx_b, sx_h, sx_t, sx_d, SC, ss_b, ss_h, ss_t, C, SC_OUT, H, T, R,
    D: tl.constexpr, D_P2: tl.constexpr, BLOCK_R: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b, h, t = _row_coords(rows, H, T)
    d = tl.arange(0, D_P2)
    m2 = rmask[:, None] & (d < D)[None, :]
    x = tl.load(X + (b * sx_b + h * sx_h + t * sx_t)[:, None] + d[None, :] * sx_d, mask=m2, other=0.0)
    x = x.to(tl.float32)
    if PER_TOKEN:
        scale = tl.div_rn(tl.max(tl.abs(x), axis=1), 448.0)
        tl.store(SC_OUT + rows.to(tl.int64), scale, mask=rmask)
    else:
        scale = tl.load(SC + b * ss_b + h * ss_h + t * ss_t, mask=rmask, other=0.0)
    nz = scale > 0
    y = tl.div_rn(x, tl.where(nz, scale, 1.0)[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)  # satfinite (+-Inf from a tiny scale too)
    code = tl.where(nz[:, None], e4m3_encode_signed(y), 0)
    tl.store(C + rows.to(tl.int64)[:, None] * D + d[None, :], code.to(tl.uint8), mask=m2)


@triton.jit
def _fp8_dequant_kernel(
    C, sc_b, sc_h, sc_t, sc_d, SC, ss_b, ss_h, ss_t, OUT, H, T, R,
    D: tl.constexpr, D_P2: tl.constexpr, BLOCK_R: tl.constexpr, OUT_KIND: tl.constexpr,
    SATFINITE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b, h, t = _row_coords(rows, H, T)
    d = tl.arange(0, D_P2)
    m2 = rmask[:, None] & (d < D)[None, :]
    c = tl.load(C + (b * sc_b + h * sc_h + t * sc_t)[:, None] + d[None, :] * sc_d, mask=m2, other=0)
    scale = tl.load(SC + b * ss_b + h * ss_h + t * ss_t, mask=rmask, other=0.0)
    vals = e4m3_decode(c.to(tl.int32)) * scale[:, None]
    if SATFINITE:
        vals = satfinite(vals, OUT_KIND)
    ptr = OUT + rows.to(tl.int64)[:, None] * D + d[None, :]
    if OUT_KIND == 0:
        tl.store(ptr, bf16_rne_bits(vals), mask=m2)
    elif OUT_KIND == 1:
        tl.store(ptr, vals.to(tl.float16), mask=m2)
    else:
        tl.store(ptr, vals, mask=m2)


def quantize_fp8_e4m3(
    x: torch.Tensor, scale: torch.Tensor | float | None, *, per_token: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of :func:`nvfp4kv.formats.fp8_e4m3.quantize_fp8_e4m3` (finite ``x``).

    Returns ``(codes uint8 like x, per-token scales [..., 1] or None)``. With ``per_token`` the
    scale is each row's ``amax / 448`` and ``scale`` is ignored.
    """
    x4 = as_4d(x)
    bsz, nh, nt, d = x4.shape
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    token_scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if per_token else None
    rows = bsz * nh * nt
    if rows == 0:
        return codes, token_scale
    if per_token:  # computed in the kernel; no tensor is built for the unused argument
        sc, ss_b, ss_h, ss_t = codes, 0, 0, 0
    else:
        sc, ss_b, ss_h, ss_t = row_scale(scale, x, bsz, nh, nt)
    d_p2 = triton.next_power_of_2(d)
    block_r = rows_per_program(d_p2)
    _fp8_quant_kernel[(triton.cdiv(rows, block_r),)](
        x4, *x4.stride(), sc, ss_b, ss_h, ss_t, codes, token_scale if per_token else codes,
        nh, nt, rows, D=d, D_P2=d_p2, BLOCK_R=block_r, PER_TOKEN=per_token, enable_fp_fusion=False,
    )
    return codes, token_scale


def dequantize_fp8_e4m3(
    codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype, *, satfinite: bool = False
) -> torch.Tensor:
    """Triton twin of :func:`nvfp4kv.formats.fp8_e4m3.dequantize_fp8_e4m3` (``satfinite=True``:
    of the format's ``dequantize``)."""
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    c4 = as_4d(codes)
    bsz, nh, nt, d = c4.shape
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    rows = bsz * nh * nt
    if rows == 0:
        return out
    sc, ss_b, ss_h, ss_t = row_scale(scale, codes, bsz, nh, nt)
    d_p2 = triton.next_power_of_2(d)
    block_r = rows_per_program(d_p2)
    _fp8_dequant_kernel[(triton.cdiv(rows, block_r),)](
        c4, *c4.stride(), sc, ss_b, ss_h, ss_t, store_view(out), nh, nt, rows,
        D=d, D_P2=d_p2, BLOCK_R=block_r, OUT_KIND=out_kind(dtype), SATFINITE=satfinite,
        enable_fp_fusion=False,
    )
    return out


# ---------------------------------------------------------------------------- what the format declares
def _row_scale_of(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The FP32 scale per token row: the stored part for ``scaling="token"``, else the global one."""
    return parts["scale"] if fmt.scaling == "token" else global_scale  # type: ignore[attr-defined]


class FP8Triton:
    """fp8_e4m3's Triton kernels under the backend interface, bit-exact with the format's methods."""

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts:
        if fmt.scaling == "token":  # type: ignore[attr-defined]
            codes, token_scale = quantize_fp8_e4m3(x, None, per_token=True)
            return {"codes": codes, "scale": token_scale}  # type: ignore[dict-item]
        scale = fmt.global_scale(x) if global_scale is None else as_scale(global_scale, x)
        codes, _ = quantize_fp8_e4m3(x, scale)
        return {"codes": codes}

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        scale = _row_scale_of(fmt, parts, global_scale)
        if scale is None:
            return fmt.dequantize(parts, global_scale, dtype)  # raises the reference's error
        codes = parts["codes"]
        return dequantize_fp8_e4m3(codes, as_scale(scale, codes), dtype, satfinite=True)


TRITON = FP8Triton()


def decode_operand(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand | None:
    """fp8_e4m3 parts as the fused decode kernel reads them (None without a scale)."""
    scale = _row_scale_of(fmt, parts, global_scale)
    if scale is None:
        return None
    return PackedOperand(ENC_E4M3_ROWSCALE, parts["codes"], None, scale)
