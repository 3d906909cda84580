"""Kernel backends for the KV cache: ``torch``, ``triton``, ``flashinfer`` and ``auto``.

A backend has the cache's codec interface (:class:`nvfp4kv.cache.backend.KVCodec`):
``quantize(fmt, x, global_scale) -> parts`` and ``dequantize(fmt, parts, global_scale, dtype)``,
meaning exactly what the format's own methods mean.

- ``torch``: the references themselves (any device).
- ``triton``: Triton kernels, bit-exact with the references (same code and scale bytes, same
  dequantized bits) for ``nvfp4``, ``fp4_mx_block16``, ``mxfp4`` and ``fp8_e4m3``. Runs on CUDA
  tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (slow; how CI tests it).
  Formats without a kernel (``bf16``, ``int4``, ``int2``) and inputs holding NaN/Inf under
  ``nonfinite="map"`` go to the reference, which produces the same bits by definition; that
  is logged once, never a change of numerics.
- ``flashinfer``: FlashInfer's NVFP4 KV kernels (``nvfp4_kv_quantize`` needs sm_100+). Not
  bit-exact: FlashInfer multiplies by an approximate reciprocal of the scale and dequantizes
  as ``(q * s) * gs``; opt-in only, see :mod:`nvfp4kv.kernels.flashinfer_nvfp4`.
- ``auto``: per call, ``triton`` for CUDA tensors and ``torch`` otherwise; both bit-exact, so
  the choice never changes a number. It logs what it picked and reports it in ``picked``.

A backend that cannot run raises one :class:`~nvfp4kv.errors.BackendUnavailableError` that
names the reason and the fix; nothing falls back silently to different numerics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from nvfp4kv.errors import BackendUnavailableError, ConfigError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.formats.numerics import has_nonfinite

logger = logging.getLogger("nvfp4kv.kernels")

BACKEND_NAMES: tuple[str, ...] = ("torch", "triton", "flashinfer", "auto")
#: formats the Triton backend has kernels for
TRITON_FORMATS: tuple[str, ...] = ("nvfp4", "fp4_mx_block16", "mxfp4", "fp8_e4m3")


@runtime_checkable
class KernelBackend(Protocol):
    """The codec interface the cache calls (see module docstring)."""

    name: str

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts: ...

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor: ...


class TorchBackend:
    """The bit-exact PyTorch references (each format's own methods), on any device."""

    name = "torch"
    bit_exact = True

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        return fmt.quantize(x, global_scale)

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return fmt.dequantize(parts, global_scale, dtype)

    def __repr__(self) -> str:
        return "TorchBackend()"


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from nvfp4kv.kernels import triton_nvfp4

    return isinstance(triton_nvfp4._nvfp4_quant_kernel, InterpretedFunction)


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"the `triton` package cannot be imported ({err})"
    return None


_LOGGED: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message)


class TritonBackend:
    """Bit-exact Triton kernels for the four packed formats (see module docstring)."""

    name = "triton"
    bit_exact = True

    def __init__(self) -> None:
        err = _triton_import_error()
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

    # ---- quantize -----------------------------------------------------------------------
    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        if fmt.name not in TRITON_FORMATS:
            _log_once(f"ref:{fmt.name}", f"triton backend: no kernel for {fmt.name!r}; using its reference (same bits)")
            return fmt.quantize(x, global_scale)
        self._check_device(x)
        fmt.check_input(x)
        if fmt.nonfinite == "map" and has_nonfinite(x):
            _log_once("map", "triton backend: NaN/Inf under nonfinite='map' go through the reference (same bits)")
            return fmt.quantize(x, global_scale)
        return _QUANTIZERS[fmt.name](fmt, x, global_scale)

    # ---- dequantize ---------------------------------------------------------------------
    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if fmt.name not in TRITON_FORMATS or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return fmt.dequantize(parts, global_scale, dtype)
        self._check_device(parts["codes"])
        return _DEQUANTIZERS[fmt.name](fmt, parts, global_scale, dtype)

    def __repr__(self) -> str:
        return "TritonBackend()"


