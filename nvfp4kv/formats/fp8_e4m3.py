"""``fp8_e4m3``: FP8 E4M3 elements with an FP32 scale (vLLM / HF / TRT-LLM FP8 KV).

``code = e4m3_satfinite(x / scale)``, ``x_hat = float(code) * scale``, ``scale = amax / 448``.
Encoding saturates at +-448 (a plain float8 cast may give NaN for ``|x/scale| >= 480``,
depending on torch version and device), so a static scale that is too small (later
outliers) clips instead of corrupting the cache.

Scale granularity (option ``scaling``):

- ``"tensor"`` (default): one scale per K or V tensor, a *global scale* ``[1, 1, 1, 1]``
  (dynamic from ``amax``, or static: calibrated / checkpoint ``k_scale``, passed by the cache);
- ``"head"``: one global scale per kv head, ``[1, H, 1, 1]``;
- ``"token"``: one FP32 scale per token and head, stored as the token-wise part ``scale``
  ``[B, H, T, 1]`` (8 + 32/D bits per element); no global scale.

A zero amax gives scale 0; encoding then writes code 0 everywhere (it never divides by 0) and
decoding gives zeros. Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-448*scale
(saturation); dynamic scales are taken from the finite values only; with ``nonfinite="keep"``
Inf saturates at +-448 and NaN is stored as E4M3's NaN code. Codes are stored as the E4M3 bit
pattern in uint8 (``x.view(torch.uint8)`` of a ``float8_e4m3fn`` tensor).

Finite in, finite out: :meth:`FP8E4M3Format.dequantize` saturates outputs beyond the output
dtype's range at its largest finite value; the pure :func:`dequantize_fp8_e4m3` is the plain
arithmetic the kernels reproduce.

Kernels (declared on the class): Triton quantize/dequantize and the fused decode operand in
:mod:`nvfp4kv.kernels.triton_fp8`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from nvfp4kv.formats.base import FormatKernels, KVFormat, Parts, StepEncoder, register_format
from nvfp4kv.formats.e4m3 import E4M3_MAX, e4m3_bits_to_float, e4m3_lut, float_to_e4m3_bits, float_to_e4m3_bits_fast  # noqa: F401 (float_to_e4m3_bits: re-exported, the definition)
from nvfp4kv.formats.numerics import divide, finite_abs, has_nonfinite, lookup, map_nonfinite, saturate_

FP8Scaling = Literal["tensor", "head", "token"]
_SCALINGS = ("tensor", "head", "token")


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The FP8 scale ``amax / 448`` in FP32 (vLLM's and HF's ``k_scale`` convention)."""
    return divide(amax, E4M3_MAX)


def quantize_fp8_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """E4M3 bytes (uint8, same shape as ``x``) of ``x / scale``, saturating; scale 0 -> code 0."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    # where the scale is not positive every code is 0 (0.0 encodes as 0x00); the quotient
    # computed there (Inf/NaN) is discarded
    scaled = torch.where(s > 0, x.float() / s, 0.0)
    return float_to_e4m3_bits_fast(scaled)


def dequantize_fp8_e4m3(
    codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``float(code) * scale`` in ``dtype``."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
    return (e4m3_bits_to_float(codes) * s).to(dtype)


def dequantize_fp8_one_scale(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate_(dequantize_fp8_e4m3(codes, scale, dtype))`` for a one-element ``scale``, by one
    lookup in a 256-entry table of already scaled, converted and saturated values.

    Why: without the fast path the cache decodes its whole FP8 history on every read, so the
    per-element passes count; the multiply, the cast and the clamp are elementwise functions
    of the code byte alone, so applying them to the 256 table entries gives every output the
    very bits the reference computes (NaN bytes included: the same ``NaN * s``), in two passes
    over the data (index conversion, gather) instead of five. A ``float8_e4m3fn`` view cast is
    no faster on CPU (measured slower than the gather) and gives NaN bytes another payload.
    """
    table = saturate_((e4m3_lut(codes.device) * scale.reshape(())).to(dtype))
    return lookup(table, codes)


