"""fp8_e4m3: saturation (never NaN), scale granularities, static scales, zero amax."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats import get_format
from nvfp4kv.formats.e4m3 import e4m3_bits_to_float, float_to_e4m3_bits
from nvfp4kv.formats.fp8_e4m3 import dequantize_fp8_e4m3, quantize_fp8_e4m3


def test_large_values_saturate_instead_of_becoming_nan() -> None:
    x = torch.tensor([479.0, 480.0, 1e4, 1e6, -1e6])
    out = dequantize_fp8_e4m3(quantize_fp8_e4m3(x, 1.0), 1.0)
    assert out.tolist() == [448.0, 448.0, 448.0, 448.0, -448.0]


def test_static_scale_is_used_as_given() -> None:
    fmt = get_format("fp8_e4m3")
    x = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0)) * 3
    static = torch.full((1, 1, 1, 1), 0.001)  # far too small: most values clip
    parts = fmt.quantize(x, static)
    assert torch.equal(parts["codes"], float_to_e4m3_bits(x / 0.001))
    out = fmt.dequantize(parts, static, torch.float32)
    assert out.abs().max().item() == pytest.approx(0.448) and not out.isnan().any()


def test_dynamic_tensor_and_head_scales() -> None:
    x = torch.zeros(2, 3, 4, 8)
    x[1, 2, 3, 5] = -896.0
    x[0, 1, 0, 0] = 44.8
    tensor_scale = get_format("fp8_e4m3").global_scale(x)
    assert tensor_scale.shape == (1, 1, 1, 1) and tensor_scale.item() == 2.0
    head_scale = get_format("fp8_e4m3", scaling="head").global_scale(x)
    assert head_scale.shape == (1, 3, 1, 1)
    assert head_scale.flatten().tolist() == [0.0, pytest.approx(0.1), 2.0]


def test_zero_amax_decodes_to_zeros_not_nan() -> None:
    for scaling in ("tensor", "head", "token"):
        fmt = get_format("fp8_e4m3", scaling=scaling)
        x = torch.zeros(1, 2, 3, 8)
        x[0, 1, 2, 0] = 5.0  # head 0 and most tokens are all-zero
        parts = fmt.quantize(x)
        out = fmt.dequantize(parts, fmt.global_scale(x), torch.float32)
        assert not out.isnan().any()
        assert torch.equal(out, x)  # 5.0 = 448 * (5/448) lands on the grid's max exactly


def test_token_scaling_stores_a_per_token_fp32_part() -> None:
    fmt = get_format("fp8_e4m3", scaling="token")
    assert not fmt.uses_global_scale and fmt.global_scale(torch.ones(1, 1, 1, 8)) is None
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(1))
    parts = fmt.quantize(x)
    assert parts["codes"].shape == x.shape and parts["codes"].dtype == torch.uint8
    assert parts["scale"].shape == (2, 3, 5, 1) and parts["scale"].dtype == torch.float32
    assert torch.equal(parts["scale"], x.abs().amax(-1, keepdim=True) / 448)
    assert fmt.bits_per_element(128) == 8.25


def test_bits_per_element_and_options() -> None:
    assert get_format("fp8_e4m3").bits_per_element(128) == 8.0
    with pytest.raises(ValueError, match="scaling"):
        get_format("fp8_e4m3", scaling="channel")


def test_dequantize_without_a_scale_names_the_fix() -> None:
    fmt = get_format("fp8_e4m3")
    parts = fmt.quantize(torch.ones(1, 1, 1, 4))
    with pytest.raises(ValueError, match="global scale"):
        fmt.dequantize(parts, None, torch.float32)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255).filter(lambda b: b & 0x7F != 0x7F), min_size=1, max_size=32),
       st.integers(-10, 10))
def test_values_on_the_e4m3_grid_round_trip_exactly(bytes_: list[int], scale_exponent: int) -> None:
    codes = torch.tensor(bytes_, dtype=torch.uint8)
    scale = torch.tensor(2.0**scale_exponent)
    x = e4m3_bits_to_float(codes) * scale
    got = quantize_fp8_e4m3(x, scale)
    assert torch.equal(got, codes)
    assert torch.equal(dequantize_fp8_e4m3(got, scale), x)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), magnitude=st.floats(1e-3, 1e6),
       scaling=st.sampled_from(["tensor", "head", "token"]))
def test_never_nan_and_relative_error_bound(seed: int, magnitude: float, scaling: str) -> None:
    fmt = get_format("fp8_e4m3", scaling=scaling)
    x = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
    scale = fmt.global_scale(x)
    out = fmt.dequantize(fmt.quantize(x, scale), scale, torch.float32)
    assert not out.isnan().any()
    # normal E4M3 values carry 3 mantissa bits: relative error <= 2^-4; subnormals: 2^-10 abs
    amax = x.abs().amax(dim=-1 if scaling == "token" else None, keepdim=True)
    if scaling == "head":
        amax = x.abs().amax(dim=(0, 2, 3), keepdim=True)
    err = (x - out).abs()
    assert (err <= x.abs() * 2.0**-4 + amax / 448 * 2.0**-10 + 1e-30).all()


def test_encoder_equals_the_plain_definition_for_every_scale_kind() -> None:
    """quantize_fp8_e4m3 (one select instead of two) writes the bytes of the definition
    ``where(s > 0, e4m3_bits(x / s), 0)`` with the integer E4M3 encoder, for zero, NaN, Inf,
    per-token and per-head scales and NaN/Inf elements."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 50, 16, generator=g) * torch.exp2(torch.randint(-20, 20, (2, 3, 50, 1), generator=g).float())
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[0, 0, 1, :2] = torch.tensor([-0.0, 0.0])
    token_scale = x.abs().amax(-1, keepdim=True) / 448
    token_scale[0, 1, :5] = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 1e-40]).reshape(5, 1)
    for s in (1.0, 0.0, torch.tensor(0.01), torch.full((1, 1, 1, 1), float("nan")), torch.full((1, 1, 1, 1), float("inf")),
              torch.rand(1, 3, 1, 1, generator=g), token_scale):
        st_ = torch.as_tensor(s, dtype=torch.float32)
        ones = torch.ones_like(st_)
        expected = torch.where(st_ > 0, float_to_e4m3_bits(x / torch.where(st_ > 0, st_, ones)), torch.zeros((), dtype=torch.uint8))
        assert torch.equal(quantize_fp8_e4m3(x, s), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", ["tensor", "head"])
@pytest.mark.parametrize("scale_kind", ["data", "tiny", "huge"])
def test_step_encoder_gives_the_bits_of_quantize_and_dequantize(dtype: torch.dtype, scaling: str, scale_kind: str) -> None:
    """FP8E4M3Format.step_encoder (the cache's decode-step encoder) equals quantize + dequantize
    bit for bit on stacked K/V: codes and decoded values, with scales from the data, a tiny scale
    (everything saturates at +-448) and a huge one (FP32 products overflow: the clamp stays)."""
    fmt = get_format("fp8_e4m3", scaling=scaling)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(2, 2, 3, 5, 32, generator=g) * torch.exp2(torch.randint(-20, 20, (2, 2, 3, 5, 1), generator=g).float())
        x[0, 1, 2, 2, :4] = torch.finfo(dtype).max
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
        shape = (1, 1, 3, 1, 1) if scaling == "head" else (1, 1, 1, 1, 1)
        scale = {
            "data": torch.stack([fmt.global_scale(x[0]), fmt.global_scale(x[1])]).float(),
            "tiny": torch.full(shape, 1e-38),
            "huge": torch.full(shape, 3e36),
        }[scale_kind]
        encode = fmt.step_encoder(scale)
        assert encode is not None
        parts, decoded = encode(x, dtype)
        ref = fmt.quantize(x, scale)
        assert parts.keys() == ref.keys() and torch.equal(parts["codes"], ref["codes"])
        expect = fmt.dequantize(ref, scale, dtype)
        assert decoded.dtype == expect.dtype
        assert torch.equal(decoded.contiguous().view(torch.uint8), expect.contiguous().view(torch.uint8))
        assert encode(x, None)[1] is None


def test_step_encoder_is_declined_where_it_would_not_be_exact() -> None:
    """None for per-token scaling (scales from the data), no scale, or a scale that is zero,
    negative, NaN or Inf anywhere."""
    assert get_format("fp8_e4m3", scaling="token").step_encoder(None) is None
    fmt = get_format("fp8_e4m3")
    assert fmt.step_encoder(None) is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert fmt.step_encoder(torch.tensor([1.0, bad]).reshape(2, 1, 1, 1, 1)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.0117, 1e-38, 3e36, 0.0, -2.5, float("nan")])
def test_one_scale_dequantize_gives_the_reference_bits_for_every_byte(dtype: torch.dtype, scale: float) -> None:
    """FP8E4M3Format.dequantize with one scale (the 256-entry scaled table) returns the bits of
    saturate_(dequantize_fp8_e4m3(...)) for all 256 bytes (NaN payloads, -0.0 and saturation
    included), in any layout; per-head and per-token scales keep the reference path."""
    from nvfp4kv.formats.numerics import saturate_

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    for codes in (every.reshape(2, 2, 8, 8), every.reshape(2, 2, 8, 8).transpose(2, 3)):
        s = torch.full((1, 1, 1, 1), scale)
        got = get_format("fp8_e4m3").dequantize({"codes": codes}, s, dtype)
        expect = saturate_(dequantize_fp8_e4m3(codes, s, dtype))
        assert got.shape == expect.shape and got.dtype == expect.dtype
        assert torch.equal(bits(got), bits(expect))
