"""``nvfp4``: NVIDIA NVFP4 with ModelOpt / FlashInfer / TensorRT-LLM semantics.

Three levels of scale, all along head_dim:

- FP32 global *decode* scale ``gs = amax / (6 * 448)`` per tensor (dynamic) or calibrated
  (static; convert other libraries' conventions with :mod:`nvfp4kv.formats.conventions`);
- per 16 elements an E4M3 block scale ``s = e4m3_rne(min(block_amax / (6 * gs), 448))``;
- E2M1 elements ``q = rne_e2m1(x / (float(s) * gs))``, divided by the *rounded* FP8 scale.

Decoding is ``x_hat = e2m1(q) * (float(s) * gs)`` in that order (ModelOpt's; ``(q*s)*gs``
differs in the last bit). Storage: 4 + 8/16 = 4.5 bits per element plus 32 bits per tensor.

Zero and tiny blocks. With ``tiny_scale="zero"`` (default, what the serving kernels do) a
block whose scale is 0 (an all-zero block, or one so small that its scale underflows E4M3,
below 2^-10) gets scale byte 0 and codes 0, and decodes to zeros. ``gs == 0`` (an all-zero
tensor) does the same for every block; nothing ever divides by zero, so no NaN appears.
With ``tiny_scale="modelopt"`` (ModelOpt's weight path) the block scale is clamped up to
2^-9, the smallest E4M3 subnormal, so tiny blocks keep a few nonzero codes, and an all-zero
block stores scale 1.0 (byte 0x38) with zero codes.

Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-(6 * 448 * gs), the largest
value representable at the global scale, i.e. Inf saturates; a dynamic global scale is taken
from the finite values only. With ``nonfinite="keep"`` nothing is checked: an Inf element
saturates its block (code 6 at scale 448), a NaN element makes its block's scale NaN.

Finite in, finite out: :meth:`NVFP4Format.dequantize` saturates outputs beyond the output
dtype's range at its largest finite value (:func:`~nvfp4kv.formats.numerics.saturate_`); the
pure :func:`dequantize_nvfp4` is the plain arithmetic the kernels reproduce bit for bit.

Kernels (declared on the class, see :class:`~nvfp4kv.formats.base.FormatKernels`): Triton
quantize/dequantize and the fused decode operand in :mod:`nvfp4kv.kernels.triton_nvfp4`,
FlashInfer's NVFP4 KV functions in :mod:`nvfp4kv.kernels.flashinfer_nvfp4`. Static scales may be
given in any convention of :mod:`nvfp4kv.formats.conventions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from nvfp4kv.formats.base import FormatKernels, KVFormat, Parts, StepEncoder, register_format
from nvfp4kv.formats.conventions import NVFP4_RANGE, available_conventions, to_decode_scale
from nvfp4kv.formats.e2m1 import (
    E2M1_MAX,
    decode_packed_e2m1,
    pack_nibbles,
    rne_e2m1_codes,
    rne_e2m1_packed,
    rne_e2m1_packed_finite,
)
from nvfp4kv.formats.e4m3 import (
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    e4m3_bits_to_float,
    float_to_e4m3_bits,
    float_to_e4m3_bits_fast,
)
from nvfp4kv.formats.numerics import divide, finite_abs, has_nonfinite, map_nonfinite, saturate_

NVFP4_BLOCK = 16
_E4M3_BITS_ONE = 0x38  # 1.0

TinyScale = Literal["zero", "modelopt"]


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic global decode scale ``amax / (6*448)`` of all of ``x`` (0-dim FP32 tensor).

    NaN/Inf are ignored, so the scale covers the finite values.
    """
    return divide(finite_abs(x).amax(), NVFP4_RANGE)


