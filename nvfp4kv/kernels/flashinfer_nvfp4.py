"""FlashInfer's NVFP4 KV kernels as a backend (opt-in, Blackwell only, *not* bit-exact).

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
default: ``auto`` does not pick it, and it says ``bit_exact = False``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.formats.conventions import from_decode_scale

#: nvfp4kv's name for the scale convention FlashInfer's KV functions use (see module docstring)
FLASHINFER_KV_CONVENTION = "decode"
MIN_SM = 100


def _load_flashinfer() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("flashinfer"), None
    except ImportError as err:
        return None, f"the `flashinfer` package is not importable ({err})"


def unavailable_reason() -> str | None:
    """Why the FlashInfer backend cannot run here, or None when it can."""
    mod, err = _load_flashinfer()
    reasons = [] if err is None else [err]
    if mod is not None and not all(hasattr(mod, f) for f in ("nvfp4_kv_quantize", "nvfp4_kv_dequantize")):
        reasons.append("this flashinfer version lacks nvfp4_kv_quantize / nvfp4_kv_dequantize")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    else:
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor < MIN_SM:
            reasons.append(
                f"the GPU is sm_{major}{minor}; nvfp4_kv_quantize needs sm_100+ (Blackwell) for its "
                f"native FP4 convert"
            )
    return "; ".join(reasons) if reasons else None


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


class FlashInferBackend:
    """NVFP4 quantize/dequantize through FlashInfer (see module docstring for the numerics)."""

    name = "flashinfer"
    bit_exact = False

    def __init__(self, module: ModuleType | None = None) -> None:
        if module is None:
            reason = unavailable_reason()
            if reason is not None:
                raise BackendUnavailableError(
                    f"KV backend 'flashinfer' cannot run: {reason}. Fix: on a Blackwell GPU "
                    f"`pip install flashinfer-python`; otherwise use backend='triton' (bit-exact "
                    f"Triton kernels, any CUDA GPU) or 'auto'."
                )
            module, _ = _load_flashinfer()
        self._fi = module

    def _check_format(self, fmt: KVFormat) -> None:
        if fmt.name != "nvfp4" or getattr(fmt, "tiny_scale", "zero") != "zero":
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
        return out.reshape(*lead, codes.shape[-1] * 2)

    def __repr__(self) -> str:
        return "FlashInferBackend()"
