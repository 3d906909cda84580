"""``bf16``: identity storage in bfloat16, the reference every other format is compared to.

Part ``values`` ``[B, H, T, D]`` bfloat16 (16 bits per element). A model running in BF16
writes and reads back exactly the tensors it produced, so a cache using this format is
bit-identical to ``DynamicCache``. Inputs in FP32/FP16 are rounded to BF16 (RNE, torch's cast).

Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-3.3895e38 (BF16's largest
finite value). BF16 itself could store Inf/NaN; refusing them by default keeps every format's
behaviour on bad numerics the same. ``nonfinite="keep"`` stores and returns them as they are.

Finite in, finite out (saturation, as engines' ``satfinite`` conversions do): FP32 input beyond
BF16's range is stored as +-BF16 max (a plain cast would round it to Inf), and decoding to FP16
clamps at +-65504 (an FP16 65504 rounds to BF16 65536, which a plain cast back turns into
Inf). Nothing changes for values in range, so a BF16 model still round-trips bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from nvfp4kv.formats.base import KVFormat, Parts, register_format
from nvfp4kv.formats.numerics import has_nonfinite, map_nonfinite, saturating_cast

BF16_MAX = torch.finfo(torch.bfloat16).max


@register_format("bf16")
@dataclass(frozen=True)
class BF16Format(KVFormat):
    """Identity (BF16) K/V storage."""

    rowwise: ClassVar[bool] = True  # every [..., D] row on its own (see KVFormat.rowwise)
    name: str = field(default="bf16", init=False)

    @property
    def block_size(self) -> int:
        return 1

    def bits_per_element(self, head_dim: int) -> float:
        return 16.0

    def quantize(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> Parts:
        self.check_input(x)
        if self.nonfinite == "map" and has_nonfinite(x):
            x = map_nonfinite(x, BF16_MAX)
        return {"values": saturating_cast(x, torch.bfloat16)}

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        values = parts["values"]
        if self.nonfinite == "keep":  # stored Inf stays Inf; finite values still saturate
            return saturating_cast(values, dtype)
        limit = torch.finfo(dtype).max if dtype.is_floating_point else BF16_MAX
        if limit >= BF16_MAX:  # BF16, FP32, FP64 hold every BF16 value: a plain (free) cast
            return values.to(dtype)
        return values.float().clamp(-limit, limit).to(dtype)  # in FP32: BF16 cannot hold 65504
