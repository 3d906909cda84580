"""int4 / int2 (KIVI-style): both axes, packing, error bound, degenerate groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.errors import BlockSizeError
from nvfp4kv.formats import get_format
from nvfp4kv.formats.kivi import pack_bits, quantize_kivi, unpack_bits


def test_int2_packs_element_zero_in_the_lowest_bits() -> None:
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [[0b11100100]]
    assert pack_bits(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]


@given(st.lists(st.integers(0, 3), min_size=4, max_size=32).filter(lambda v: len(v) % 4 == 0))
def test_pack_unpack_round_trip_int2(values: list[int]) -> None:
    codes = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 2), 2), codes)


def test_hand_checked_int4_group() -> None:
    # group of 4 along head_dim: min -1, max 14, scale 15/15 = 1; (x - min) = 0, 1.5, 2.5, 15
    # rounds half to even: 1.5 -> 2, 2.5 -> 2
    x = torch.tensor([[[[-1.0, 0.5, 1.5, 14.0]]]])
    codes, scale, zero = quantize_kivi(x, 4, "token", 4)
    assert zero.item() == -1.0 and scale.item() == 1.0 and scale.dtype == torch.float16
    assert unpack_bits(codes, 4).flatten().tolist() == [0, 2, 2, 15]
    assert codes.flatten().tolist() == [0x20, 0xF2]


def test_constant_group_is_exact() -> None:
    fmt = get_format("int4", group_size=4)
    x = torch.full((1, 1, 2, 8), 0.375)
    parts = fmt.quantize(x)
    assert parts["scale"].eq(0).all()
    assert torch.equal(fmt.dequantize(parts, None, torch.float32), x)


@pytest.mark.parametrize("name", ["int4", "int2"])
def test_part_shapes_on_both_axes(name: str) -> None:
    bits = 4 if name == "int4" else 2
    x = torch.randn(2, 3, 64, 32)
    token = get_format(name, axis="token", group_size=16).quantize(x)
    assert token["codes"].shape == (2, 3, 64, 32 * bits // 8)
    assert token["scale"].shape == token["zero"].shape == (2, 3, 64, 2)
    channel_fmt = get_format(name, axis="channel", group_size=32)
    assert channel_fmt.token_group == 32
    channel = channel_fmt.quantize(x)
    assert channel["codes"].shape == (2, 3, 64, 32 * bits // 8)
    assert channel["scale"].shape == channel["zero"].shape == (2, 3, 2, 32)
    assert channel["scale"].dtype == torch.float16


def test_bits_per_element_counts_scale_and_zero() -> None:
    assert get_format("int4").bits_per_element(128) == 5.0  # 4 + 2 * 16 / 32
    assert get_format("int4", group_size=64).bits_per_element(128) == 4.5
    assert get_format("int2", axis="channel", group_size=32).bits_per_element(128) == 3.0
    assert get_format("int4", scale_dtype="float32").bits_per_element(128) == 6.0


def test_group_size_not_dividing_head_dim_names_the_fix() -> None:
    with pytest.raises(BlockSizeError, match="group_size"):
        get_format("int4", group_size=32).quantize(torch.zeros(1, 1, 1, 40))


def test_channel_axis_needs_whole_token_groups() -> None:
    with pytest.raises(ValueError, match="residual"):
        get_format("int4", axis="channel", group_size=32).quantize(torch.zeros(1, 1, 33, 64))


def test_fp16_scale_saturates_instead_of_overflowing() -> None:
    fmt = get_format("int4", group_size=4)
    x = torch.tensor([[[[-1e5, 0.0, 1.0, 1e5]]]])
    out = fmt.dequantize(fmt.quantize(x), None, torch.float32)
    assert torch.isfinite(out).all()
    wide = get_format("int4", group_size=4, scale_dtype="float32")
    assert (wide.dequantize(wide.quantize(x), None, torch.float32) - x).abs().max() < 1e4


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(["int4", "int2"]),
    axis=st.sampled_from(["token", "channel"]),
    group_size=st.sampled_from([8, 16, 32]),
    magnitude=st.floats(1e-2, 1e3),
)
def test_round_trip_error_is_at_most_half_a_step(seed, name, axis, group_size, magnitude) -> None:
    fmt = get_format(name, axis=axis, group_size=group_size)
    x = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(seed)) * magnitude
    parts = fmt.quantize(x)
    out = fmt.dequantize(parts, None, torch.float32)
    dim = -1 if axis == "token" else -2
    scale = parts["scale"].float().repeat_interleave(group_size, dim=dim)
    zero = parts["zero"].float().repeat_interleave(group_size, dim=dim)
    err = (x - out).abs()
    # half a step, plus what FP16 rounding of zero and scale (11 bits) can add at the top code
    qmax = (1 << fmt.bits) - 1
    slack = 2.0**-11 * (zero.abs() + qmax * scale) + 1e-6 * x.abs()
    assert (err <= scale / 2 + slack).all()
