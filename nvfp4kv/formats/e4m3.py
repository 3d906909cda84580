"""FP8 E4M3 ("e4m3fn"): NVFP4's block scale and the ``fp8_e4m3`` element.

Layout ``s eeee mmm``, exponent bias 7, no infinities, ``s 1111 111`` is NaN. Normal values
are ``(1 + m/8) * 2^(e-7)`` up to 448; subnormals ``m * 2^-9`` (smallest 2^-9). Rounding is
round-to-nearest-even with *saturation* (``satfinite``): finite values and +-Inf beyond 448
become +-448, as the serving kernels' ``cvt.rn.satfinite.e4m3x2.f32`` does. NaN stays NaN.

Two encoders give identical bits (a test checks it on edge cases and random values):

- :func:`float_to_e4m3_bits` rounds with integer operations on the FP32 bit pattern. This is
  the definition: the Triton kernels repeat this arithmetic, because the Triton 3.9
  interpreter's ``.to(tl.float8e4nv)`` mis-rounds when rounding carries into the next binade
  (126.2 -> 64 instead of 128), so a cast-based kernel cannot be checked on CPU.
- :func:`float_to_e4m3_bits_torch` clamps to +-448 and uses torch's ``float8_e4m3fn`` cast
  (RNE). The clamp matters: the cast is documented to give NaN for ``|x| >= 480``; torch 2.13
  on CPU happens to saturate, but nothing should rely on that across versions and devices.
"""

from __future__ import annotations

import torch

from nvfp4kv.formats.numerics import lookup

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
#: the bit pattern of +448 (largest finite) and of NaN
E4M3_MAX_BITS = 0x7E
E4M3_NAN_BITS = 0x7F

_F32_EXP_BIAS = 127
_E4M3_EXP_BIAS = 7
_F32_MANTISSA_BITS = 23
_E4M3_MANTISSA_BITS = 3
_DROPPED_BITS = _F32_MANTISSA_BITS - _E4M3_MANTISSA_BITS  # 20
_F32_BITS_448 = 0x43E00000
_F32_BITS_MIN_NORMAL = (_F32_EXP_BIAS - 6) << _F32_MANTISSA_BITS  # 2^-6
_F32_EXP_SMALLEST_NONZERO = _F32_EXP_BIAS - 10  # below 2^-10 everything rounds to 0
_F32_ABS_MASK = 0x7FFFFFFF
_F32_INF_BITS = 0x7F800000


def _e4m3_value(bits: int) -> float:
    """Exact value of one E4M3 bit pattern (Python floats are exact for all of them)."""
    sign = -1.0 if bits & 0x80 else 1.0
    exponent = (bits >> 3) & 0x0F
    mantissa = bits & 0x07
    if exponent == 0x0F and mantissa == 0x07:
        return float("nan")
    if exponent == 0:
        return sign * mantissa * E4M3_MIN_SUBNORMAL
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - _E4M3_EXP_BIAS)


#: value of every byte 0..255, built from the bit layout (not from torch's cast)
E4M3_VALUES: tuple[float, ...] = tuple(_e4m3_value(b) for b in range(256))


_LUTS: dict[torch.device, torch.Tensor] = {}


