"""E2M1, the FP4 element shared by ``nvfp4``, ``fp4_mx_block16`` and ``mxfp4``.

A 4-bit code is ``sign << 3 | magnitude``; magnitudes 0..7 stand for
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. There is no Inf/NaN encoding.

Rounding here is done with *comparisons against fixed thresholds*, never with a float
conversion instruction: comparisons are exact on every device, so the same arithmetic in a
Triton kernel (Hopper has no native FP4 convert) reproduces these codes bit for bit, also
under the CPU interpreter.

Round-to-nearest-even (``rne_e2m1_codes``), the rounding of ModelOpt, FlashInfer and the
Blackwell ``cvt.rn.satfinite.e2m1x2.f32`` instruction. Between two neighbours the tie goes to
the code with an even magnitude index::

    |y| <= 0.25 -> 0     0.25 < |y| < 0.75 -> 0.5    0.75 <= |y| <= 1.25 -> 1
    1.25 < |y| < 1.75 -> 1.5    1.75 <= |y| <= 2.5 -> 2    2.5 < |y| < 3.5 -> 3
    3.5 <= |y| <= 5 -> 4    |y| > 5 -> 6 (saturation: everything beyond 6, +-Inf too)

Sign: the sign bit is ``y < 0``, as in ModelOpt's ``_cast_fp4``. So ``-0.0`` encodes as
``+0`` (code 0) while a small negative value that rounds to zero keeps its sign (code 8,
``-0``); both decode to zero. NaN compares false everywhere and encodes as code 0 (the
formats refuse or map NaN before they get here).

Packing (ModelOpt, SGLang, FlashInfer): element ``2i`` goes to the low nibble and element
``2i+1`` to the high nibble of byte ``i``: ``byte = (q[1::2] << 4) | q[0::2]``.

Fast path (:func:`rne_e2m1_packed`, what the NVFP4 encoder uses): the same comparisons done
by one ``torch.bucketize`` over the 15 signed thresholds (the 7 positive ones, 0, and the 7
negative ones moved to the strictness ``y < 0`` needs), then one table lookup per *pair* of
elements that gives the packed byte directly. Comparisons only, so exact; the tests check it
equals ``pack_nibbles(rne_e2m1_codes(y))`` on every threshold +-3 ulp, signed zeros, NaN/Inf
and dense sweeps. The definitions above stay the reference.
"""

from __future__ import annotations

import torch

from nvfp4kv.formats.numerics import lookup

#: largest E2M1 magnitude
E2M1_MAX = 6.0
#: magnitude of codes 0..7
E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: value of every 4-bit code 0..15 (code 8 is -0.0)
E2M1_VALUES: tuple[float, ...] = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)
#: midpoints between consecutive magnitudes (the rounding thresholds)
E2M1_BOUNDS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
#: for RNE, whether a value exactly on bound ``k`` rounds up (the upper neighbour, code
#: ``k + 1``, has an even index exactly when ``k`` is odd)
E2M1_TIE_ROUNDS_UP: tuple[bool, ...] = (False, True, False, True, False, True, False)
SIGN_BIT = 0b1000


#: constants built once per device (never modified in place): name -> device -> tensor
_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _constant(name: str, device: torch.device | str | None, build) -> torch.Tensor:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t = _CONSTANTS.get((name, dev))
    if t is None:
        t = _CONSTANTS[(name, dev)] = build().to(dev)
    return t


