"""Host-side helpers shared by the Triton quantize/dequantize wrappers.

Kernels address a ``[B, H, T, D]`` tensor by *rows* (one row = one token of one head) and
take the input's four strides, so a transposed ``key_states`` view from a transformers
attention layer is read in place, without a ``.contiguous()`` copy. Per-row scalars (the
global scale, FP8 per-token scales) are passed as expanded views whose broadcast dims have
stride 0, so ``[1,1,1,1]``, ``[1,H,1,1]`` and ``[1,H,T,1]`` scales all cost nothing extra.
"""

from __future__ import annotations

import torch

#: output dtype -> constexpr code used by the kernels' stores
OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

#: elements one program handles (rows x head_dim); a good size for memory-bound kernels
TILE_ELEMENTS = 4096


def as_4d(x: torch.Tensor) -> torch.Tensor:
    """View ``[..., D]`` as ``[B, H, T, D]`` (leading dims folded into T when not 4-D)."""
    if x.dim() == 4:
        return x
    if x.dim() == 0:
        raise ValueError("a KV tensor needs at least one dim (head_dim)")
    return x.reshape(1, 1, -1, x.shape[-1])


def row_scalar_view(
    value: torch.Tensor | float | None, b: int, h: int, t: int, device: torch.device
) -> tuple[torch.Tensor, int, int, int]:
    """An FP32 per-row scalar broadcast to ``[B, H, T]`` with stride 0 where it is shared.

    ``value`` must broadcast to ``[B, H, T, 1]`` (the format contract for global scales).
    Pass a tensor already on ``device``: a Python number becomes a host-to-device copy, which
    blocks the host on every call.
    """
    if value is None:
        value = 1.0
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if v.dim() > 4:
        raise ValueError(f"a scale broadcastable to [B, H, T, 1] has at most 4 dims, got {tuple(v.shape)}")
    while v.dim() < 4:
        v = v.unsqueeze(0)
    try:
        view = v.expand(b, h, t, 1)[..., 0]
    except RuntimeError:
        raise ValueError(
            f"scale of shape {tuple(v.shape)} does not broadcast to [B, H, T, 1] = [{b}, {h}, {t}, 1]"
        ) from None
    return view, view.stride(0), view.stride(1), view.stride(2)


def as_scale(global_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A global scale as an FP32 tensor on ``like``'s device (no copy when it already is one)."""
    return torch.as_tensor(global_scale, dtype=torch.float32, device=like.device)


def out_kind(dtype: torch.dtype) -> int:
    """Kernel store mode for ``dtype`` (BF16 is written as RNE bits through an int16 view)."""
    try:
        return OUT_KIND[dtype]
    except KeyError:
        raise ValueError(f"Triton dequantize writes bf16, fp16 or fp32, not {dtype}") from None


def store_view(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel stores into: BF16 outputs are written as int16 bit patterns."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def rows_per_program(row_elements: int) -> int:
    """Rows per program so that a tile holds about :data:`TILE_ELEMENTS` elements (power of 2)."""
    rows = max(1, TILE_ELEMENTS // max(1, row_elements))
    return 1 << (rows.bit_length() - 1)