def e4m3_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """256-entry FP32 decode table, indexed by the E4M3 byte (built once per device; do not
    modify the returned tensor)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    lut = _LUTS.get(dev)
    if lut is None:
        lut = _LUTS[dev] = torch.tensor(E4M3_VALUES, dtype=torch.float32, device=dev)
    return lut


def float_to_e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes (uint8) of ``x`` by integer arithmetic: RNE, saturating at +-448.

    Normal results keep the top 3 of FP32's 23 mantissa bits, rounding the 20 dropped bits to
    nearest-even by an add (a carry moves into the exponent by itself, 126.2 -> 128).
    Subnormal results (``|x| < 2^-6``) are ``round_half_even(|x| / 2^-9)`` computed from the
    24-bit significand by a shift; a result of 8 is exactly the smallest normal, code 0x08.
    """
    bits = x.float().contiguous().view(torch.int32)
    sign = (bits < 0).to(torch.int32) << 7
    mag = bits & _F32_ABS_MASK
    is_nan = mag > _F32_INF_BITS
    mag = torch.clamp(mag, max=_F32_BITS_448)  # saturation, +-Inf included

    # normal range: round the mantissa to 3 bits (RNE) and rebias the exponent 127 -> 7
    lsb = (mag >> _DROPPED_BITS) & 1
    rounded = (mag + ((1 << (_DROPPED_BITS - 1)) - 1) + lsb) >> _DROPPED_BITS
    normal_code = rounded - ((_F32_EXP_BIAS - _E4M3_EXP_BIAS) << _E4M3_MANTISSA_BITS)

    # subnormal range: significand * 2^(e-23) / 2^-9 = significand >> (14 - e), e = E - 127
    exp_field = mag >> _F32_MANTISSA_BITS
    significand = (mag & ((1 << _F32_MANTISSA_BITS) - 1)) | (1 << _F32_MANTISSA_BITS)
    shift = torch.clamp(_F32_EXP_BIAS + 14 - exp_field, min=21, max=24)
    quotient = torch.bitwise_right_shift(significand, shift)
    remainder = significand & ((torch.ones_like(shift) << shift) - 1)
    half = torch.ones_like(shift) << (shift - 1)
    round_up = (remainder > half) | ((remainder == half) & ((quotient & 1) == 1))
    sub_code = quotient + round_up.to(torch.int32)
    sub_code = torch.where(exp_field < _F32_EXP_SMALLEST_NONZERO, 0, sub_code)

    code = torch.where(mag >= _F32_BITS_MIN_NORMAL, normal_code, sub_code)
    code = torch.where(is_nan, E4M3_NAN_BITS, code)
    return (code | sign).to(torch.uint8)


def float_to_e4m3_bits_torch(x: torch.Tensor) -> torch.Tensor:
    """Same bytes as :func:`float_to_e4m3_bits` via torch's cast (clamped first, see module)."""
    clamped = x.float().clamp(-E4M3_MAX, E4M3_MAX)
    return clamped.to(torch.float8_e4m3fn).view(torch.uint8)


def float_to_e4m3_bits_fast(x: torch.Tensor) -> torch.Tensor:
    """The bytes of :func:`float_to_e4m3_bits`, by the fastest path proven identical.

    On CPU: torch's ``float8_e4m3fn`` cast after a clamp to +-448 (RNE; checked against the
    integer definition on every E4M3 rounding boundary and tie +-1 ulp, on +-0, subnormals,
    Inf and 10^6 random values, see ``tests/test_formats_e4m3.py``); NaN, whose sign the cast
    need not keep, goes through the definition. Elsewhere (CUDA, where the cast was not
    checked here): :func:`float_to_e4m3_bits` itself.
    """
    xf = x.float()
    if xf.device.type != "cpu":
        return float_to_e4m3_bits(xf)
    out = xf.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    nan = torch.isnan(xf)
    if bool(nan.any()):
        out = torch.where(nan, float_to_e4m3_bits(xf), out)
    return out


def e4m3_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """FP32 values of E4M3 bytes, by table lookup (the arithmetic a kernel can repeat)."""
    return lookup(e4m3_lut(bits.device), bits)


def e4m3_bits_to_float_torch(bits: torch.Tensor) -> torch.Tensor:
    """Same values as :func:`e4m3_bits_to_float` via torch's ``float8_e4m3fn`` view."""
    return bits.to(torch.uint8).contiguous().view(torch.float8_e4m3fn).float()


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto the E4M3 grid (RNE, saturating at +-448), as FP32."""
    return e4m3_bits_to_float(float_to_e4m3_bits(x))