def fp8_step_encoder(scale: torch.Tensor) -> StepEncoder | None:
    """The encoder of :meth:`FP8E4M3Format.step_encoder` for a global ``scale``; None unless
    the FP32 ``scale`` is on the CPU, finite and positive everywhere.

    The same arithmetic as :func:`quantize_fp8_e4m3` and :meth:`FP8E4M3Format.dequantize`,
    with what only the scale decides done once: ``scale > 0`` everywhere, so the
    ``where(s > 0, ...)`` is the identity; ``x / s`` is never NaN for finite ``x``, so the NaN
    repair of :func:`~nvfp4kv.formats.e4m3.float_to_e4m3_bits_fast` (a host sync) is a no-op
    (the CPU path of that function is exactly this clamp and cast); the decoded codes are the
    same ``float8_e4m3fn`` values the table holds (no code is NaN); and when ``2 * 448 * s`` is
    below FP32's maximum no FP32 product overflows, so the FP32 output's clamp is skipped.
    """
    s = scale
    if s.dtype != torch.float32 or s.device.type != "cpu" or not bool((torch.isfinite(s) & (s > 0)).all()):
        return None
    fp32_safe = bool(s.amax() * (2 * E4M3_MAX) < torch.finfo(torch.float32).max)

    def encode(x: torch.Tensor, dtype: torch.dtype | None) -> tuple[Parts, torch.Tensor | None]:
        codes = (x.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        parts = {"codes": codes.view(torch.uint8)}
        if dtype is None:
            return parts, None
        out = codes.float() * s
        if dtype != torch.float32 or not fp32_safe:
            out = saturate_(out.to(dtype))
        return parts, out

    return encode


@register_format("fp8_e4m3")
@dataclass(frozen=True)
class FP8E4M3Format(KVFormat):
    """FP8 E4M3 K/V: uint8 ``codes`` ``[B,H,T,D]`` (+ FP32 ``scale`` ``[B,H,T,1]`` per token)."""

    kernels = FormatKernels(
        triton="nvfp4kv.kernels.triton_fp8:TRITON",
        fused_decode="nvfp4kv.kernels.triton_fp8:decode_operand",
    )

    rowwise: ClassVar[bool] = True  # every [..., D] row on its own (see KVFormat.rowwise)
    name: str = field(default="fp8_e4m3", init=False)
    #: ``"tensor"``, ``"head"`` or ``"token"`` (see module docstring)
    scaling: FP8Scaling = "tensor"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scaling not in _SCALINGS:
            raise ValueError(
                f"fp8_e4m3 option scaling must be one of {_SCALINGS}, got {self.scaling!r}"
            )

    @property
    def block_size(self) -> int:
        return 1

    @property
    def uses_global_scale(self) -> bool:
        return self.scaling != "token"

    def bits_per_element(self, head_dim: int) -> float:
        return 8.0 + (32.0 / head_dim if self.scaling == "token" else 0.0)

    def global_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.scaling == "tensor":
            return fp8_scale_from_amax(finite_abs(x).amax()).reshape(1, 1, 1, 1)
        if self.scaling == "head":
            return fp8_scale_from_amax(finite_abs(x).amax(dim=(0, 2, 3), keepdim=True))
        return None

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        """Encode; for ``scaling="token"`` a passed ``global_scale`` is ignored (none is used)."""
        self.check_input(x)
        if self.scaling == "token":
            scale = fp8_scale_from_amax(finite_abs(x).amax(dim=-1, keepdim=True))
        elif global_scale is None:
            scale = self.global_scale(x)
        else:
            scale = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, E4M3_MAX * scale)
        parts = {"codes": quantize_fp8_e4m3(x, scale)}
        if self.scaling == "token":
            parts["scale"] = scale
        return parts

    def step_encoder(self, global_scale: torch.Tensor | None) -> StepEncoder | None:
        """:func:`fp8_step_encoder` for a global scale (``"tensor"``/``"head"``; see
        KVFormat.step_encoder); none for ``"token"`` scaling, whose scales come from the data."""
        if global_scale is None or self.scaling == "token":
            return None
        return fp8_step_encoder(global_scale)

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        scale = parts["scale"] if self.scaling == "token" else global_scale
        if scale is None:
            raise ValueError(
                f"fp8_e4m3 (scaling={self.scaling!r}) dequantize needs the global scale used to "
                f"quantize these parts; pass the one the cache stored."
            )
        codes = parts["codes"]
        s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
        if s.numel() == 1 and s.dim() <= codes.dim():
            return dequantize_fp8_one_scale(codes, s, dtype)
        return saturate_(dequantize_fp8_e4m3(codes, s, dtype))
