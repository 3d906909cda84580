"""Triton FP4 (E2M1) building blocks shared by every FP4 format's kernels.

Layout: one packed code byte holds elements ``2i`` (low nibble) and ``2i+1`` (high nibble),
so the kernels work on *element pairs*: the input is read as one 32-bit word per pair of
BF16/FP16 elements (64-bit for FP32) and the output written as one 32/64-bit word per pair.
A tile is ``[rows, blocks, pairs per block]``, the same shape for input words, code bytes
and output words, so every load and store is contiguous and nothing is reshuffled.

Here: pair loads/stores, the row coordinates, and the one FP4 dequantize kernel, which serves
every FP4 format (only the block-scale decode differs, :data:`SCALE_E4M3_GLOBAL` /
:data:`SCALE_UE8M0_INF` / :data:`SCALE_E8M0_NAN`). With ``satfinite=True`` it saturates like
the formats' ``dequantize`` (finite in, finite out); without it, it is the plain arithmetic of
the pure reference functions. Quantize kernels live with their formats
(:mod:`nvfp4kv.kernels.triton_nvfp4`, :mod:`nvfp4kv.kernels.triton_mx`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvfp4kv.kernels.launch_utils import as_4d, out_kind, row_scalar_view, rows_per_program
from nvfp4kv.kernels.triton_common import bf16_rne_bits, e2m1_decode, e4m3_decode, pow2_bits, satfinite

#: FP4 scale kinds of :func:`_fp4_dequant_kernel`
SCALE_E4M3_GLOBAL = 0  # nvfp4: float(s) * gs
SCALE_UE8M0_INF = 1  # fp4_mx_block16: 2^(byte - 127); byte 255 -> 2^128 = inf
SCALE_E8M0_NAN = 2  # mxfp4: byte 255 is NaN

#: input word kinds (element pairs): BF16 and FP16 pairs in int32, FP32 pairs in int64
IN_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton.jit
def _row_coords(rows, H, T):
    """(b, h, t) of flattened row indices (int64, so huge caches do not overflow)."""
    r = rows.to(tl.int64)
    t = r % T
    bh = r // T
    return bh // H, bh % H, t


@triton.jit
def _unpack_pair(w, IN_KIND: tl.constexpr):
    """FP32 (low, high) elements of a word holding two BF16 / FP16 (int32) or FP32 (int64)."""
    if IN_KIND == 2:
        lo = (w & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif IN_KIND == 0:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pack_pair(lo, hi, OUT_KIND: tl.constexpr):
    """A word holding FP32 ``lo``/``hi`` rounded to the output dtype (0 bf16, 1 fp16, 2 fp32)."""
    if OUT_KIND == 0:
        return (bf16_rne_bits(hi).to(tl.int32) << 16) | (bf16_rne_bits(lo).to(tl.int32) & 0xFFFF)
    elif OUT_KIND == 1:
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        return (hi16 << 16) | (lo16 & 0xFFFF)
    else:
        lo32 = lo.to(tl.int32, bitcast=True).to(tl.int64)
        hi32 = hi.to(tl.int32, bitcast=True).to(tl.int64)
        return (hi32 << 32) | (lo32 & 0xFFFFFFFF)


@triton.jit
def _load_pairs(XW, sx_b, sx_h, sx_t, b, h, t, rmask,
                NB: tl.constexpr, NB_P2: tl.constexpr, HB: tl.constexpr, IN_KIND: tl.constexpr):
    """Input elements of ``[rows, blocks, HB pairs]`` as FP32 (low, high) tiles."""
    blk = tl.arange(0, NB_P2)
    k = tl.arange(0, HB)
    mask = (rmask[:, None] & (blk < NB)[None, :])[:, :, None] & (k < HB)[None, None, :]
    xrow = b * sx_b + h * sx_h + t * sx_t
    w = tl.load(XW + xrow[:, None, None] + (blk[None, :, None] * HB + k[None, None, :]), mask=mask, other=0)
    return _unpack_pair(w, IN_KIND)


@triton.jit
def _store_codes(C, rows, rmask, code_lo, code_hi, NB: tl.constexpr, NB_P2: tl.constexpr, HB: tl.constexpr):
    """Store code bytes ``lo | hi << 4`` of a ``[rows, blocks, HB]`` tile, contiguous per row."""
    blk = tl.arange(0, NB_P2)
    k = tl.arange(0, HB)
    mask = (rmask[:, None] & (blk < NB)[None, :])[:, :, None] & (k < HB)[None, None, :]
    ptr = C + rows.to(tl.int64)[:, None, None] * (NB * HB) + blk[None, :, None] * HB + k[None, None, :]
    tl.store(ptr, (code_lo | (code_hi << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _fp4_dequant_kernel(
    C, sc_b, sc_h, sc_t, S, ss_b, ss_h, ss_t, ss_j, GS, sg_b, sg_h, sg_t, OUTW, H, T, R,
    NB: tl.constexpr, NB_P2: tl.constexpr, HB: tl.constexpr, BLOCK_R: tl.constexpr,
    SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr, SATFINITE: tl.constexpr,
):
    """``e2m1(q) * block_scale`` for every FP4 kind, one output word per code byte."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b, h, t = _row_coords(rows, H, T)
    blk = tl.arange(0, NB_P2)
    k = tl.arange(0, HB)
    bmask = rmask[:, None] & (blk < NB)[None, :]
    m3 = bmask[:, :, None] & (k < HB)[None, None, :]
    crow = b * sc_b + h * sc_h + t * sc_t
    c = tl.load(C + crow[:, None, None] + (blk[None, :, None] * HB + k[None, None, :]), mask=m3, other=0)
    c = c.to(tl.int32)
    sc = tl.load(S + (b * ss_b + h * ss_h + t * ss_t)[:, None] + blk[None, :] * ss_j, mask=bmask, other=0)
    sc = sc.to(tl.int32)
    if SCALE_KIND == 0:
        gs = tl.load(GS + b * sg_b + h * sg_h + t * sg_t, mask=rmask, other=0.0)
        scale = e4m3_decode(sc) * gs[:, None]
    elif SCALE_KIND == 1:  # 2^128 overflows to +inf, as the reference's exp2 does
        scale = tl.where(sc == 255, 0x7F800000, pow2_bits(sc)).to(tl.float32, bitcast=True)
    else:  # E8M0 NaN, torch's canonical NaN bits
        scale = tl.where(sc == 255, 0x7FC00000, pow2_bits(sc)).to(tl.float32, bitcast=True)
    lo = e2m1_decode(c & 15) * scale[:, :, None]
    hi = e2m1_decode(c >> 4) * scale[:, :, None]
    if SATFINITE:
        lo = satfinite(lo, OUT_KIND)
        hi = satfinite(hi, OUT_KIND)
    ptr = OUTW + rows.to(tl.int64)[:, None, None] * (NB * HB) + blk[None, :, None] * HB + k[None, None, :]
    tl.store(ptr, _pack_pair(lo, hi, OUT_KIND), mask=m3)


