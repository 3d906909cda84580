"""Exact FP rounding and decoding for Triton kernels, written with integer bit operations.

Why integer arithmetic instead of ``x.to(tl.float8e4nv)`` or ``x.to(tl.bfloat16)``:

- Hopper (sm_90) has no FP4 convert instruction at all, so E2M1 must be emulated anyway.
- The Triton CPU interpreter (``TRITON_INTERPRET=1``, how CI tests kernels) rounds wrongly
  where rounding carries into the next binade (``126.2 -> 64`` instead of ``128`` for E4M3)
  and truncates FP32 -> BF16 instead of rounding to nearest even.

Integer bit operations and comparisons are exact on every device and under the interpreter,
so one kernel source is bit-exact with the PyTorch references everywhere. Every helper
here mirrors one reference function of :mod:`nvfp4kv.formats` (named in its docstring).

Division is ``tl.div_rn`` (IEEE round-to-nearest) because Triton lowers a plain ``/`` on
FP32 to an approximate division on NVIDIA GPUs, which would change codes near thresholds.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: E4M3's largest finite magnitude
E4M3_MAX = 448.0
#: smallest normal E4M3 magnitude, 2^-6
E4M3_MIN_NORMAL = 0.015625


@triton.jit
def e4m3_rne_code(v):
    """E4M3 magnitude code (int32 0..126) of ``0 <= v <= 448`` rounded to nearest even.

    Mirrors ``torch.Tensor.to(torch.float8_e4m3fn)`` on already clamped, non-negative
    values (block scales). Normal range: round the FP32 bit pattern to 3 mantissa bits with
    the add-half-minus-one-plus-lsb trick, whose carry moves into the exponent exactly as
    RNE does. Subnormal range (v < 2^-6): E4M3 subnormals are ``m * 2^-9``, so round the
    24-bit significand shifted right to units of 2^-9 (``m == 8`` is the smallest normal,
    whose code is also 8).
    """
    bits = v.to(tl.int32, bitcast=True)
    # normal: keep sign/exponent + top 3 mantissa bits, RNE on the dropped 20 bits
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal_code = rounded - ((127 - 7) << 3)
    # subnormal: significand (with the implicit one) in units of 2^-9, RNE
    exp_field = (bits >> 23) & 0xFF
    shift = tl.minimum(tl.maximum(141 - exp_field, 1), 31)
    sig = (bits & 0x7FFFFF) | 0x800000
    sig = tl.where(exp_field == 0, 0, sig)  # FP32 zero / denormals are below 2^-10
    q = sig >> shift
    rem = sig - (q << shift)
    half = 1 << (shift - 1)
    round_up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub_code = q + round_up.to(tl.int32)
    return tl.where(v < 0.015625, sub_code, normal_code)


@triton.jit
def e4m3_decode(code):
    """FP32 value of an E4M3 byte (int32 0..255), sign, subnormals and NaN included.

    Mirrors ``bytes.view(torch.float8_e4m3fn).float()`` / the reference's lookup table, bit for
    bit: the result is assembled as FP32 *bits*, because Triton lowers a float negation to
    ``0 - x`` on GPU, which turns the ``-0.0`` of byte ``0x80`` into ``+0.0``. NaN bytes
    (``0x7F``, ``0xFF``) give torch's canonical ``0x7FC00000``.
    """
    e = (code >> 3) & 0xF
    m = code & 0x7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2^-9, exact
    bits = tl.where(e == 0, sub, normal) | ((code & 0x80) << 24)
    bits = tl.where((code & 0x7F) == 0x7F, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_encode_signed(y):
    """E4M3 byte (int32 0..255) of FP32 ``y`` with ``|y| <= 448`` (already clamped), RNE.

    Mirrors ``y.to(torch.float8_e4m3fn).view(torch.uint8)``: the sign bit is the FP32 sign
    bit (so ``-0.0`` and negative values that round to zero give ``0x80``).
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    return (sign << 7) | e4m3_rne_code(tl.abs(y))


@triton.jit
def e2m1_rne_code(y):
    """4-bit E2M1 code (int32 0..15) of FP32 ``y``: RNE ties, saturation, sign = ``y < 0``.

    Mirrors :func:`nvfp4kv.formats.e2m1.rne_e2m1_codes`: the magnitude code counts the
    thresholds passed, a tie passing only when the upper neighbour has an even index.
    """
    a = tl.abs(y)
    mag = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    return tl.where(y < 0, mag | 8, mag)


