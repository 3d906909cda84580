"""Fused decode attention that reads the packed KV cache directly (Triton, split-K).

One query token per sequence (``q: [B, Hq, 1, D]``) attends over

- the *packed* tokens of a cache layer (NVFP4, ``fp4_mx_block16``, MXFP4 or FP8 codes plus
  their scales), dequantized tile by tile in registers, never materialized in memory, and
- optional *raw* extra tokens kept in full precision (attention sinks, a residual window),
  passed as separate ``[B, Hkv, E, D]`` tensors with their logical positions.

Design: decode attention is memory-bound, and NVFP4 K/V is 0.28x the bytes of BF16. The
kernel is flash-decoding: the token axis is split over many programs (one program handles
all query heads of one KV head, so GQA reads each K/V tile once), each keeps a running
max/sum, the next tile's bytes are fetched before the current one is decoded, and a small
second kernel merges the partial results. Measured on an H100 (``results/bench/
kernels_cuda.json``) it is not yet faster than BF16 SDPA (about 1.0x at 1K-8K tokens, 1.2x at
32K, 1.35x at 128K, in CUDA graphs): the per-element decode arithmetic, not memory, bounds
it. What it does buy is memory: no dequantized copy of the cache (+1 MiB transient at 32K
tokens instead of +128 MiB for dequantize-then-SDPA, which it also beats by 1.8x).

Why it matches dequantize + SDPA: every K/V element is decoded with the reference's exact
arithmetic (``e2m1 * (float(s) * gs)`` for NVFP4) and rounded to the query dtype like the
reference's ``dequantize(..., dtype)``, so the only differences from ``SDPA(q, K̂, V̂)`` are
summation order and the softmax weights being rounded to the query dtype before ``P @ V``
(as in FlashAttention). Tests bound the difference (``DECODE_ATOL``).

Masks: an additive mask over *logical* token positions (``[B, 1 or Hq, T_total]``, what a
transformers 4-D mask becomes) and/or a per-batch first valid position (left padding).
Packed token ``n`` sits at logical position ``packed_start + n``; raw token ``e`` at
``raw_positions[e]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nvfp4kv.kernels.triton_common import e4m3_decode, pow2_from_biased, to_bf16

#: operand kinds understood by the kernel (constexpr switch)
KIND_NVFP4 = 0  # E2M1 codes, E4M3 scale per 16, FP32 global scale
KIND_MX16 = 1  # E2M1 codes, UE8M0 scale per 16 (fp4_mx_block16)
KIND_MXFP4 = 2  # E2M1 codes, E8M0 scale per 32 (OCP MXFP4)
KIND_FP8 = 3  # E4M3 byte per element, FP32 global scale
KIND_NAMES = {KIND_NVFP4: "nvfp4", KIND_MX16: "fp4_mx_block16", KIND_MXFP4: "mxfp4", KIND_FP8: "fp8_e4m3"}

#: documented agreement with dequantize + SDPA (fp32 math on the rounded K/V), per dtype
DECODE_ATOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PackedOperand:
    """One side (K or V) of a packed cache layer, in the layout the kernel reads.

    ``codes``: uint8 ``[B, H, T, D/2]`` (FP4 kinds) or ``[B, H, T, D]`` (FP8 bytes);
    ``scales``: uint8 ``[B, H, T, D/block]`` or None (FP8); ``global_scale``: FP32
    broadcastable to ``[B, H, T, 1]`` or None (MX kinds).
    """

    kind: int
    codes: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    def head_dim(self) -> int:
        return int(self.codes.shape[-1]) * (1 if self.kind == KIND_FP8 else 2)


def _row_scale_arg(op: PackedOperand, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """The operand's FP32 global scale and its (b, h, t) strides, 0 where broadcast.

    Computed from the tensor's own shape, without creating views (host overhead matters at
    decode: this runs once per layer per token).
    """
    gs = op.global_scale
    if gs is None:
        return fallback, 0, 0, 0
    if gs.dtype != torch.float32:
        gs = gs.float()
    if gs.dim() < 4:
        gs = gs.reshape((1,) * (4 - gs.dim()) + tuple(gs.shape))
    st = [0 if gs.shape[i] == 1 else gs.stride(i) for i in range(3)]
    return gs, st[0], st[1], st[2]


def _scale_arg(op: PackedOperand) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    if op.scales is None:  # FP8: a dummy pointer that is never read
        return op.codes, (0, 0, 0, 0)
    s = op.scales if op.scales.dtype == torch.uint8 else op.scales.view(torch.uint8)
    return s, (s.stride(0), s.stride(1), s.stride(2), s.stride(3))


def _codes_arg(op: PackedOperand) -> torch.Tensor:
    """Codes as uint8 with a unit stride along the last dim (what the kernel's loads assume)."""
    c = op.codes if op.codes.dtype == torch.uint8 else op.codes.view(torch.uint8)
    return c if c.stride(-1) == 1 else c.contiguous()


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs the split-K grid aims for: ~4 waves of SMs on GPU, few on CPU."""
    if device.type == "cuda":
        return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # interpreter: few programs keep CPU tests fast while still splitting


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    """Round an FP32 tile to the dot operand dtype, RNE everywhere.

    ``DOT``: 0 bf16, 1 fp16, 2 fp32, 3 bf16 *values* held in FP32. Mode 3 is for the CPU
    interpreter, whose ``tl.dot`` multiplies BF16 tensors as raw uint16 storage (and whose
    BF16 cast truncates): the operands are rounded to BF16 exactly as on GPU, then
    multiplied in FP32.
    """
    if DOT == 0:
        return x.to(tl.bfloat16)  # cvt.rn: round to nearest even on GPU
    elif DOT == 1:
        return x.to(tl.float16)
    elif DOT == 3:
        return to_bf16(x).to(tl.float32)
    else:
        return x


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    if DOT >= 2:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fetch(
    C, S, GS, b, h, tok, tmask, sc_b, sc_h, sc_t, ss_b, ss_h, ss_t, ss_j, sg_b, sg_h, sg_t,
    KIND: tl.constexpr, HB: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    """Load the raw bytes of a tile of packed tokens: (codes, scale bytes, global scales).

    FP4 kinds: codes ``[tokens, blocks, HB bytes]`` and scale bytes ``[tokens, blocks]``; FP8:
    codes ``[tokens, D_PAD]``. Out-of-range tokens and padding load as zeros, which decode to
    zeros (so no masking is needed later).
    """
    tok64 = tok.to(tl.int64)
    if KIND == 0 or KIND == 3:
        g = tl.load(GS + b * sg_b + h * sg_h + tok64 * sg_t, mask=tmask, other=0.0)
    else:
        g = tl.zeros(tok.shape, dtype=tl.float32)
    if KIND == 3:
        d = tl.arange(0, D_PAD)
        c = tl.load(C + (b * sc_b + h * sc_h + tok64 * sc_t)[:, None] + d[None, :],
                    mask=tmask[:, None] & (d < D)[None, :], other=0)
        sc = g
    else:
        blk = tl.arange(0, D_PAD // (2 * HB))
        k = tl.arange(0, HB)
        bmask = tmask[:, None] & (blk < D // (2 * HB))[None, :]
        c = tl.load(
            C + (b * sc_b + h * sc_h + tok64 * sc_t)[:, None, None] + (blk[None, :, None] * HB + k[None, None, :]),
            mask=bmask[:, :, None] & (k < HB)[None, None, :], other=0,
        )
        sc = tl.load(S + (b * ss_b + h * ss_h + tok64 * ss_t)[:, None] + blk[None, :] * ss_j, mask=bmask, other=0)
    return c, sc, g


@triton.jit
def _e2m1_pair_fp16(c):
    """Both nibbles of code bytes as FP32 values scaled by 2^-14, from FP16 bit patterns.

    An E2M1 code ``s e1 e0 m`` placed at FP16 bit 15 / bits 10-11 / bit 9 is an FP16 number
    worth exactly ``e2m1 * 2^-14`` (code 1 lands on the FP16 subnormal 2^-15, code 8 on -0.0),
    so one shift-and-mask per nibble replaces a table lookup; FP16 -> FP32 is exact.
    """
    ci = c.to(tl.int32)
    w = ((ci & 0x07) << 9) | ((ci & 0x08) << 12) | ((ci & 0x70) << 21) | ((ci & 0x80) << 24)
    lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _decode(c, sc, g, KIND: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT: tl.constexpr):
    """A fetched tile as ``[BLOCK_N, D_PAD]`` values in natural element order, dot dtype.

    Values are the reference's exactly (``e2m1 * (float(s) * gs)`` for NVFP4), then rounded to the dot dtype like the reference's ``dequantize(..., dtype)``. FP4's low
    and high nibbles are interleaved back with ``join`` + ``reshape``.
    """
    if KIND == 3:
        return _to_dot(e4m3_decode(c.to(tl.int32)) * g[:, None], DOT)
    else:
        sci = sc.to(tl.int32)
        lo, hi = _e2m1_pair_fp16(c)
        if KIND == 0:
            scale = (e4m3_decode(sci) * g[:, None])[:, :, None]  # float(s) * gs
        else:
            scale = pow2_from_biased(sci)[:, :, None]
        # undo the 2^-14 first (exact), then one rounding: e2m1 * scale as the reference
        lo = (lo * 16384.0) * scale
        hi = (hi * 16384.0) * scale
        return tl.reshape(tl.join(_to_dot(lo, DOT), _to_dot(hi, DOT)), [BLOCK_N, D_PAD])


@triton.jit
def _attend(
    q, k, v, pos, tmask, m_i, l_i, acc,
    MASK, b, hq, gmask, sm_b, sm_h, sm_t, start_b, qk_scale_log2,
    HAS_MASK: tl.constexpr, HAS_START: tl.constexpr, DOT: tl.constexpr,
):
    """One online-softmax step over a tile of tokens (scores in log2 units)."""
    s = _dot(q, tl.trans(k), DOT) * qk_scale_log2
    valid = tmask[None, :] & gmask[:, None]
    if HAS_MASK:
        madd = tl.load(MASK + b * sm_b + hq[:, None] * sm_h + pos.to(tl.int64)[None, :] * sm_t, mask=valid, other=0.0)
        s = s + madd * 1.4426950408889634
    if HAS_START:
        valid = valid & (pos[None, :] >= start_b)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(_to_dot(p, DOT), v, DOT)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, sq_b, sq_h, sq_d,
    KC, skc_b, skc_h, skc_t, KS, sks_b, sks_h, sks_t, sks_j, KG, skg_b, skg_h, skg_t,
    VC, svc_b, svc_h, svc_t, VS, svs_b, svs_h, svs_t, svs_j, VG, svg_b, svg_h, svg_t,
    RK, srk_b, srk_h, srk_t, srk_d, RV, srv_b, srv_h, srv_t, srv_d, RPOS,
    MASK, sm_b, sm_h, sm_t, START, PART,
    Hkv, G, Tp, E, packed_start, tok_per_split, NS_PACKED, NS, qk_scale_log2,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, G_PAD: tl.constexpr,
    K_KIND: tl.constexpr, V_KIND: tl.constexpr, K_HB: tl.constexpr, V_HB: tl.constexpr,
    DOT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_START: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    g = tl.arange(0, G_PAD)
    gmask = g < G
    hq = hk * G + g
    d = tl.arange(0, D_PAD)
    qm = gmask[:, None] & (d < D)[None, :]
    q = tl.load(Q + b * sq_b + hq[:, None] * sq_h + d[None, :] * sq_d, mask=qm, other=0.0)
    q = _to_dot(q.to(tl.float32), DOT)

    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    start_b = 0
    if HAS_START:
        start_b = tl.load(START + b)

    if split < NS_PACKED:
        lo = split * tok_per_split
        hi = tl.minimum(lo + tok_per_split, Tp)
        if PREFETCH:
            # software pipelining by hand: the next tile's bytes are requested before the
            # current tile is decoded, so memory latency overlaps the decode arithmetic
            tok = lo + tl.arange(0, BLOCK_N)
            tmask = tok < hi
            kc, ks, kg = _fetch(KC, KS, KG, b, hk, tok, tmask, skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, sks_j,
                                skg_b, skg_h, skg_t, K_KIND, K_HB, D, D_PAD)
            vc, vs, vg = _fetch(VC, VS, VG, b, hk, tok, tmask, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, svs_j,
                                svg_b, svg_h, svg_t, V_KIND, V_HB, D, D_PAD)
            for n0 in range(lo, hi, BLOCK_N):
                tok_next = n0 + BLOCK_N + tl.arange(0, BLOCK_N)
                mask_next = tok_next < hi
                kc_n, ks_n, kg_n = _fetch(KC, KS, KG, b, hk, tok_next, mask_next, skc_b, skc_h, skc_t, sks_b, sks_h,
                                          sks_t, sks_j, skg_b, skg_h, skg_t, K_KIND, K_HB, D, D_PAD)
                vc_n, vs_n, vg_n = _fetch(VC, VS, VG, b, hk, tok_next, mask_next, svc_b, svc_h, svc_t, svs_b, svs_h,
                                          svs_t, svs_j, svg_b, svg_h, svg_t, V_KIND, V_HB, D, D_PAD)
                tok = n0 + tl.arange(0, BLOCK_N)
                m_i, l_i, acc = _attend(q, _decode(kc, ks, kg, K_KIND, BLOCK_N, D_PAD, DOT),
                                        _decode(vc, vs, vg, V_KIND, BLOCK_N, D_PAD, DOT), packed_start + tok,
                                        tok < hi, m_i, l_i, acc, MASK, b, hq, gmask, sm_b, sm_h, sm_t, start_b,
                                        qk_scale_log2, HAS_MASK, HAS_START, DOT)
                kc, ks, kg, vc, vs, vg = kc_n, ks_n, kg_n, vc_n, vs_n, vg_n
        else:
            for n0 in range(lo, hi, BLOCK_N):
                tok = n0 + tl.arange(0, BLOCK_N)
                tmask = tok < hi
                kc, ks, kg = _fetch(KC, KS, KG, b, hk, tok, tmask, skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, sks_j,
                                    skg_b, skg_h, skg_t, K_KIND, K_HB, D, D_PAD)
                vc, vs, vg = _fetch(VC, VS, VG, b, hk, tok, tmask, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, svs_j,
                                    svg_b, svg_h, svg_t, V_KIND, V_HB, D, D_PAD)
                m_i, l_i, acc = _attend(q, _decode(kc, ks, kg, K_KIND, BLOCK_N, D_PAD, DOT),
                                        _decode(vc, vs, vg, V_KIND, BLOCK_N, D_PAD, DOT), packed_start + tok,
                                        tmask, m_i, l_i, acc, MASK, b, hq, gmask, sm_b, sm_h, sm_t, start_b,
                                        qk_scale_log2, HAS_MASK, HAS_START, DOT)
    else:
        for n0 in range(0, E, BLOCK_N):
            tok = n0 + tl.arange(0, BLOCK_N)
            tmask = tok < E
            pos = tl.load(RPOS + tok, mask=tmask, other=0)
            m2 = tmask[:, None] & (d < D)[None, :]
            tok64 = tok.to(tl.int64)
            k = tl.load(RK + b * srk_b + hk * srk_h + tok64[:, None] * srk_t + d[None, :] * srk_d, mask=m2, other=0.0)
            v = tl.load(RV + b * srv_b + hk * srv_h + tok64[:, None] * srv_t + d[None, :] * srv_d, mask=m2, other=0.0)
            m_i, l_i, acc = _attend(q, _to_dot(k.to(tl.float32), DOT), _to_dot(v.to(tl.float32), DOT), pos, tmask,
                                    m_i, l_i, acc, MASK, b, hq, gmask, sm_b, sm_h, sm_t, start_b, qk_scale_log2,
                                    HAS_MASK, HAS_START, DOT)

    # partial results, one row of D + 2 floats per (batch, query head, split): acc, max, sum
    row = (b * Hkv * G + hq).to(tl.int64) * NS + split
    out = PART + row[:, None] * (D + 2)
    tl.store(out + d[None, :], acc, mask=qm)
    tl.store(PART + row * (D + 2) + D, m_i, mask=gmask)
    tl.store(PART + row * (D + 2) + D + 1, l_i, mask=gmask)


@triton.jit
def _combine_kernel(
    PART, OUT, so_b, so_h, so_d, Hq, NS,
    D: tl.constexpr, D_PAD: tl.constexpr, NS_PAD: tl.constexpr, OUT_KIND: tl.constexpr,
):
    """Merge the split partials of one (batch, query head); 0 where every token is masked."""
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    s = tl.arange(0, NS_PAD)
    smask = s < NS
    d = tl.arange(0, D_PAD)
    dmask = d < D
    row = (pid.to(tl.int64) * NS + s) * (D + 2)
    m = tl.load(PART + row + D, mask=smask, other=-1.0e30)
    lsum = tl.load(PART + row + D + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    acc = tl.load(PART + row[:, None] + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(lsum * w, axis=0)
    o = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    ptr = OUT + b * so_b + h * so_h + d * so_d
    if OUT_KIND == 0:
        tl.store(ptr, to_bf16(o), mask=dmask)
    elif OUT_KIND == 1:
        tl.store(ptr, o.to(tl.float16), mask=dmask)
    else:
        tl.store(ptr, o, mask=dmask)


_DTYPE_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _half_block(kind: int) -> int:
    """Bytes of packed codes per scale block: 16 for MXFP4 (32 elements), else 8."""
    return 16 if kind == KIND_MXFP4 else 8


def _dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    """Dot operand mode for ``_to_dot``: BF16 is emulated in FP32 under the interpreter."""
    mode = _DTYPE_KIND[dtype]
    return 3 if (mode == 0 and device.type != "cuda") else mode


def _additive_mask(
    attn_mask: torch.Tensor | None, batch: int, hq: int, total: int, device: torch.device
) -> torch.Tensor | None:
    """Normalize a mask to additive FP32 ``[B, 1|Hq, T_total]`` (bool True = attend)."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dim() == 4:  # transformers [B, 1|H, q_len=1, kv_len]
        m = m[:, :, -1, :]
    elif m.dim() == 2:  # [B, kv_len] padding mask, 1 = attend
        m = m[:, None, :].bool() if m.dtype != torch.bool else m[:, None, :]
    if m.shape[-1] < total:
        raise ValueError(f"attention mask covers {m.shape[-1]} tokens but the cache holds {total}")
    if m.shape[1] not in (1, hq):
        raise ValueError(f"attention mask has {m.shape[1]} heads; expected 1 or {hq} (query heads)")
    m = m[..., :total]
    if m.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        m = torch.where(m.to(device), zero, torch.full((), float("-inf"), device=device))
    else:
        m = m.to(device=device, dtype=torch.float32)
    return m.expand(batch, m.shape[1], total)


def decode_attention(
    q: torch.Tensor,
    k: PackedOperand,
    v: PackedOperand,
    *,
    scale: float | None = None,
    packed_start: int = 0,
    raw_k: torch.Tensor | None = None,
    raw_v: torch.Tensor | None = None,
    raw_positions: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    block_n: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    prefetch: bool = True,
) -> torch.Tensor:
    """Attention of one query token over packed K/V (+ raw tokens): ``[B, Hq, 1, D]``.

    ``attn_mask``: bool (True = attend) or additive float, ``[B, 1|Hq, 1, T_total]`` (as
    transformers builds it) or ``[B, 1|Hq, T_total]``, indexed by logical position.
    ``kv_start``: int ``[B]``, tokens at logical positions below it are ignored (left pad).
    A query whose every token is masked gets a zero output (SDPA would give NaN).
    ``block_n`` (tokens per tile), ``num_splits`` (programs along the tokens; default: about
    four waves of SMs), ``num_warps``, ``num_stages`` and ``prefetch`` (load the next tile
    before decoding the current one) are tuning knobs that change no result beyond
    summation order.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query token [B, Hq, 1, D], got {tuple(q.shape)}")
    if q.dtype not in _DTYPE_KIND:
        raise ValueError(f"query dtype {q.dtype} is not supported (bf16, fp16, fp32)")
    bsz, hq, _, d = q.shape
    hkv = int(k.codes.shape[1])
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k.head_dim() != d or v.head_dim() != d:
        raise ValueError(f"packed K/V head_dim {k.head_dim()}/{v.head_dim()} != query head_dim {d}")
    if d % 2:
        raise ValueError("head_dim must be even")
    tp = k.num_tokens
    if v.num_tokens != tp:
        raise ValueError("packed K and V hold different token counts")
    device = q.device
    e = 0 if raw_k is None else int(raw_k.shape[2])
    if e:
        if raw_v is None or raw_v.shape != raw_k.shape:
            raise ValueError("raw_k and raw_v must both be given with the same shape")
        if raw_positions is None:
            raw_positions = torch.arange(packed_start + tp, packed_start + tp + e, device=device)
        raw_positions = raw_positions.to(device=device, dtype=torch.int32)
    total = packed_start + tp
    if e and attn_mask is not None:  # the mask must cover every raw position (one host sync)
        total = max(total, int(raw_positions.max()) + 1)
    group = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)

    tp_blocks = triton.cdiv(tp, block_n) if tp else 0
    if tp_blocks:
        want = num_splits or max(1, triton.cdiv(_target_programs(device), bsz * hkv))
        want = max(1, min(want, tp_blocks))
        tok_per_split = block_n * triton.cdiv(tp_blocks, want)
        ns_packed = triton.cdiv(tp, tok_per_split)
    else:
        tok_per_split, ns_packed = block_n, 0
    ns = ns_packed + (1 if e else 0)
    out = torch.empty((bsz, hq, 1, d), dtype=q.dtype, device=device)
    if ns == 0:
        return out.zero_()

    part = torch.empty((bsz * hq * ns * (d + 2),), dtype=torch.float32, device=device)
    kg, skg_b, skg_h, skg_t = _row_scale_arg(k, part)
    vg, svg_b, svg_h, svg_t = _row_scale_arg(v, part)
    ks, ks_str = _scale_arg(k)
    vs, vs_str = _scale_arg(v)
    kc, vc = _codes_arg(k), _codes_arg(v)
    mask = _additive_mask(attn_mask, bsz, hq, total, device)
    if e:
        rk, rv, rpos = raw_k, raw_v, raw_positions
    else:
        rk = rv = q
        rpos = part
    if mask is not None:
        m_arg, m_str = mask, (mask.stride(0), mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(2))
    else:
        m_arg, m_str = part, (0, 0, 0)
    start = kv_start.to(device=device, dtype=torch.int32) if kv_start is not None else part
    d_pad = max(16, triton.next_power_of_2(d))
    _decode_split_kernel[(bsz * hkv, ns)](
        q, q.stride(0), q.stride(1), q.stride(3),
        kc, kc.stride(0), kc.stride(1), kc.stride(2), ks, *ks_str, kg, skg_b, skg_h, skg_t,
        vc, vc.stride(0), vc.stride(1), vc.stride(2), vs, *vs_str, vg, svg_b, svg_h, svg_t,
        rk, rk.stride(0), rk.stride(1), rk.stride(2), rk.stride(3),
        rv, rv.stride(0), rv.stride(1), rv.stride(2), rv.stride(3), rpos,
        m_arg, *m_str, start, part,
        hkv, group, tp, e, packed_start, tok_per_split, ns_packed, ns, scale * _LOG2E,
        D=d, D_PAD=d_pad, BLOCK_N=block_n, G_PAD=max(16, triton.next_power_of_2(group)),
        K_KIND=k.kind, V_KIND=v.kind, K_HB=_half_block(k.kind), V_HB=_half_block(v.kind),
        DOT=_dot_mode(q.dtype, device), HAS_MASK=mask is not None, HAS_START=kv_start is not None,
        PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages,
    )
    _combine_kernel[(bsz * hq,)](
        part, out, out.stride(0), out.stride(1), out.stride(3), hq, ns,
        D=d, D_PAD=triton.next_power_of_2(d), NS_PAD=max(2, triton.next_power_of_2(ns)),
        OUT_KIND=_DTYPE_KIND[q.dtype],
    )
    return out
