"""Named conventions for NVFP4's per-tensor scale, converted at the boundary.

Inside nvfp4kv an NVFP4 global scale is always the *decode* scale ``gs = amax / (6 * 448)``
(what ModelOpt exports as ``k_scale``/``v_scale``): ``x_hat = e2m1 * (e4m3_block_scale * gs)``.
Libraries spell the same number differently, and a static scale read from a checkpoint or
handed to a kernel must be converted exactly once, here:

============================  ========================  ==========================================
convention                    value                     who uses it
============================  ========================  ==========================================
``"decode"``                  ``amax / (6*448)`` = gs   ModelOpt checkpoints, nvfp4kv internally
``"flashinfer_encode"``       ``448*6 / amax`` = 1/gs   FlashInfer ``fp4_quantize`` global scale
``"flashinfer_paged_kv"``     ``448 / amax`` = 1/(6gs)  FlashInfer ``nvfp4_quantize_paged_kv_cache``
``"trtllm_xqa"``              ``amax / 448`` = 6gs      TRT-LLM XQA (SGLang multiplies by 6)
``"amax"``                    ``amax`` = 2688gs         a calibrated absolute maximum
============================  ========================  ==========================================

Arithmetic is FP32 (the dtype scales are stored in). Reciprocal conventions turn 0 into Inf
and back; a round trip ``from_decode_scale(to_decode_scale(v))`` is exact for ``decode`` and
within a few FP32 ulps for the others (each direction rounds once or twice).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from nvfp4kv.errors import ConfigError
from nvfp4kv.formats.numerics import divide

ScaleConvention = Literal[
    "decode", "flashinfer_encode", "flashinfer_paged_kv", "trtllm_xqa", "amax"
]

#: ``6 * 448``: E2M1 max times E4M3 max, the amax a decode scale of 1 covers
NVFP4_RANGE = 6.0 * 448.0  # == e2m1.E2M1_MAX * e4m3.E4M3_MAX

# (kind, m): "mul" means value = m * gs; "recip" means value = 1 / (m * gs). Every m is a
# small integer, exact in FP32, so each conversion rounds at most twice.
_CONVENTIONS: dict[str, tuple[str, float]] = {
    "decode": ("mul", 1.0),
    "trtllm_xqa": ("mul", 6.0),
    "amax": ("mul", NVFP4_RANGE),
    "flashinfer_encode": ("recip", 1.0),
    "flashinfer_paged_kv": ("recip", 6.0),
}


def available_conventions() -> list[str]:
    """Names accepted by :func:`to_decode_scale` / :func:`from_decode_scale`."""
    return sorted(_CONVENTIONS)


def _lookup(convention: str) -> tuple[str, float]:
    try:
        return _CONVENTIONS[convention]
    except KeyError:
        raise ConfigError(
            f"Unknown NVFP4 scale convention {convention!r}. Known: "
            f"{', '.join(available_conventions())}. Set scale_convention to one of these "
            f"(ModelOpt checkpoints use 'decode')."
        ) from None


@overload
def to_decode_scale(value: float, convention: str) -> float: ...
@overload
def to_decode_scale(value: torch.Tensor, convention: str) -> torch.Tensor: ...
def to_decode_scale(value: float | torch.Tensor, convention: str) -> float | torch.Tensor:
    """Convert a scale given in ``convention`` to nvfp4kv's decode scale ``amax/(6*448)``."""
    kind, m = _lookup(convention)
    v = torch.as_tensor(value, dtype=torch.float32)
    gs = divide(v, m) if kind == "mul" else torch.reciprocal(m * v)
    return float(gs) if not isinstance(value, torch.Tensor) else gs


@overload
def from_decode_scale(gs: float, convention: str) -> float: ...
@overload
def from_decode_scale(gs: torch.Tensor, convention: str) -> torch.Tensor: ...
def from_decode_scale(gs: float | torch.Tensor, convention: str) -> float | torch.Tensor:
    """Convert nvfp4kv's decode scale to ``convention`` (the inverse of :func:`to_decode_scale`)."""
    kind, m = _lookup(convention)
    g = torch.as_tensor(gs, dtype=torch.float32)
    value = g * m if kind == "mul" else torch.reciprocal(m * g)
    return float(value) if not isinstance(gs, torch.Tensor) else value
