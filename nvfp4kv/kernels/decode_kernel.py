"""The fused decode attention's device code (Triton): tile fetch, in-register decode, online
softmax, split-K partials and their merge.

Host-side argument preparation and the public entry point are in
:mod:`nvfp4kv.kernels.decode_attention`; the operand encodings (``KIND``) in
:mod:`nvfp4kv.kernels.packed_operand`. Kept apart because this is the part that must stay
bit-faithful to the references (every K/V element decoded with the reference's arithmetic,
saturated and rounded to the query dtype exactly as the format's ``dequantize`` does), while
the host side is plumbing.

Operand kinds (constexpr): 0 = E2M1 + E4M3 block scale x FP32 row scale, 1 = E2M1 + power-of-two
block scale, 3 = E4M3 byte x FP32 row scale. ``HB`` = code bytes per scale block (block / 2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nvfp4kv.kernels.triton_common import e4m3_decode, pow2_from_biased, satfinite, to_bf16


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
def _sat_to_dot(x, DOT: tl.constexpr):
    """Decoded FP32 K/V values saturated at the query dtype's largest finite value, then
    rounded to the dot dtype: the format's ``dequantize(..., dtype)`` (finite in, finite out)."""
    if DOT == 3:
        return _to_dot(satfinite(x, 0), DOT)
    else:
        return _to_dot(satfinite(x, DOT), DOT)


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

    Values are the reference's exactly (``e2m1 * (float(s) * gs)`` for NVFP4), then saturated
    and rounded to the dot dtype like the reference's ``dequantize(..., dtype)``. FP4's low
    and high nibbles are interleaved back with ``join`` + ``reshape``.
    """
    if KIND == 3:
        return _sat_to_dot(e4m3_decode(c.to(tl.int32)) * g[:, None], DOT)
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
        return tl.reshape(tl.join(_sat_to_dot(lo, DOT), _sat_to_dot(hi, DOT)), [BLOCK_N, D_PAD])


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
def decode_split_kernel(
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
def combine_kernel(
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
