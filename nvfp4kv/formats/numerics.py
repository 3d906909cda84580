"""Small numeric helpers the formats share, each written to give the same bits on any device.

- NaN/Inf policy (``nonfinite="map"``): NaN -> 0, +-Inf -> +-limit, where each format picks
  ``limit`` as the largest magnitude it represents at the scale it would use for the finite
  values (its docstring says which), so an Inf saturates instead of blowing up a scale.
  Scales are computed from :func:`finite_abs`, which ignores NaN/Inf.
- Finite in, finite out (:func:`saturate_`, :func:`saturating_cast`): a decoded value beyond
  the output dtype's range (FP16's 65504, say: a block-16 FP4 code of 4 at scale 2^14 is
  65536) saturates at the dtype's largest finite value, as engines' ``satfinite`` conversions
  do, instead of turning into Inf. Values in range are untouched, so no code or scale changes.
- Division by a constant: on CUDA, ``tensor / python_float`` is computed as
  ``tensor * (1 / float)``, which can differ from true division in the last bit; the CPU
  divides. :func:`divide` always divides (IEEE, correctly rounded), so a scale such as
  ``amax / 448`` is the same on every device.
- Powers of two from integer bit patterns (:func:`exp2_exact`) and the exact
  ``ceil(log2(r))`` from the FP32 exponent (:func:`ceil_log2_exact`): no transcendental
  function whose last bit depends on the math library.
"""

from __future__ import annotations

import torch


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in FP32 with NaN and +-Inf replaced by 0 (for amax computations)."""
    a = x.float().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))


def map_nonfinite(x: torch.Tensor, limit: torch.Tensor | float) -> torch.Tensor:
    """``x`` in FP32 with NaN -> 0 and +-Inf -> +-``limit`` (broadcastable to ``x``)."""
    x = x.float()
    limit_t = torch.as_tensor(limit, dtype=torch.float32, device=x.device)
    x = torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
    return torch.where(torch.isinf(x), torch.sign(x) * limit_t, x)


def has_nonfinite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds any NaN/Inf (one reduction; formats skip the mapping otherwise).

    ``sum(x * 0)``: every finite element gives a signed zero and the zeros sum to zero in any
    order, while NaN and +-Inf give NaN (``Inf * 0``), which every addition propagates (IEEE
    754), so the sum is nonzero exactly when a NaN/Inf is present. The same answer as
    ``not isfinite(x).all()``, several times faster on CPU (``tests/test_formats_conventions.py``
    checks both agree).
    """
    if not x.dtype.is_floating_point:
        return False
    return bool((x * 0).sum() != 0)


def saturate_(x: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` in place to +-(its dtype's largest finite value); returns ``x``.

    For freshly decoded outputs: an overflow to +-Inf (in the FP32 arithmetic or in the cast
    to a narrower dtype) becomes +-max, NaN stays NaN, and every finite value in range is
    unchanged. Formats whose codes cannot encode Inf use it on every decode, so a finite input
    never comes back as Inf.
    """
    if x.dtype.is_floating_point:
        limit = torch.finfo(x.dtype).max
        x.clamp_(-limit, limit)
    return x


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` with finite values beyond ``dtype``'s range saturated at +-max.

    +-Inf and NaN pass through unchanged (they are the NaN/Inf policy's business, not an
    overflow); a cast to a dtype at least as wide costs nothing extra.
    """
    if x.dtype == dtype or not dtype.is_floating_point:
        return x.to(dtype)
    limit = torch.finfo(dtype).max
    if not x.dtype.is_floating_point or torch.finfo(x.dtype).max <= limit:
        return x.to(dtype)
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # BF16 cannot hold FP16's max
    return torch.where(torch.isinf(wide), wide, wide.clamp(-limit, limit)).to(dtype)


def divide(x: torch.Tensor, constant: float) -> torch.Tensor:
    """``x / constant`` in FP32 by true division on every device (see module docstring)."""
    x = x.float()
    return x / torch.full((), constant, dtype=torch.float32, device=x.device)


def exp2_exact(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` (FP32) for integer exponents in ``[-149, 128]`` (128 gives +Inf)."""
    e = exponent.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    subnormal = (torch.ones_like(e) << (e + 149).clamp(min=0, max=22)).view(torch.float32)
    return torch.where(e >= -126, normal, subnormal)


def ceil_log2_exact(r: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(r))`` (int32) for finite ``r > 0``, from ``frexp``'s exponent.

    ``r = m * 2^k`` with ``m`` in ``[0.5, 1)``: ``log2(r)`` is ``k - 1`` when ``m == 0.5`` (a
    power of two) and lies strictly between ``k - 1`` and ``k`` otherwise.
    """
    mantissa, exponent = torch.frexp(r.float())
    exponent = exponent.to(torch.int32)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` (rows of ``table`` gathered by an integer ``index``) via ``index_select``
    on int32 indices: the same values as advanced indexing with ``.long()``, many times faster
    on CPU."""
    flat = table.index_select(0, index.reshape(-1).to(torch.int32))
    return flat.reshape(*index.shape, *table.shape[1:])