def e2m1_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry FP32 decode table, indexed by code (built once per device; do not modify)."""
    return _constant("lut", device, lambda: torch.tensor(E2M1_VALUES, dtype=torch.float32))


def e2m1_byte_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """``[256, 2]`` FP32: the values of a packed byte's low and high nibble (the same table
    lookups as :func:`decode_e2m1` of :func:`unpack_nibbles`, done in one index)."""

    def build() -> torch.Tensor:
        lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        return torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1)

    return _constant("byte_lut", device, build)


def _e2m1_thresholds(device: torch.device) -> torch.Tensor:
    """FP32 thresholds ``t_k`` with ``a >= t_k`` exactly when ``a`` passes bound ``k``: the
    bound itself where a tie rounds up, else the next FP32 above it (``a > b`` is
    ``a >= nextafter(b, inf)`` for every FP32 ``a``, NaN included: both false)."""

    def build() -> torch.Tensor:
        bounds = torch.tensor(E2M1_BOUNDS, dtype=torch.float32)
        up = torch.nextafter(bounds, torch.full_like(bounds, float("inf")))
        return torch.where(torch.tensor(E2M1_TIE_ROUNDS_UP), bounds, up)

    return _constant("thresholds", device, build)


def _signed_bounds(device: torch.device) -> torch.Tensor:
    """15 ascending FP32 boundaries: ``bucketize(y, bounds, right=True)`` (the number of
    boundaries ``<= y``) is ``7 - magnitude`` for ``y < 0`` and ``8 + magnitude`` for ``y >= 0``.

    Positive side: ``a >= t_k`` are the thresholds of :func:`_e2m1_thresholds`. Negative side:
    ``-y >= t_k`` is ``y <= -t_k``, i.e. ``y < nextafter(-t_k, +inf)``, so the boundaries
    ``<= y`` there are the ones the magnitude does *not* pass. Boundary 0 separates the signs
    exactly as ``y < 0`` does (``-0.0`` counts as ``>= 0``).
    """

    def build() -> torch.Tensor:
        t = _e2m1_thresholds(torch.device("cpu"))
        neg = torch.nextafter(-t, torch.full_like(t, float("inf"))).flip(0)
        return torch.cat([neg, torch.zeros(1), t])

    return _constant("signed_bounds", device, build)


def _bucket_codes() -> torch.Tensor:
    """4-bit code of each bucket index 0..15 of :func:`_signed_bounds` (uint8)."""
    i = torch.arange(16)
    return torch.where(i >= 8, i - 8, 15 - i).to(torch.uint8)


def _pair_table(device: torch.device) -> torch.Tensor:
    """``[256]`` uint8: the packed byte of buckets ``(lo, hi)`` at index ``lo + 16 * hi``."""

    def build() -> torch.Tensor:
        code = _bucket_codes()
        j = torch.arange(256)
        return code[j % 16] | (code[j // 16] << 4)

    return _constant("pair_table", device, build)


def _buckets(y: torch.Tensor) -> torch.Tensor:
    """Bucket index 0..15 (int64) of every element of ``y`` (FP32); NaN counts as 0, as in
    the reference (``bucketize`` would put it past +Inf)."""
    y = torch.nan_to_num(y, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return torch.bucketize(y, _signed_bounds(y.device), right=True)


def rne_e2m1_packed(y: torch.Tensor) -> torch.Tensor:
    """``pack_nibbles(rne_e2m1_codes(y))`` (even last dim) in a few ops, see the module docstring."""
    if y.shape[-1] % 2:
        raise ValueError(f"rne_e2m1_packed needs an even last dim, got {y.shape[-1]}")
    b = _buckets(y.float()).unflatten(-1, (-1, 2))
    return _pair_table(y.device).take(b[..., 0] + 16 * b[..., 1])


def _bucket_values(device: torch.device) -> torch.Tensor:
    """``[16]`` FP32: the E2M1 value of each bucket index of :func:`_signed_bounds` (the value
    of its code, :data:`E2M1_VALUES`; bucket 7 is code 8, ``-0.0``)."""
    return _constant("bucket_values", device,
                     lambda: torch.tensor(E2M1_VALUES, dtype=torch.float32)[_bucket_codes().long()])


def _pair_weights(device: torch.device) -> torch.Tensor:
    """``[2]`` int64 ``(1, 16)``: a pair of buckets ``(lo, hi)`` times it is ``lo + 16 * hi``."""
    return _constant("pair_weights", device, lambda: torch.tensor([1, 16]))


def rne_e2m1_packed_finite(y: torch.Tensor, with_values: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`rne_e2m1_packed` of FP32 ``y`` that holds no NaN (+-Inf allowed), in fewer ops,
    and, with ``with_values``, the FP32 value of every element's code (what
    ``decode_e2m1(unpack_nibbles(packed))`` gives), else None.

    Why: the NVFP4 decode-step encoder (one token per layer) pays per op. Without NaN the
    ``nan_to_num`` of :func:`_buckets` is the identity; the pair index ``lo + 16 * hi`` is one
    integer matrix-vector product; and the values come from the same buckets through
    :func:`_bucket_values` (the same table entries the decoder reads). ``tests/test_formats_e2m1.py``
    checks both outputs against the definitions.
    """
    if y.shape[-1] % 2:
        raise ValueError(f"rne_e2m1_packed_finite needs an even last dim, got {y.shape[-1]}")
    b = torch.bucketize(y, _signed_bounds(y.device), right=True)
    packed = _pair_table(y.device).take(b.unflatten(-1, (-1, 2)) @ _pair_weights(y.device))
    return packed, (_bucket_values(y.device).take(b) if with_values else None)


def rne_e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """Magnitude code 0..7 (uint8) of ``a >= 0`` under round-to-nearest-even with saturation.

    A code is the number of thresholds that ``a`` passes, where a tie passes its threshold
    only when rounding up lands on an even index. NaN gives 0, +Inf gives 7.
    """
    if a.dtype == torch.float32:  # one comparison against the thresholds (same results)
        passed = a.unsqueeze(-1) >= _e2m1_thresholds(a.device)
        return passed.sum(dim=-1, dtype=torch.uint8)
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for bound, tie_up in zip(E2M1_BOUNDS, E2M1_TIE_ROUNDS_UP):
        passed = (a >= bound) if tie_up else (a > bound)
        code += passed.to(torch.uint8)
    return code


def rne_e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, one per element) of ``y`` already divided by its scale.

    ``y`` is read as FP32. See the module docstring for ties, saturation and signs.
    """
    y = y.float()
    sign = (y < 0).to(torch.uint8) * SIGN_BIT
    return sign | rne_e2m1_magnitude(y.abs())


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of 4-bit codes (uint8, one code per element, high bits ignored)."""
    return lookup(e2m1_lut(codes.device), codes & 0x0F)


def _byte_lut_words(device: torch.device | str | None) -> torch.Tensor:
    """:func:`e2m1_byte_lut` with each row's two FP32 values as one 64-bit word ``[256]``
    (int64, so gathering it copies bits and never touches them as floats)."""
    return _constant("byte_lut_words", device, lambda: e2m1_byte_lut("cpu").view(torch.int64).reshape(256))


def decode_packed_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """FP32 values of packed bytes ``[..., n]`` -> ``[..., 2n]``: ``decode_e2m1(unpack_nibbles(packed))``
    by one lookup per byte (identical values: both are table lookups). The table rows are
    gathered as 64-bit words (the low nibble's value first in memory, as in
    :func:`e2m1_byte_lut`), several times faster on CPU than gathering ``[256, 2]`` rows."""
    words = lookup(_byte_lut_words(packed.device), packed)
    return words.view(torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim (even element in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dim, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return ((pairs[..., 1] & 0x0F) << 4) | (pairs[..., 0] & 0x0F)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., n]`` bytes -> ``[..., 2n]`` codes (uint8)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