def as_pair_words(x4: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x4`` viewed as one word per element pair (copied first if its layout forbids that)."""
    if x4.dtype not in IN_KIND:
        raise ValueError(f"Triton quantize reads bf16, fp16 or fp32, not {x4.dtype}")
    if x4.stride(-1) != 1 or x4.storage_offset() % 2 or any(s % 2 for s in x4.stride()[:-1]):
        x4 = x4.contiguous()
    kind = IN_KIND[x4.dtype]
    return x4.view(torch.int64 if kind == 2 else torch.int32), kind


def out_words(out: torch.Tensor) -> torch.Tensor:
    """The contiguous output viewed as one word per element pair."""
    return out.view(torch.int64 if out.dtype == torch.float32 else torch.int32)


def row_scale(
    global_scale: torch.Tensor | float | None, x: torch.Tensor, b: int, h: int, t: int
) -> tuple[torch.Tensor, int, int, int]:
    """Per-row FP32 scale view for ``x`` seen as ``[b, h, t, D]`` (see :func:`as_4d`)."""
    if x.dim() == 4:
        return row_scalar_view(global_scale, b, h, t, x.device)
    gs = torch.as_tensor(1.0 if global_scale is None else global_scale, dtype=torch.float32, device=x.device)
    gs = gs.expand(*x.shape[:-1], 1).reshape(1, 1, -1, 1)
    return row_scalar_view(gs, b, h, t, x.device)


def dequantize_fp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float | None,
    dtype: torch.dtype,
    *,
    block: int,
    scale_kind: int,
    satfinite: bool = False,
) -> torch.Tensor:
    """Decode packed E2M1 codes with per-block scales (any FP4 kind) to ``[..., D]`` in ``dtype``.

    ``satfinite``: saturate at ``dtype``'s largest finite value, as the formats' ``dequantize``.
    """
    c4 = as_4d(codes)
    if c4.stride(-1) != 1:
        c4 = c4.contiguous()
    s4 = as_4d(scales)
    bsz, nh, nt, half_d = c4.shape
    d = half_d * 2
    nb = d // block
    out = torch.empty((*codes.shape[:-1], d), dtype=dtype, device=codes.device)
    rows = bsz * nh * nt
    if rows == 0:
        return out
    if scale_kind == SCALE_E4M3_GLOBAL:
        gs, sg_b, sg_h, sg_t = row_scale(global_scale, codes, bsz, nh, nt)
    else:  # never read: no tensor is built (a host scalar would cost a blocking copy per call)
        gs, sg_b, sg_h, sg_t = s4, 0, 0, 0
    nb_p2 = triton.next_power_of_2(nb)
    block_r = rows_per_program(nb_p2 * block)
    _fp4_dequant_kernel[(triton.cdiv(rows, block_r),)](
        c4, *c4.stride()[:3], s4, *s4.stride(), gs, sg_b, sg_h, sg_t, out_words(out), nh, nt, rows,
        NB=nb, NB_P2=nb_p2, HB=block // 2, BLOCK_R=block_r,
        SCALE_KIND=scale_kind, OUT_KIND=out_kind(dtype), SATFINITE=satfinite, enable_fp_fusion=False,
    )
    return out
