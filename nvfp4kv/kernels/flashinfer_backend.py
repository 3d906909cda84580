"""The ``flashinfer`` backend: each format's declared FlashInfer kernels (opt-in, not bit-exact).

Selected through :func:`nvfp4kv.kernels.backend.get_backend`. FlashInfer's FP4 KV kernels need
sm_100+ (a native FP4 convert); a format whose class declares no ``flashinfer`` kernel is
refused with the fix, never served by different numerics. Which formats have one, and how
they differ from the references, is in their kernel modules (NVFP4:
:mod:`nvfp4kv.kernels.flashinfer_nvfp4`). ``auto`` never picks this backend.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KernelSlot, KVFormat, Parts
from nvfp4kv.kernels.kernel_lookup import format_kernel

#: FlashInfer's FP4 KV kernels need a native FP4 convert (Blackwell)
FLASHINFER_MIN_SM = 100


def load_flashinfer() -> tuple[ModuleType | None, str | None]:
    """The ``flashinfer`` module, or the reason it cannot be imported."""
    try:
        return importlib.import_module("flashinfer"), None
    except ImportError as err:
        return None, f"the `flashinfer` package is not importable ({err})"


def flashinfer_unavailable_reason() -> str | None:
    """Why the FlashInfer backend cannot run here, or None when it can."""
    mod, err = load_flashinfer()
    reasons = [] if err is None else [err]
    if mod is not None and not all(hasattr(mod, f) for f in ("nvfp4_kv_quantize", "nvfp4_kv_dequantize")):
        reasons.append("this flashinfer version lacks nvfp4_kv_quantize / nvfp4_kv_dequantize")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    else:
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor < FLASHINFER_MIN_SM:
            reasons.append(
                f"the GPU is sm_{major}{minor}; FlashInfer's FP4 KV quantize needs sm_100+ (Blackwell) "
                f"for its native FP4 convert"
            )
    return "; ".join(reasons) if reasons else None


class FlashInferBackend:
    """The formats' declared FlashInfer kernels (not bit-exact; see module docstring).

    ``module`` replaces the imported ``flashinfer`` (tests use a stand-in to check the
    plumbing on machines without it).
    """

    name = "flashinfer"
    bit_exact = False

    def __init__(self, module: ModuleType | None = None) -> None:
        if module is None:
            reason = flashinfer_unavailable_reason()
            if reason is not None:
                raise BackendUnavailableError(
                    f"KV backend 'flashinfer' cannot run: {reason}. Fix: on a Blackwell GPU "
                    f"`pip install flashinfer-python`; otherwise use backend='triton' (bit-exact "
                    f"Triton kernels, any CUDA GPU) or 'auto'."
                )
            module, _ = load_flashinfer()
        self._fi = module
        self._codecs: dict[type, Any] = {}

    def _codec(self, fmt: KVFormat) -> Any:
        cls = type(fmt)
        if cls not in self._codecs:
            factory = format_kernel(fmt, "flashinfer")
            if factory is None:
                raise BackendUnavailableError(
                    f"KV backend 'flashinfer' only implements {', '.join(_formats_with('flashinfer'))}, "
                    f"not {fmt!r}. Fix: use backend='triton' or 'auto' for this format."
                )
            self._codecs[cls] = factory(self._fi)
        return self._codecs[cls]

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        return self._codec(fmt).quantize(fmt, x, global_scale)

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._codec(fmt).dequantize(fmt, parts, global_scale, dtype)

    def __repr__(self) -> str:
        return "FlashInferBackend()"


def _formats_with(slot: KernelSlot) -> list[str]:
    """Registered formats whose class declares a kernel for ``slot`` (for error messages)."""
    from nvfp4kv.formats import FormatKernels, available_formats, format_class

    return [n for n in available_formats() if getattr(format_class(n), "kernels", FormatKernels()).has(slot)]
