"""FP8 E4M3: grid edges, saturation, subnormals, and integer path == torch cast path."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats.e4m3 import (
    E4M3_MAX_BITS,
    E4M3_NAN_BITS,
    e4m3_bits_to_float,
    e4m3_bits_to_float_torch,
    float_to_e4m3_bits,
    float_to_e4m3_bits_torch,
    round_to_e4m3,
)


def rounded(values: list[float]) -> list[float]:
    return round_to_e4m3(torch.tensor(values, dtype=torch.float32)).tolist()


def test_rounding_carries_into_the_next_binade() -> None:
    # [64, 128) has step 8: 126.2 -> 128; tie 124 -> 128 (mantissa 0 is even); [4, 8) step 0.5
    assert rounded([126.2, 124.0, 123.9, -7.94, -7.75]) == [128.0, 128.0, 120.0, -8.0, -8.0]


def test_ties_to_even_inside_a_binade() -> None:
    # [16, 32) has step 2: 17 ties to 16 (m=0), 19 ties to 20 (m=2)
    assert rounded([17.0, 19.0, 1.0625, 1.1875]) == [16.0, 20.0, 1.0, 1.25]


def test_saturation_at_448() -> None:
    # 464 ties between 448 and (nonexistent) 480 -> 448; everything larger saturates too
    assert rounded([448.0, 464.0, 465.0, 480.0, 1e6, math.inf, -1e6, -math.inf]) == [
        448.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0,
    ]
    bits = float_to_e4m3_bits(torch.tensor([1e6, -1e6]))
    assert bits.tolist() == [E4M3_MAX_BITS, 0x80 | E4M3_MAX_BITS]


def test_subnormals_down_to_2_pow_minus_9() -> None:
    s = 2.0**-9
    # tie at half the smallest subnormal rounds to 0; 0.75 of it rounds up; 7.5 -> 8 = 2^-6
    assert rounded([s, 0.5 * s, 0.75 * s, 2.5 * s, 3.5 * s, 7.5 * s, 1e-30]) == [
        s, 0.0, s, 2 * s, 4 * s, 2.0**-6, 0.0,
    ]
    assert float_to_e4m3_bits(torch.tensor([7.5 * s, s])).tolist() == [0x08, 0x01]


def test_signed_zero_and_nan_bits() -> None:
    assert float_to_e4m3_bits(torch.tensor([0.0, -0.0])).tolist() == [0x00, 0x80]
    assert float_to_e4m3_bits(torch.tensor([math.nan])).tolist()[0] & 0x7F == E4M3_NAN_BITS


def test_decode_table_matches_torch_for_all_256_bytes() -> None:
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours, theirs = e4m3_bits_to_float(every), e4m3_bits_to_float_torch(every)
    assert torch.equal(ours.isnan(), theirs.isnan())
    finite = ~ours.isnan()
    assert torch.equal(ours[finite], theirs[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(theirs[finite]))
    assert ours[finite].abs().max().item() == 448.0


def test_every_finite_byte_round_trips() -> None:
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = every[(every & 0x7F) != E4M3_NAN_BITS]
    assert torch.equal(float_to_e4m3_bits(e4m3_bits_to_float(finite)), finite)


def test_integer_and_torch_paths_agree_on_random_bit_patterns() -> None:
    gen = torch.Generator().manual_seed(1234)
    patterns = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    x = patterns.to(torch.int32).view(torch.float32)
    x = x[~torch.isnan(x)]
    assert torch.equal(float_to_e4m3_bits(x), float_to_e4m3_bits_torch(x))


def test_integer_and_torch_paths_agree_on_a_dense_sweep() -> None:
    lo = torch.tensor([2.0**-11]).view(torch.int32).item()
    hi = torch.tensor([500.0]).view(torch.int32).item()
    x = torch.arange(lo, hi, 97, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([x, -x])
    assert torch.equal(float_to_e4m3_bits(x), float_to_e4m3_bits_torch(x))


@settings(max_examples=200)
@given(st.floats(allow_nan=False, width=32))
def test_paths_agree_and_never_nan_for_any_finite_or_infinite_float(v: float) -> None:
    x = torch.tensor([v], dtype=torch.float32)
    ours = float_to_e4m3_bits(x)
    assert torch.equal(ours, float_to_e4m3_bits_torch(x))
    assert not e4m3_bits_to_float(ours).isnan().any()


def _e4m3_boundary_inputs() -> torch.Tensor:
    """Every E4M3 value, every midpoint between neighbours (the ties, up to the 448/512 tie
    beyond the grid), each +-1 and +-2 FP32 ulp, both signs, plus zeros, FP32 subnormals,
    the E4M3 underflow edge 2^-10, huge values, Inf and NaN."""
    finite = sorted({abs(v) for v in (e4m3_bits_to_float(torch.arange(256, dtype=torch.uint8))).tolist()
                     if not math.isnan(v)})
    grid = torch.tensor(finite + [512.0], dtype=torch.float64)
    mids = (grid[:-1] + grid[1:]) / 2  # exact in FP32: the ties
    centres = torch.cat([grid, mids, torch.tensor([2.0**-10, 2.0**-11, 480.0, 464.0, 3.4e38, 1e-45, 1e-40])]).float()
    bits = centres.view(torch.int32)
    around = torch.cat([(bits + k).view(torch.float32) for k in (-2, -1, 0, 1, 2)])
    around = around[around >= 0]
    special = torch.tensor([0.0, float("inf"), float("nan")])
    values = torch.cat([around, special])
    return torch.cat([values, -values])


def test_fast_path_equals_the_integer_definition_on_every_boundary_and_tie() -> None:
    from nvfp4kv.formats.e4m3 import float_to_e4m3_bits_fast

    x = _e4m3_boundary_inputs()
    assert x.numel() > 2000
    assert torch.equal(float_to_e4m3_bits_fast(x), float_to_e4m3_bits(x))


def test_fast_path_equals_the_integer_definition_on_a_million_random_values() -> None:
    from nvfp4kv.formats.e4m3 import float_to_e4m3_bits_fast

    g = torch.Generator().manual_seed(11)
    bit_patterns = torch.randint(-(2**31), 2**31, (500_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    in_range = (torch.rand(500_000, generator=g) * 2 - 1) * torch.exp2(torch.randint(-12, 10, (500_000,), generator=g).float())
    for x in (bit_patterns, in_range):
        assert torch.equal(float_to_e4m3_bits_fast(x), float_to_e4m3_bits(x))


def test_fast_path_keeps_the_nan_sign_of_the_definition() -> None:
    from nvfp4kv.formats.e4m3 import float_to_e4m3_bits_fast

    nans = torch.tensor([0x7FC00000, 0x7F800001, -0x00400000, -0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    assert torch.equal(float_to_e4m3_bits_fast(nans), float_to_e4m3_bits(nans))
