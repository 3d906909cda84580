"""``bf16``: identity storage in bfloat16, the reference every other format is compared to.

Part ``values`` ``[B, H, T, D]`` bfloat16 (16 bits per element). A model running in BF16
writes and reads back exactly the tensors it produced, so a cache using this format is
bit-identical to ``DynamicCache``. Inputs in FP32/FP16 are rounded to BF16 (RNE, torch's cast).

Non-finite input with ``nonfinite="map"``: NaN -> 0, +-Inf -> +-3.3895e38 (BF16's largest
finite value). BF16 itself could store Inf/NaN; refusing them by default keeps every format's
behaviour on bad numerics the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nvfp4kv.formats.base import KVFormat, Parts, register_format
from nvfp4kv.formats.numerics import has_nonfinite, map_nonfinite

BF16_MAX = torch.finfo(torch.bfloat16).max


@register_format("bf16")
@dataclass(frozen=True)
class BF16Format(KVFormat):
    """Identity (BF16) K/V storage."""

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
        return {"values": x.to(torch.bfloat16)}

    def dequantize(
        self, parts: Parts, global_scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        return parts["values"].to(dtype)
