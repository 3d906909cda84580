"""Which code encodes and decodes the cache's K/V: the bit-exact torch references or a kernel backend.

The cache talks to a *codec*: ``quantize(fmt, x, global_scale) -> parts`` and
``dequantize(fmt, parts, global_scale, dtype) -> tensor``, with the same meaning as the format's
own methods. :class:`TorchCodec` simply calls them (the references, on any device). Other
backends (Triton, FlashInfer) live in :mod:`nvfp4kv.kernels`; they are looked up lazily, only
when a config names one, so the cache imports nothing GPU-specific on CPU machines.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats.base import KVFormat, Parts


@runtime_checkable
class KVCodec(Protocol):
    """What the cache needs from a backend (bit-exact with the format's reference methods)."""

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts: ...

    def dequantize(self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor: ...


class TorchCodec:
    """The PyTorch references: each format's own ``quantize`` / ``dequantize``."""

    name = "torch"

    def quantize(self, fmt: KVFormat, x: torch.Tensor, global_scale: torch.Tensor | None) -> Parts:
        return fmt.quantize(x, global_scale)

    def dequantize(self, fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
        return fmt.dequantize(parts, global_scale, dtype)

    def __repr__(self) -> str:
        return "TorchCodec()"


def resolve_codec(name: str) -> KVCodec:
    """The codec for a config's ``backend``; anything but ``"torch"`` comes from nvfp4kv.kernels."""
    if name == "torch":
        return TorchCodec()
    try:
        kernels = importlib.import_module("nvfp4kv.kernels")
        get_backend = kernels.get_backend
    except (ModuleNotFoundError, AttributeError) as err:
        raise BackendUnavailableError(
            f"KV cache backend {name!r} needs nvfp4kv.kernels.get_backend, which is not available ({err}). "
            f"Use backend='torch' (the bit-exact references, any device)."
        ) from None
    codec = get_backend(name)
    if not isinstance(codec, KVCodec):
        raise BackendUnavailableError(
            f"nvfp4kv.kernels.get_backend({name!r}) returned {type(codec).__name__}, which lacks "
            f"quantize(fmt, x, global_scale) / dequantize(fmt, parts, global_scale, dtype); "
            f"use backend='torch'."
        )
    return codec