def _as_scale(global_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(global_scale, dtype=torch.float32, device=like.device)


def _q_nvfp4(fmt: KVFormat, x: torch.Tensor, gs: torch.Tensor | None) -> Parts:
    from nvfp4kv.kernels.triton_nvfp4 import quantize_nvfp4

    gs_t = fmt.global_scale(x) if gs is None else _as_scale(gs, x)
    codes, scales = quantize_nvfp4(x, gs_t, getattr(fmt, "tiny_scale", "zero"))
    return {"codes": codes, "scales": scales}


def _q_mx16(fmt: KVFormat, x: torch.Tensor, gs: torch.Tensor | None) -> Parts:
    from nvfp4kv.kernels.triton_mx import quantize_fp4_mx_block16

    codes, scales = quantize_fp4_mx_block16(x)
    return {"codes": codes, "scales": scales}


def _q_mxfp4(fmt: KVFormat, x: torch.Tensor, gs: torch.Tensor | None) -> Parts:
    from nvfp4kv.kernels.triton_mx import quantize_mxfp4

    codes, scales = quantize_mxfp4(x)
    return {"codes": codes, "scales": scales}


def _q_fp8(fmt: KVFormat, x: torch.Tensor, gs: torch.Tensor | None) -> Parts:
    from nvfp4kv.kernels.triton_fp8 import quantize_fp8_e4m3

    scaling = getattr(fmt, "scaling", "tensor")
    if scaling == "token":
        codes, token_scale = quantize_fp8_e4m3(x, None, per_token=True)
        return {"codes": codes, "scale": token_scale}  # type: ignore[dict-item]
    scale = fmt.global_scale(x) if gs is None else _as_scale(gs, x)
    codes, _ = quantize_fp8_e4m3(x, scale)
    return {"codes": codes}


def _dq_nvfp4(fmt: KVFormat, parts: Parts, gs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    from nvfp4kv.kernels.triton_nvfp4 import dequantize_nvfp4

    if gs is None:
        return fmt.dequantize(parts, gs, dtype)  # raises the reference's error
    return dequantize_nvfp4(parts["codes"], parts["scales"], _as_scale(gs, parts["codes"]), dtype)


def _dq_mx16(fmt: KVFormat, parts: Parts, gs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    from nvfp4kv.kernels.triton_mx import dequantize_fp4_mx_block16

    return dequantize_fp4_mx_block16(parts["codes"], parts["scales"], dtype)


def _dq_mxfp4(fmt: KVFormat, parts: Parts, gs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    from nvfp4kv.kernels.triton_mx import dequantize_mxfp4

    return dequantize_mxfp4(parts["codes"], parts["scales"], dtype)


def _dq_fp8(fmt: KVFormat, parts: Parts, gs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    from nvfp4kv.kernels.triton_fp8 import dequantize_fp8_e4m3

    scale = parts["scale"] if getattr(fmt, "scaling", "tensor") == "token" else gs
    if scale is None:
        return fmt.dequantize(parts, gs, dtype)  # raises the reference's error
    return dequantize_fp8_e4m3(parts["codes"], _as_scale(scale, parts["codes"]), dtype)


_QUANTIZERS: dict[str, Callable[[KVFormat, torch.Tensor, torch.Tensor | None], Parts]] = {
    "nvfp4": _q_nvfp4,
    "fp4_mx_block16": _q_mx16,
    "mxfp4": _q_mxfp4,
    "fp8_e4m3": _q_fp8,
}
_DEQUANTIZERS: dict[str, Callable[[KVFormat, Parts, torch.Tensor | None, torch.dtype], torch.Tensor]] = {
    "nvfp4": _dq_nvfp4,
    "fp4_mx_block16": _dq_mx16,
    "mxfp4": _dq_mxfp4,
    "fp8_e4m3": _dq_fp8,
}


class AutoBackend:
    """Per call: Triton for CUDA tensors (when it can run), the references otherwise.

    Both are bit-exact, so the routing never changes a number; ``picked`` records, per device
    type, which backend served it, and the first pick per device is logged.
    """

    name = "auto"
    bit_exact = True

    def __init__(self) -> None:
        self._torch = TorchBackend()
        self._triton: TritonBackend | None = None
        self.picked: dict[str, str] = {}
        if torch.cuda.is_available() and _triton_import_error() is None:
            self._triton = TritonBackend()

    def _route(self, t: torch.Tensor) -> KernelBackend:
        backend: KernelBackend = self._triton if (t.device.type == "cuda" and self._triton) else self._torch
        if self.picked.get(t.device.type) != backend.name:
            self.picked[t.device.type] = backend.name
            logger.info("KV backend 'auto' picked %r for %s tensors", backend.name, t.device.type)
        return backend

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        return self._route(x).quantize(fmt, x, global_scale)

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._route(parts["codes"] if "codes" in parts else next(iter(parts.values()))).dequantize(
            fmt, parts, global_scale, dtype
        )

    def __repr__(self) -> str:
        return f"AutoBackend(triton={'yes' if self._triton else 'no'}, picked={self.picked})"


def get_backend(name: str) -> KernelBackend:
    """The backend called ``name`` (``torch``, ``triton``, ``flashinfer``, ``auto``).

    Raises :class:`BackendUnavailableError` (why + fix) when it cannot run here, and
    :class:`ConfigError` for an unknown name.
    """
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        return TritonBackend()
    if name == "auto":
        return AutoBackend()
    if name == "flashinfer":
        from nvfp4kv.kernels.flashinfer_nvfp4 import FlashInferBackend

        return FlashInferBackend()
    raise ConfigError(
        f"Unknown KV kernel backend {name!r}. Known: {', '.join(BACKEND_NAMES)}. "
        f"Set kv.backend to one of these ('auto' picks the fastest bit-exact one)."
    )


def available_backends() -> dict[str, str]:
    """Every backend name -> ``"ok"`` or the reason it cannot run here (for logs and reports)."""
    out = {}
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
            out[name] = "ok"
        except BackendUnavailableError as err:
            out[name] = str(err)
    return out
