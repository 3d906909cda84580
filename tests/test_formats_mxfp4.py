"""mxfp4 (OCP MX): E8M0 scale from the block max's binade, RNE elements, clipping to 6."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats import get_format
from nvfp4kv.formats.e2m1 import unpack_nibbles
from nvfp4kv.formats.mxfp4 import dequantize_mxfp4, mxfp4_shared_exponent, quantize_mxfp4
from nvfp4kv.formats.numerics import exp2_exact


def block(values: list[float]) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (32 - len(values)), dtype=torch.float32)


def test_scale_is_two_to_floor_log2_amax_minus_2() -> None:
    amax = torch.tensor([6.0, 4.0, 7.99, 8.0, 1.0, 0.99999994, 2.0**-130, 0.0])
    assert mxfp4_shared_exponent(amax).tolist() == [0, 0, 0, 1, -2, -3, -127, -127]


def test_block_max_is_clipped_to_6_times_scale() -> None:
    x = block([7.9, -7.0, 5.0, 2.5, 0.25])  # scale 1 (byte 127); RNE ties 5->4, 2.5->2, 0.25->0
    codes, scales = quantize_mxfp4(x)
    assert scales.tolist() == [127]
    assert unpack_nibbles(codes)[:5].tolist() == [7, 15, 6, 4, 0]
    assert dequantize_mxfp4(codes, scales)[:5].tolist() == [6.0, -6.0, 4.0, 2.0, 0.0]


def test_power_of_two_block_max_is_exact() -> None:
    out = dequantize_mxfp4(*quantize_mxfp4(block([8.0, 3.0])))  # scale 2: 8/2 = 4, 3/2 = 1.5
    assert out[:2].tolist() == [8.0, 3.0]


def test_zero_block_takes_the_smallest_scale() -> None:
    codes, scales = quantize_mxfp4(torch.zeros(64))
    assert scales.tolist() == [0, 0] and codes.eq(0).all()
    assert dequantize_mxfp4(codes, scales).eq(0).all()


def test_subnormal_block_is_encoded_against_the_smallest_scale() -> None:
    x = block([3 * 2.0**-127, 2.0**-128])  # FP32 subnormals, scale 2^-127: 3 and 0.5
    codes, scales = quantize_mxfp4(x)
    assert scales.tolist() == [0]
    assert torch.equal(dequantize_mxfp4(codes, scales)[:2], x[:2])


def test_exp2_exact_covers_normal_and_subnormal_exponents() -> None:
    e = torch.arange(-149, 129)
    assert torch.equal(exp2_exact(e), torch.tensor([2.0**k for k in range(-149, 128)] + [math.inf]))


def test_e8m0_nan_byte_decodes_to_nan() -> None:
    nan_byte = torch.tensor([255], dtype=torch.uint8)
    out = dequantize_mxfp4(torch.zeros(16, dtype=torch.uint8), nan_byte)
    assert out.isnan().all()


def test_format_parts() -> None:
    fmt = get_format("mxfp4")
    parts = fmt.quantize(torch.randn(2, 1, 3, 64))
    assert parts["codes"].shape == (2, 1, 3, 32) and parts["scales"].shape == (2, 1, 3, 2)
    assert fmt.bits_per_element(64) == 4.25 and fmt.block_size == 32


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_magnitude=st.floats(-30, 30))
def test_error_bound_with_clipping(seed: int, log_magnitude: float) -> None:
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * 10.0**log_magnitude
    codes, scales = quantize_mxfp4(x)
    out = dequantize_mxfp4(codes, scales)
    assert not out.isnan().any()
    scale = exp2_exact(scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    y = (x / scale).abs()
    assert (y < 8).all()  # amax / 2^(floor(log2 amax) - 2) lies in [4, 8)
    half = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0)) * scale
    bound = torch.where(y > 6, (y - 6) * scale, half)
    assert ((x - out).abs() <= bound * (1 + 1e-6)).all()