@triton.jit
def e2m1_away_code(y):
    """4-bit E2M1 code of FP32 ``y`` with ties rounded *away* from zero (SGLang's rule).

    Mirrors SGLang's ``KVFP4QuantizeUtil``: magnitude = number of bounds
    ``[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]`` that ``|y|`` is ``>=``; sign = ``y < 0``.
    """
    a = tl.abs(y)
    mag = (
        (a >= 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a >= 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a >= 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a >= 5.0).to(tl.int32)
    )
    return tl.where(y < 0, mag | 8, mag)


@triton.jit
def e2m1_decode(code):
    """FP32 value of a 4-bit E2M1 code (int32, low 4 bits used); code 8 gives -0.0.

    Built as FP32 bits: magnitude code ``m >= 2`` is ``2^((m >> 1) - 1) * (1 + (m & 1) / 2)``,
    i.e. exponent and mantissa bits ``(m << 22) + bits(0.5)``; ``m = 1`` is 0.5 and ``m = 0``
    is 0. The sign is bit 3 moved to bit 31. Exact, and cheaper than arithmetic.
    """
    m = code & 7
    bits = tl.where(m >= 2, (m << 22) + 0x3F000000, m * 0x3F000000)
    bits = bits | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pow2_bits(code):
    """FP32 bits of ``2^(code - 127)`` for an int32 ``code`` in 0..254 (code 0: denormal 2^-127)."""
    return tl.where(code == 0, (1 << 22), code << 23)


@triton.jit
def pow2_from_biased(code):
    """``2^(code - 127)`` as FP32 for an int32 ``code`` in 0..254 (E8M0 / UE8M0 scales).

    Built from the exponent field directly (``code << 23``), with code 0 giving the FP32
    denormal 2^-127, as ``torch.exp2(code - 127.)`` does.
    """
    return tl.where(code == 0, (1 << 22), code << 23).to(tl.float32, bitcast=True)


@triton.jit
def bf16_rne_bits(v):
    """BF16 bit pattern (int16) of FP32 ``v`` rounded to nearest even (finite ``v``).

    Mirrors ``v.to(torch.bfloat16)``; stored through an ``int16`` view of the output.
    """
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def satfinite(v, OUT_KIND: tl.constexpr):
    """FP32 ``v`` clamped to +-(the output dtype's largest finite value); NaN stays NaN.

    Mirrors :func:`nvfp4kv.formats.numerics.saturate_` applied after the cast (the formats'
    ``dequantize``): clamping *before* the RNE cast gives the same bits, because every FP32
    value above the dtype's max either rounds down to it or overflows to Inf, which the
    reference then clamps to it. Written with compares and selects, not ``minimum``/``maximum``
    (which drop NaN on GPU), so a NaN scale still decodes to NaN as in the reference.
    """
    if OUT_KIND == 0:
        return tl.where(v > 3.3895313892515355e38, 3.3895313892515355e38,
                        tl.where(v < -3.3895313892515355e38, -3.3895313892515355e38, v))
    elif OUT_KIND == 1:
        return tl.where(v > 65504.0, 65504.0, tl.where(v < -65504.0, -65504.0, v))
    else:
        return tl.where(v > 3.4028234663852886e38, 3.4028234663852886e38,
                        tl.where(v < -3.4028234663852886e38, -3.4028234663852886e38, v))


@triton.jit
def to_bf16(v):
    """FP32 -> BF16 tensor, rounded to nearest even also under the interpreter."""
    return bf16_rne_bits(v).to(tl.bfloat16, bitcast=True)


@triton.jit
def floor_log2(a):
    """``floor(log2(a))`` (int32) of FP32 ``a > 0`` from its exponent field, exactly.

    FP32 denormals (exponent field 0) return -127: every caller clamps below that anyway.
    """
    bits = a.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def ceil_log2(a):
    """``ceil(log2(a))`` (int32) of FP32 ``a >= 2^-126`` exactly: floor, plus one unless a
    is an exact power of two (mantissa bits zero)."""
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    return e + ((bits & 0x7FFFFF) != 0).to(tl.int32)
