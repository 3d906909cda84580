"""The ``triton`` backend: each format's declared Triton kernels, bit-exact with its reference.

Selected through :func:`nvfp4kv.kernels.backend.get_backend` (see that module for the backend
interface). Per call it asks the *format* for its kernel (``fmt.kernels.triton``); a format
that declares none, an output dtype the kernels do not write, and input holding NaN/Inf under
``nonfinite="map"`` go to the reference, which gives the same bits by definition (logged
once). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; how CI
tests it). Importing this module does not import Triton.
"""

from __future__ import annotations

import logging
import os

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.formats.numerics import has_nonfinite
from nvfp4kv.kernels.kernel_lookup import first_part, format_kernel

logger = logging.getLogger("nvfp4kv.kernels")

#: output dtypes the Triton dequantize kernels write
TRITON_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from nvfp4kv.kernels import triton_common

    return isinstance(triton_common.e4m3_decode, InterpretedFunction)


_LOGGED: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message)


def triton_import_error() -> str | None:
    """Why ``import triton`` fails here (None when it works)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"the `triton` package cannot be imported ({err})"
    return None


class TritonBackend:
    """The formats' declared Triton kernels, bit-exact with the references (module docstring)."""

    name = "triton"
    bit_exact = True

    def __init__(self) -> None:
        err = triton_import_error()
        if err is None and not torch.cuda.is_available() and not triton_interpreting():
            err = (
                "no CUDA GPU is visible and Triton is not in interpreter mode "
                f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})"
            )
        if err is not None:
            raise BackendUnavailableError(
                f"KV backend 'triton' cannot run: {err}. Fix: run on a CUDA GPU with triton installed "
                f"(pip install 'nvfp4kv[gpu]'), set TRITON_INTERPRET=1 before importing nvfp4kv to run "
                f"the kernels on CPU (slow, for tests), or use backend='torch' or 'auto'."
            )

    def _check_device(self, t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            return
        if t.device.type == "cpu" and triton_interpreting():
            return
        raise BackendUnavailableError(
            f"KV backend 'triton' got a tensor on {t.device}; its kernels run on CUDA tensors "
            f"(CPU only under TRITON_INTERPRET=1). Fix: move the model to CUDA, or use "
            f"backend='torch' or 'auto' (which picks torch for CPU tensors)."
        )

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        kernel = format_kernel(fmt, "triton")
        if kernel is None:
            _log_once(f"ref:{fmt.name}", f"triton backend: no kernel for {fmt.name!r}; using its reference (same bits)")
            return fmt.quantize(x, global_scale)
        self._check_device(x)
        fmt.check_input(x)
        if fmt.nonfinite == "map" and has_nonfinite(x):
            _log_once("map", "triton backend: NaN/Inf under nonfinite='map' go through the reference (same bits)")
            return fmt.quantize(x, global_scale)
        return kernel.quantize(fmt, x, global_scale)

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        kernel = format_kernel(fmt, "triton")
        if kernel is None or dtype not in TRITON_OUT_DTYPES:
            return fmt.dequantize(parts, global_scale, dtype)
        self._check_device(first_part(parts))
        return kernel.dequantize(fmt, parts, global_scale, dtype)

    def __repr__(self) -> str:
        return "TritonBackend()"
