"""nvfp4's FlashInfer kernels (served by the opt-in ``flashinfer`` backend; *not* bit-exact).

FlashInfer (``flashinfer/fp4_quantization.py`` and the CUDA kernels behind it, read for this
module in flashinfer-ai/flashinfer) exposes

- ``nvfp4_kv_quantize(input [M, K] bf16|fp16, global_scale [1] fp32) -> (fp4 [M, K/2] uint8,
  block_scales [M, K/16] uint8)``, sm_100+ only (it needs ``cvt.rn.satfinite.e2m1x2.f32``);
- ``nvfp4_kv_dequantize(fp4, block_scales, global_scale, output_dtype) -> [M, K]``, sm_80+.

Scale convention at the boundary: these two KV functions take the *decode* scale
``gs = amax / (6 * 448)`` (the kernel computes the block scale as ``rcp(gs) * amax / 6`` and
decodes ``e2m1 * s * gs``), unlike FlashInfer's generic ``fp4_quantize`` whose global scale is
the *encode* scale ``448 * 6 / amax``. The conversion below is therefore the identity, and is
spelled out through :mod:`nvfp4kv.formats.conventions` so that a future API change is a
one-line fix here.

Why not bit-exact with :mod:`nvfp4kv.formats.nvfp4`: FlashInfer multiplies by
``rcp.approx.ftz`` reciprocals instead of dividing (codes can differ next to rounding
thresholds, block scales next to E4M3 ties), and dequantizes ``(q * s) * gs`` where the
reference (ModelOpt) does ``q * (s * gs)`` (last-bit differences). It never becomes a silent
default: ``auto`` does not pick it, and the backend says ``bit_exact = False``. Dequantized
outputs saturate at the output dtype's largest finite value, as the reference does (FlashInfer
itself would return Inf past FP16's 65504).

:class:`NVFP4FlashInfer` is what :class:`~nvfp4kv.formats.nvfp4.NVFP4Format` declares as its
FlashInfer kernel; availability checks and the backend are in
:mod:`nvfp4kv.kernels.flashinfer_backend`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.formats.conventions import from_decode_scale
from nvfp4kv.formats.numerics import saturate_

#: nvfp4kv's name for the scale convention FlashInfer's KV functions use (see module docstring)
FLASHINFER_KV_CONVENTION = "decode"


def to_flashinfer_kv_scale(global_scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """nvfp4kv's decode scale -> the ``[1]`` FP32 tensor FlashInfer's KV functions take."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if gs.numel() != 1:
        raise BackendUnavailableError(
            f"KV backend 'flashinfer' takes one global scale per tensor, got shape {tuple(gs.shape)} "
            f"(a per-head or per-write scale). Fix: scale_policy with a per-tensor scale, or "
            f"backend='triton' (bit-exact, any granularity)."
        )
    return from_decode_scale(gs.reshape(1), FLASHINFER_KV_CONVENTION).contiguous()


class NVFP4FlashInfer:
    """NVFP4 quantize/dequantize through FlashInfer's KV functions (``module`` is ``flashinfer``)."""

    def __init__(self, module: ModuleType) -> None:
        self._fi = module

    @staticmethod
    def _check_format(fmt: KVFormat) -> None:
        if getattr(fmt, "tiny_scale", "zero") != "zero":
            raise BackendUnavailableError(
                f"KV backend 'flashinfer' only implements nvfp4 with tiny_scale='zero' (FlashInfer's "
                f"serving semantics), not {fmt!r}. Fix: use backend='triton' or 'auto' for this format."
            )

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self._check_format(fmt)
        fmt.check_input(x)
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise BackendUnavailableError(
                f"KV backend 'flashinfer' quantizes bf16/fp16 input, got {x.dtype}. Fix: run the "
                f"model in bf16/fp16, or use backend='triton'."
            )
        gs = fmt.global_scale(x) if global_scale is None else global_scale
        fi_scale = to_flashinfer_kv_scale(gs, x.device)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        codes, scales = self._fi.nvfp4_kv_quantize(flat, fi_scale)
        return {
            "codes": codes.view(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 2),
            "scales": scales.view(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 16),
        }

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        self._check_format(fmt)
        if global_scale is None:
            return fmt.dequantize(parts, global_scale, dtype)  # raises the reference's error
        if dtype not in (torch.bfloat16, torch.float16):
            raise BackendUnavailableError(
                f"KV backend 'flashinfer' dequantizes to bf16/fp16, not {dtype}. Fix: use backend='triton'."
            )
        codes, scales = parts["codes"], parts["scales"]
        lead = codes.shape[:-1]
        out = self._fi.nvfp4_kv_dequantize(
            codes.reshape(-1, codes.shape[-1]).contiguous(),
            scales.reshape(-1, scales.shape[-1]).contiguous(),
            to_flashinfer_kv_scale(global_scale, codes.device),
            output_dtype=dtype,
        )
        return saturate_(out.reshape(*lead, codes.shape[-1] * 2))  # finite in, finite out

    def __repr__(self) -> str:
        return "NVFP4FlashInfer()"
