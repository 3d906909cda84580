"""Kernels: Triton quantize/dequantize bit-exact with the references, backend selection,
fused packed-KV decode attention and its transformers attention function.

Importing this package does not import Triton or transformers; the submodules do, when used.
Which kernels a format has is declared by the format itself (``FormatKernels`` on its class);
no module here keeps a table of format names.

- the backend abstraction: :func:`get_backend` (``torch`` | ``triton`` | ``flashinfer`` |
  ``auto``), :mod:`.backend`; implementations in :mod:`.triton_backend`,
  :mod:`.flashinfer_backend`; per-format kernels in ``triton_<format>.py`` /
  ``flashinfer_<format>.py``
- fused decode: :func:`nvfp4kv.kernels.decode_attention.decode_attention` (host side;
  device code in :mod:`.decode_kernel`, operands in :mod:`.packed_operand`)
- :func:`register_attention` (``attn_implementation="nvfp4kv_decode"``),
  :mod:`.attention_interface`; the cache-to-attention channel, :mod:`.packed_view`
"""

from __future__ import annotations

from typing import Any

from nvfp4kv.errors import BackendUnavailableError

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "register_attention",
]


def get_backend(name: str) -> Any:
    """See :func:`nvfp4kv.kernels.backend.get_backend`."""
    from nvfp4kv.kernels.backend import get_backend as _get

    return _get(name)


def available_backends() -> dict[str, str]:
    """See :func:`nvfp4kv.kernels.backend.available_backends`."""
    from nvfp4kv.kernels.backend import available_backends as _avail

    return _avail()


def register_attention(name: str = "nvfp4kv_decode") -> str:
    """See :func:`nvfp4kv.kernels.attention_interface.register_attention`."""
    from nvfp4kv.kernels.attention_interface import register_attention as _register

    return _register(name)
