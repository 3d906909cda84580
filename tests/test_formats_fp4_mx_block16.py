"""fp4_mx_block16 (SGLang KVFP4QuantizeUtil): power-of-two scales, ties away from zero."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats import get_format
from nvfp4kv.formats.e2m1 import E2M1_BOUNDS, e2m1_lut, unpack_nibbles
from nvfp4kv.formats.fp4_mx_block16 import (
    dequantize_fp4_mx_block16,
    mx16_block_exponent,
    quantize_fp4_mx_block16,
)


def block(values: list[float]) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (16 - len(values)), dtype=torch.float32)


def sglang_transcription(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``batched_quantize`` as written there (FP32, no NaN handling), for comparison."""
    reshaped = x.float().reshape(-1, 16)
    block_max = reshaped.abs().max(dim=-1, keepdim=True).values
    scale_exp = torch.ceil(torch.log2(torch.clamp(block_max / 6.0, min=1e-10)))
    scale_factors = (scale_exp + 127).squeeze(-1).to(torch.uint8)
    scaled = reshaped / torch.exp2(scale_exp)
    sign_bits = (scaled < 0).to(torch.uint8) << 3
    magnitude = torch.sum(scaled.abs().unsqueeze(-1) >= torch.tensor(E2M1_BOUNDS), dim=-1)
    fp4 = (sign_bits + magnitude.to(torch.uint8)).reshape(x.shape)
    packed = (fp4[..., 1::2] << 4) + fp4[..., 0::2]
    return packed, scale_factors.reshape(*x.shape[:-1], -1)


def test_ties_round_away_from_zero() -> None:
    # amax 6 -> e = ceil(log2(1)) = 0 -> byte 127; 0.25->0.5, 2.5->3, 5->6 (unlike RNE)
    x = block([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.2499, -2.5, -5.0])
    codes, scales = quantize_fp4_mx_block16(x)
    assert scales.tolist() == [127]
    assert unpack_nibbles(codes)[:11].tolist() == [1, 2, 3, 4, 5, 6, 7, 7, 0, 13, 15]
    assert dequantize_fp4_mx_block16(codes, scales)[:11].tolist() == [
        0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, 0.0, -3.0, -6.0,
    ]


def test_exponent_is_ceil_log2_of_amax_over_6() -> None:
    x = torch.cat([block([12.0]), block([6.01]), block([3.0]), block([-6.0 * 2.0**-20])])
    _, scales = quantize_fp4_mx_block16(x)
    assert scales.tolist() == [128, 128, 126, 107]


def test_zero_block_gets_exponent_byte_94_and_decodes_to_zero() -> None:
    codes, scales = quantize_fp4_mx_block16(torch.zeros(32))
    assert scales.tolist() == [94, 94]  # ceil(log2(1e-10)) = -33
    assert codes.eq(0).all() and dequantize_fp4_mx_block16(codes, scales).eq(0).all()


def test_negative_zero_and_nan_encode_as_code_zero() -> None:
    x = block([6.0, -0.0, math.nan, -0.1])
    codes, scales = quantize_fp4_mx_block16(x)
    assert scales.tolist() == [127]  # the NaN does not poison the block scale
    assert unpack_nibbles(codes)[:4].tolist() == [7, 0, 0, 8]


def test_never_clips_the_block_max() -> None:
    x = block([7.9, 1.0])  # e = ceil(log2(7.9/6)) = 1: 7.9 / 2 = 3.95 -> 4 -> 8
    out = dequantize_fp4_mx_block16(*quantize_fp4_mx_block16(x))
    assert out[:2].tolist() == [8.0, 1.0]


def sglang_exponent(block_amax: torch.Tensor) -> torch.Tensor:
    return torch.ceil(torch.log2(torch.clamp(block_amax.float() / 6.0, min=1e-10)))


def test_exact_exponent_equals_sglang_fp32_log2_for_every_bf16_and_fp16_amax() -> None:
    for dtype, finite_limit in ((torch.bfloat16, 0x7F80), (torch.float16, 0x7C00)):
        amax = torch.arange(finite_limit, dtype=torch.int32).to(torch.int16).view(dtype).float()
        ours = mx16_block_exponent(amax)
        assert torch.equal(ours.float(), sglang_exponent(amax)), dtype


def test_fp32_amax_just_above_a_power_of_two_takes_the_exact_exponent() -> None:
    # amax / 6 = 16 * (1 + 2^-23): FP32 log2 rounds to 4.0, so SGLang keeps e = 4 (and |x/2^e|
    # slightly above 6); the exact ceil is 5. The only kind of input where the two differ.
    amax = torch.nextafter(torch.tensor(96.0), torch.tensor(1e9))
    assert sglang_exponent(amax).item() == 4.0
    assert mx16_block_exponent(amax).item() == 5


def test_matches_the_sglang_transcription_on_random_data() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 128, generator=gen) * torch.exp(3 * torch.randn(4, 8, 1, generator=gen))
    x[0, 0, :16] = 0.0
    ours, theirs = quantize_fp4_mx_block16(x), sglang_transcription(x)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_format_parts_and_decode_formula() -> None:
    fmt = get_format("fp4_mx_block16")
    x = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(3))
    parts = fmt.quantize(x)
    assert parts["codes"].shape == (1, 2, 3, 16) and parts["scales"].shape == (1, 2, 3, 2)
    assert fmt.bits_per_element(128) == 4.5 and not fmt.uses_global_scale
    lut = e2m1_lut()[unpack_nibbles(parts["codes"]).long()]
    scale = (2.0 ** (parts["scales"].float() - 127)).repeat_interleave(16, dim=-1)
    assert torch.equal(fmt.dequantize(parts, None, torch.float32), lut * scale)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_magnitude=st.floats(-30, 30))
def test_error_bound_without_clipping(seed: int, log_magnitude: float) -> None:
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * 10.0**log_magnitude
    codes, scales = quantize_fp4_mx_block16(x)
    out = dequantize_fp4_mx_block16(codes, scales)
    assert not out.isnan().any() and codes.dtype == scales.dtype == torch.uint8
    sglang_codes, sglang_scales = sglang_transcription(x)
    assert torch.equal(codes, sglang_codes) and torch.equal(scales, sglang_scales)
    step = (2.0 ** (scales.float() - 127)).repeat_interleave(16, dim=-1)
    y = (x / step).abs()
    half = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0)) * step
    assert (y <= 6).all()  # the exponent is never too small: nothing clips
    assert ((x - out).abs() <= half * (1 + 1e-6)).all()
