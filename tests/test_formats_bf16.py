"""bf16: identity storage, bit-exact for BF16 input."""

from __future__ import annotations

import torch

from nvfp4kv.formats import get_format


def test_bf16_input_is_stored_and_returned_bit_exactly() -> None:
    fmt = get_format("bf16")
    x = (torch.randn(2, 3, 7, 40) * 100).to(torch.bfloat16)  # any head_dim works
    parts = fmt.quantize(x)
    assert list(parts) == ["values"] and parts["values"].dtype == torch.bfloat16
    out = fmt.dequantize(parts, None, torch.bfloat16)
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))
    assert fmt.bits_per_element(128) == 16.0 and fmt.block_size == 1


def test_fp32_input_is_rounded_to_bf16() -> None:
    fmt = get_format("bf16")
    x = torch.tensor([[[[1.0 + 2.0**-9, 3.14159]]]])
    out = fmt.dequantize(fmt.quantize(x), None, torch.float32)
    assert torch.equal(out, x.to(torch.bfloat16).float())
