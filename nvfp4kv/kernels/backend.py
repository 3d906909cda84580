"""The one backend abstraction: which code encodes and decodes the cache's K/V.

A backend has two methods with exactly the meaning of the format's own:
``quantize(fmt, x, global_scale) -> parts`` and ``dequantize(fmt, parts, global_scale, dtype)``
(:class:`KernelBackend`). A cache holds one, chosen in one place, :func:`resolve_backend`
(from ``KVCacheConfig.backend``: ``torch`` | ``triton`` | ``flashinfer`` | ``auto``). Kernels
are found per *format*, through what the format class declares
(:class:`~nvfp4kv.formats.base.FormatKernels`), never through a table of format names.

- ``torch`` (:class:`TorchBackend`): the references themselves (each format's own methods),
  any device.
- ``triton`` (:class:`~nvfp4kv.kernels.triton_backend.TritonBackend`): the formats' Triton
  kernels, bit-exact with the references (same code and scale bytes, same dequantized bits,
  saturation included); formats without one use the reference (same bits).
- ``flashinfer`` (:class:`~nvfp4kv.kernels.flashinfer_backend.FlashInferBackend`): the formats'
  FlashInfer kernels (NVFP4 on sm_100+). Not bit-exact; opt-in only.
- ``auto`` (:class:`AutoBackend`): per call, ``triton`` for CUDA tensors and ``torch``
  otherwise; both bit-exact, so the choice never changes a number. It logs what it picked and
  reports it in ``picked``.

A backend that cannot run raises one :class:`~nvfp4kv.errors.BackendUnavailableError` that
names the reason and the fix. Importing this module imports neither Triton nor FlashInfer.
"""

from __future__ import annotations

import importlib
import logging
from typing import Protocol, runtime_checkable

import torch

from nvfp4kv.errors import BackendUnavailableError, ConfigError
from nvfp4kv.formats.base import KVFormat, Parts
from nvfp4kv.kernels.flashinfer_backend import FlashInferBackend
from nvfp4kv.kernels.kernel_lookup import first_part
from nvfp4kv.kernels.triton_backend import TritonBackend, triton_import_error, triton_interpreting

__all__ = [
    "BACKEND_NAMES",
    "AutoBackend",
    "FlashInferBackend",
    "KernelBackend",
    "TorchBackend",
    "TritonBackend",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "triton_interpreting",
]

logger = logging.getLogger("nvfp4kv.kernels")

#: the values ``KVCacheConfig.backend`` accepts
BACKEND_NAMES: tuple[str, ...] = ("torch", "triton", "flashinfer", "auto")


@runtime_checkable
class KernelBackend(Protocol):
    """What the cache calls to encode/decode K/V (bit-exact with the format's methods unless
    the backend says ``bit_exact = False``)."""

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts: ...

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
        if torch.cuda.is_available() and triton_import_error() is None:
            self._triton = TritonBackend()

    def _route(self, t: torch.Tensor) -> TorchBackend | TritonBackend:
        backend = self._triton if (t.device.type == "cuda" and self._triton) else self._torch
        if self.picked.get(t.device.type) != backend.name:
            self.picked[t.device.type] = backend.name
            logger.info("KV backend 'auto' picked %r for %s tensors", backend.name, t.device.type)
        return backend

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        return self._route(x).quantize(fmt, x, global_scale)

    def dequantize(
        self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._route(first_part(parts)).dequantize(fmt, parts, global_scale, dtype)

    def __repr__(self) -> str:
        return f"AutoBackend(triton={'yes' if self._triton else 'no'}, picked={self.picked})"


_BACKENDS: dict[str, type] = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "flashinfer": FlashInferBackend,
    "auto": AutoBackend,
}


def get_backend(name: str) -> KernelBackend:
    """The backend called ``name`` (``torch``, ``triton``, ``flashinfer``, ``auto``).

    Raises :class:`BackendUnavailableError` (why + fix) when it cannot run here, and
    :class:`ConfigError` for an unknown name.
    """
    cls = _BACKENDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(
            f"Unknown KV kernel backend {name!r}. Known: {', '.join(BACKEND_NAMES)}. "
            f"Set kv.backend to one of these ('auto' picks the fastest bit-exact one)."
        )
    return cls()


def resolve_backend(name: str) -> KernelBackend:
    """The backend a cache uses for ``KVCacheConfig.backend``: the one place it is chosen.

    ``"torch"`` is built here; any other name goes through the package-level
    ``nvfp4kv.kernels.get_backend``, looked up at call time so a deployment (or a test) can
    install its own there; whatever comes back must have ``quantize`` / ``dequantize``.
    """
    if name == "torch":
        return TorchBackend()
    try:
        lookup = importlib.import_module("nvfp4kv.kernels").get_backend
    except (ModuleNotFoundError, AttributeError) as err:
        raise BackendUnavailableError(
            f"KV cache backend {name!r} needs nvfp4kv.kernels.get_backend, which is not available ({err}). "
            f"Use backend='torch' (the bit-exact references, any device)."
        ) from None
    backend = lookup(name)
    if not isinstance(backend, KernelBackend):
        raise BackendUnavailableError(
            f"nvfp4kv.kernels.get_backend({name!r}) returned {type(backend).__name__}, which lacks "
            f"quantize(fmt, x, global_scale) / dequantize(fmt, parts, global_scale, dtype); "
            f"use backend='torch'."
        )
    return backend


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