def _scale_for_blocks(global_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``global_scale`` (broadcastable to ``[..., 1]``) reshaped to broadcast over blocks."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=like.device)
    return gs.unsqueeze(-1) if gs.dim() > 0 else gs


def nvfp4_block_scale_bits(
    block_amax: torch.Tensor, global_scale: torch.Tensor, tiny_scale: TinyScale = "zero"
) -> torch.Tensor:
    """E4M3 bytes of the block scales ``e4m3(min(block_amax / (6*gs), 448))``.

    ``global_scale`` must already broadcast against ``block_amax``. A zero ``gs`` gives ratio 0
    (not 0/0), so every block of an all-zero tensor gets scale 0.
    """
    gs6 = global_scale * E2M1_MAX
    positive = gs6 > 0
    ratio = torch.where(positive, block_amax / torch.where(positive, gs6, 1.0), 0.0)
    if tiny_scale == "zero":
        return float_to_e4m3_bits_fast(torch.clamp(ratio, max=E4M3_MAX))
    if tiny_scale == "modelopt":
        bits = float_to_e4m3_bits_fast(torch.clamp(ratio, min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX))
        return torch.where(ratio == 0, _E4M3_BITS_ONE, bits)
    raise ValueError(f"tiny_scale must be 'zero' or 'modelopt', got {tiny_scale!r}")


def _e4m3_decode(bits: torch.Tensor) -> torch.Tensor:
    """FP32 values of E4M3 bytes: torch's ``float8_e4m3fn`` view on CPU (the same value as the
    table for every byte, NaN bytes giving NaN; ``tests/test_formats_e4m3.py``), the table
    elsewhere."""
    if bits.device.type == "cpu":
        return bits.view(torch.float8_e4m3fn).float()
    return e4m3_bits_to_float(bits)


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | float, tiny_scale: TinyScale = "zero"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode finite ``x`` ``[..., D]`` (``D % 16 == 0``).

    Returns ``(codes, scales)``: packed E2M1 codes uint8 ``[..., D/2]`` (even element in the
    low nibble) and E4M3 block-scale bytes uint8 ``[..., D/16]``. ``global_scale`` is the FP32
    decode scale, broadcastable to ``[..., 1]``.

    The same bytes as :func:`quantize_nvfp4_reference` (the definition, written with the
    reference encoders) in fewer tensor operations: a decode step encodes one token per layer,
    where the cost is the number of ops, not their size. ``tests/test_formats_nvfp4.py`` checks
    the two agree on ties, boundaries, zeros, tiny and huge blocks, NaN/Inf and random data.
    """
    xf = x.float()
    blocks = xf.unflatten(-1, (-1, NVFP4_BLOCK))
    gs = _scale_for_blocks(global_scale, xf)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale_bits = nvfp4_block_scale_bits(block_amax, gs, tiny_scale)
    decode_scale = _e4m3_decode(scale_bits) * gs  # float(s) * gs, FP32
    nonzero = decode_scale > 0
    # where the scale is 0 (or NaN) the codes are 0: y = 0 encodes as code 0
    scaled = torch.where(nonzero, blocks / decode_scale, 0.0)
    return rne_e2m1_packed(scaled.flatten(-2)), scale_bits.squeeze(-1)


def nvfp4_step_encoder(global_scale: torch.Tensor) -> StepEncoder | None:
    """The ``tiny_scale="zero"`` encoder of :meth:`NVFP4Format.step_encoder`; None unless the
    FP32 ``global_scale`` is on the CPU, finite and positive everywhere.

    The same arithmetic as :func:`quantize_nvfp4` and :meth:`NVFP4Format.dequantize`, with
    what only the scale decides done once: ``gs * 6`` is positive everywhere, so the two
    ``where(gs6 > 0, ...)`` of :func:`nvfp4_block_scale_bits` are identities; the block ratio
    ``amax / gs6`` is never NaN (finite over positive), so the NaN repair of
    :func:`~nvfp4kv.formats.e4m3.float_to_e4m3_bits_fast` (and its host sync) and the
    ``nan_to_num`` of the E2M1 rounding are no-ops (:func:`rne_e2m1_packed_finite`); decoded
    values come from the E2M1 buckets (the same table values the decoder reads) times the
    same ``float(s) * gs``; and when ``2 * 2688 * gs`` is below FP32's maximum, no FP32
    product can overflow, so the FP32 output's saturating clamp is skipped.
    """
    gs = global_scale
    if gs.dtype != torch.float32 or gs.device.type != "cpu":
        return None
    gs_b = _scale_for_blocks(gs, gs)
    gs6 = gs_b * E2M1_MAX
    if not bool((torch.isfinite(gs_b) & (gs6 > 0)).all()):
        return None
    fp32_safe = bool(gs.amax() * (2 * NVFP4_RANGE) < torch.finfo(torch.float32).max)

    def encode(x: torch.Tensor, dtype: torch.dtype | None) -> tuple[Parts, torch.Tensor | None]:
        blocks = x.float().unflatten(-1, (-1, NVFP4_BLOCK))
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
        scale_fp8 = (block_amax / gs6).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
        decode_scale = scale_fp8.float() * gs_b  # float(s) * gs
        scaled = torch.where(decode_scale > 0, blocks / decode_scale, 0.0)
        packed, values = rne_e2m1_packed_finite(scaled, with_values=dtype is not None)
        parts = {"codes": packed.flatten(-2), "scales": scale_fp8.view(torch.uint8).squeeze(-1)}
        if dtype is None:
            return parts, None
        out = (values * decode_scale).flatten(-2)  # type: ignore[operator]
        if dtype != torch.float32 or not fp32_safe:
            out = saturate_(out.to(dtype))
        return parts, out

    return encode


def quantize_nvfp4_reference(
    x: torch.Tensor, global_scale: torch.Tensor | float, tiny_scale: TinyScale = "zero"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_nvfp4` written with the reference encoders (integer E4M3 rounding,
    threshold E2M1 rounding, table decode, nibble packing): the definition it must equal."""
    xf = x.float()
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = _scale_for_blocks(global_scale, xf)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    gs6 = gs * E2M1_MAX
    safe = torch.where(gs6 > 0, gs6, torch.ones_like(gs6))
    ratio = torch.where(gs6 > 0, block_amax / safe, torch.zeros_like(block_amax))
    if tiny_scale == "zero":
        scale_bits = float_to_e4m3_bits(torch.clamp(ratio, max=E4M3_MAX))
    elif tiny_scale == "modelopt":
        bits = float_to_e4m3_bits(torch.clamp(ratio, min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX))
        scale_bits = torch.where(ratio == 0, torch.full_like(bits, _E4M3_BITS_ONE), bits)
    else:
        raise ValueError(f"tiny_scale must be 'zero' or 'modelopt', got {tiny_scale!r}")
    decode_scale = e4m3_bits_to_float(scale_bits) * gs
    nonzero = decode_scale > 0
    scaled = blocks / torch.where(nonzero, decode_scale, torch.ones_like(decode_scale))
    codes = torch.where(nonzero, rne_e2m1_codes(scaled), torch.zeros((), dtype=torch.uint8))
    return pack_nibbles(codes.flatten(-2)), scale_bits.squeeze(-1)


def dequantize_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``(codes, scales)`` from :func:`quantize_nvfp4`: ``e2m1(q) * (float(s) * gs)``."""
    values = decode_packed_e2m1(codes)
    blocks = values.reshape(*values.shape[:-1], values.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = _scale_for_blocks(global_scale, values)
    decode_scale = e4m3_bits_to_float(scales).unsqueeze(-1) * gs
    return (blocks * decode_scale).flatten(-2).to(dtype)


@register_format("nvfp4")
@dataclass(frozen=True)
class NVFP4Format(KVFormat):
    """NVFP4 K/V storage: uint8 parts ``codes`` ``[B,H,T,D/2]`` and ``scales`` ``[B,H,T,D/16]``."""

    kernels = FormatKernels(
        triton="nvfp4kv.kernels.triton_nvfp4:TRITON",
        flashinfer="nvfp4kv.kernels.flashinfer_nvfp4:NVFP4FlashInfer",
        fused_decode="nvfp4kv.kernels.triton_nvfp4:decode_operand",
    )

    rowwise: ClassVar[bool] = True  # every [..., D] row on its own (see KVFormat.rowwise)
    name: str = field(default="nvfp4", init=False)
    #: ``"zero"`` (serving kernels) or ``"modelopt"`` (clamp scales up to 2^-9), see module
    tiny_scale: TinyScale = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tiny_scale not in ("zero", "modelopt"):
            raise ValueError(
                f"nvfp4 option tiny_scale must be 'zero' or 'modelopt', got {self.tiny_scale!r}"
            )

    @property
    def block_size(self) -> int:
        return NVFP4_BLOCK

    @property
    def uses_global_scale(self) -> bool:
        return True

    def bits_per_element(self, head_dim: int) -> float:
        return 4.0 + 8.0 / NVFP4_BLOCK

    def global_scale(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_global_scale(x).reshape(1, 1, 1, 1)

    def supports_scale_convention(self, convention: str) -> bool:
        return convention in available_conventions()

    def static_decode_scale(self, value: float, convention: str) -> float:
        """Checkpoint/library scales (ModelOpt, FlashInfer, TRT-LLM, amax) -> ``amax/(6*448)``."""
        return value if convention == "decode" else to_decode_scale(value, convention)

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self.check_input(x)
        gs = (
            self.global_scale(x)
            if global_scale is None
            else torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        )
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, NVFP4_RANGE * gs)
        codes, scales = quantize_nvfp4(x, gs, self.tiny_scale)
        return {"codes": codes, "scales": scales}

    def step_encoder(self, global_scale: torch.Tensor | None) -> StepEncoder | None:
        """:func:`nvfp4_step_encoder` for ``tiny_scale="zero"`` (see KVFormat.step_encoder)."""
        if global_scale is None or self.tiny_scale != "zero":
            return None
        return nvfp4_step_encoder(global_scale)

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if global_scale is None:
            raise ValueError(
                "nvfp4 dequantize needs the global scale used to quantize these parts; pass "
                "the one the cache stored (or format.global_scale(x) for a one-off round trip)."
            )
        return saturate_(dequantize_nvfp4(parts["codes"], parts["scales"], global_scale, dtype))
