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

Layout of the code: this module is the host side (argument checks and strides, mask
normalization, split sizing, launches); the Triton device code is
:mod:`nvfp4kv.kernels.decode_kernel`, and what one side (K or V) looks like to the kernel is
:class:`~nvfp4kv.kernels.packed_operand.PackedOperand`, built by each format's declared
``fused_decode`` builder. Every decoded element saturates at the query dtype's largest finite
value, as the formats' ``dequantize`` does.

Masks: an additive mask over *logical* token positions (``[B, 1 or Hq, T_total]``, what a
transformers 4-D mask becomes) and/or a per-batch first valid position (left padding).
Packed token ``n`` sits at logical position ``packed_start + n``; raw token ``e`` at
``raw_positions[e]``.
"""

from __future__ import annotations

import functools

import torch
import triton

from nvfp4kv.kernels.decode_kernel import combine_kernel, decode_split_kernel
from nvfp4kv.kernels.packed_operand import PackedOperand, packed_operand

__all__ = ["DECODE_ATOL", "PackedOperand", "decode_attention", "packed_operand"]

#: documented agreement with dequantize + SDPA (fp32 math on the rounded K/V), per dtype
DECODE_ATOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}

_LOG2E = 1.4426950408889634


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


_DTYPE_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _half_block(op: PackedOperand) -> int:
    """Bytes of packed codes per scale block (``block / 2``; unused for E4M3 bytes)."""
    return op.block // 2 if op.is_fp4 else 8


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
    decode_split_kernel[(bsz * hkv, ns)](
        q, q.stride(0), q.stride(1), q.stride(3),
        kc, kc.stride(0), kc.stride(1), kc.stride(2), ks, *ks_str, kg, skg_b, skg_h, skg_t,
        vc, vc.stride(0), vc.stride(1), vc.stride(2), vs, *vs_str, vg, svg_b, svg_h, svg_t,
        rk, rk.stride(0), rk.stride(1), rk.stride(2), rk.stride(3),
        rv, rv.stride(0), rv.stride(1), rv.stride(2), rv.stride(3), rpos,
        m_arg, *m_str, start, part,
        hkv, group, tp, e, packed_start, tok_per_split, ns_packed, ns, scale * _LOG2E,
        D=d, D_PAD=d_pad, BLOCK_N=block_n, G_PAD=max(16, triton.next_power_of_2(group)),
        K_KIND=k.kind, V_KIND=v.kind, K_HB=_half_block(k), V_HB=_half_block(v),
        DOT=_dot_mode(q.dtype, device), HAS_MASK=mask is not None, HAS_START=kv_start is not None,
        PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages,
    )
    combine_kernel[(bsz * hq,)](
        part, out, out.stride(0), out.stride(1), out.stride(3), hq, ns,
        D=d, D_PAD=triton.next_power_of_2(d), NS_PAD=max(2, triton.next_power_of_2(ns)),
        OUT_KIND=_DTYPE_KIND[q.dtype],
    )
    return out
