"""E2M1 element: RNE ties, signs, saturation, decode table and nibble packing."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats.e2m1 import (
    E2M1_MAGNITUDES,
    decode_e2m1,
    e2m1_lut,
    pack_nibbles,
    rne_e2m1_codes,
    unpack_nibbles,
)


def codes_of(values: list[float]) -> list[int]:
    return rne_e2m1_codes(torch.tensor(values, dtype=torch.float32)).tolist()


def test_every_rne_tie_goes_to_the_even_code() -> None:
    # 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (codes: index of magnitude)
    assert codes_of([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) == [0, 2, 2, 4, 4, 6, 6]


def test_values_just_past_a_tie_round_to_the_nearer_neighbour() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # FP32 neighbours, one ulp off
    below = torch.nextafter(ties, torch.zeros_like(ties))
    above = torch.nextafter(ties, torch.full_like(ties, 10.0))
    assert rne_e2m1_codes(below).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert rne_e2m1_codes(above).tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_grid_points_encode_to_their_own_code() -> None:
    assert codes_of(list(E2M1_MAGNITUDES)) == list(range(8))
    assert codes_of([-m for m in E2M1_MAGNITUDES[1:]]) == list(range(9, 16))


def test_negatives_mirror_positives_with_the_sign_bit() -> None:
    assert codes_of([-0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0]) == [8, 10, 10, 12, 12, 14, 14]


def test_saturation_beyond_six() -> None:
    assert codes_of([6.0, 6.1, 7.0, 1e30, math.inf]) == [7, 7, 7, 7, 7]
    assert codes_of([-6.5, -1e30, -math.inf]) == [15, 15, 15]


def test_signed_zero_and_nan() -> None:
    # -0.0 -> +0 (sign bit is y < 0); a negative rounding to zero keeps its sign (code 8);
    # NaN compares false everywhere -> code 0. Both zero codes decode to 0.
    assert codes_of([0.0, -0.0, -0.1, math.nan]) == [0, 0, 8, 0]
    assert decode_e2m1(torch.tensor([0, 8], dtype=torch.uint8)).abs().tolist() == [0.0, 0.0]


def test_decode_table() -> None:
    lut = e2m1_lut()
    assert lut[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert lut[9:].tolist() == [-0.5, -1, -1.5, -2, -3, -4, -6]
    assert math.copysign(1.0, lut[8].item()) == -1.0


def test_packing_puts_the_even_element_in_the_low_nibble() -> None:
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(unpack_nibbles(packed), codes)


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_round_trip(values: list[int]) -> None:
    codes = torch.tensor(values, dtype=torch.uint8).reshape(1, -1)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, len(values) // 2)
    assert torch.equal(unpack_nibbles(packed), codes)


finite32 = st.floats(min_value=-20.0, max_value=20.0, allow_nan=False, width=32)


@settings(max_examples=300)
@given(finite32)
def test_rne_code_is_a_nearest_grid_point_with_even_ties(y: float) -> None:
    """Brute force: compare with argmin over the grid (independent of the thresholds)."""
    code = codes_of([y])[0]
    got = abs(e2m1_lut()[code].item())
    a = min(abs(y), 6.0)
    distances = [abs(a - m) for m in E2M1_MAGNITUDES]
    best = min(distances)
    assert abs(a - got) == best
    nearest = [i for i, dist in enumerate(distances) if dist == best]
    assert code & 7 == (nearest[0] if len(nearest) == 1 else [i for i in nearest if i % 2 == 0][0])
    assert (code >> 3) == (1 if y < 0 else 0)


def _loop_magnitude(a: torch.Tensor) -> torch.Tensor:
    """The threshold-by-threshold definition (what the one-comparison path must equal)."""
    from nvfp4kv.formats.e2m1 import E2M1_BOUNDS, E2M1_TIE_ROUNDS_UP

    code = torch.zeros(a.shape, dtype=torch.uint8)
    for bound, tie_up in zip(E2M1_BOUNDS, E2M1_TIE_ROUNDS_UP):
        code += ((a >= bound) if tie_up else (a > bound)).to(torch.uint8)
    return code


def test_one_comparison_magnitude_equals_the_threshold_loop() -> None:
    from nvfp4kv.formats.e2m1 import E2M1_BOUNDS, E2M1_MAGNITUDES, rne_e2m1_magnitude

    centres = torch.tensor(E2M1_BOUNDS + E2M1_MAGNITUDES + (6.5, 1e30), dtype=torch.float32).view(torch.int32)
    near = torch.cat([(centres + k).view(torch.float32) for k in range(-3, 4)])
    g = torch.Generator().manual_seed(3)
    rand = torch.rand(200_000, generator=g) * 7
    special = torch.tensor([0.0, -0.0, 1e-45, float("inf"), float("nan")])
    a = torch.cat([near, rand, special])
    assert torch.equal(rne_e2m1_magnitude(a), _loop_magnitude(a))
    assert torch.equal(rne_e2m1_magnitude(a.reshape(1, -1)), _loop_magnitude(a).reshape(1, -1))


def test_packed_decode_equals_unpack_then_decode_for_every_byte() -> None:
    from nvfp4kv.formats.e2m1 import decode_packed_e2m1

    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8)
    assert torch.equal(decode_packed_e2m1(packed), decode_e2m1(unpack_nibbles(packed)))


def _e2m1_edge_inputs() -> torch.Tensor:
    """Every E2M1 threshold and grid point, +-3 FP32 ulp around each, both signs, signed zeros,
    FP32 subnormals, NaN of both signs, +-Inf, and a dense sweep of [-8, 8]."""
    from nvfp4kv.formats.e2m1 import E2M1_BOUNDS

    centres = torch.tensor(E2M1_BOUNDS + E2M1_MAGNITUDES + (6.5, 1e30, 1e-45), dtype=torch.float32).view(torch.int32)
    near = torch.cat([(centres + k).view(torch.float32) for k in range(-3, 4)])
    near = near[near >= 0]
    sweep = torch.linspace(0, 8, 400_001, dtype=torch.float32)
    special = torch.tensor([0.0, float("inf"), 1e-40])
    magnitudes = torch.cat([near, sweep, special])
    nans = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    return torch.cat([magnitudes, -magnitudes, nans])


def test_fast_packed_encoder_equals_codes_then_pack_on_every_edge() -> None:
    """rne_e2m1_packed (bucketize + pair table, the NVFP4 encoder's path) gives the bytes of
    pack_nibbles(rne_e2m1_codes(y)) everywhere: ties, signs (-0.0 -> 0, tiny negatives -> 8),
    saturation, NaN -> 0; each element paired with every kind of neighbour."""
    from nvfp4kv.formats.e2m1 import rne_e2m1_packed

    y = _e2m1_edge_inputs()
    g = torch.Generator().manual_seed(4)
    for order in (y, y.flip(0), y[torch.randperm(y.numel(), generator=g)]):
        ys = order[: order.numel() // 2 * 2].reshape(-1, 2)
        assert torch.equal(rne_e2m1_packed(ys), pack_nibbles(rne_e2m1_codes(ys)))


def test_fast_packed_encoder_equals_codes_then_pack_on_random_bit_patterns() -> None:
    from nvfp4kv.formats.e2m1 import rne_e2m1_packed

    g = torch.Generator().manual_seed(12)
    y = torch.randint(-(2**31), 2**31, (400_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    y = y.reshape(2, 5, -1, 16)
    assert torch.equal(rne_e2m1_packed(y), pack_nibbles(rne_e2m1_codes(y)))
    scaled = (torch.rand(2, 5, 100, 16, generator=g) * 16 - 8).float()
    assert torch.equal(rne_e2m1_packed(scaled), pack_nibbles(rne_e2m1_codes(scaled)))


def test_packed_decode_is_bit_exact_for_every_byte_in_any_layout() -> None:
    """The 64-bit-word lookup gives the very bits of the per-nibble table (-0.0 included, which
    torch.equal would not tell from +0.0), also for non-contiguous inputs."""
    from nvfp4kv.formats.e2m1 import decode_packed_e2m1

    every = torch.arange(256, dtype=torch.uint8)
    bits = decode_packed_e2m1(every.reshape(16, 16)).view(torch.int32)
    assert torch.equal(bits, decode_e2m1(unpack_nibbles(every.reshape(16, 16))).view(torch.int32))
    strided = every.reshape(16, 16).t()[:, 1:9]
    assert torch.equal(decode_packed_e2m1(strided).view(torch.int32),
                       decode_e2m1(unpack_nibbles(strided)).view(torch.int32))


def test_finite_packed_encoder_equals_the_definition_on_every_non_nan_edge() -> None:
    """rne_e2m1_packed_finite (the NVFP4 decode-step encoder's E2M1 rounding: no nan_to_num,
    one matrix-vector product for the pair index) gives the bytes of
    pack_nibbles(rne_e2m1_codes(y)) on every edge but NaN (which it is not given), and its
    values are the decoder's values of those codes, bit for bit (-0.0 included)."""
    from nvfp4kv.formats.e2m1 import decode_packed_e2m1, rne_e2m1_packed_finite

    y = _e2m1_edge_inputs()
    y = y[~torch.isnan(y)]
    g = torch.Generator().manual_seed(5)
    for order in (y, y.flip(0), y[torch.randperm(y.numel(), generator=g)]):
        ys = order[: order.numel() // 32 * 32].reshape(2, -1, 16)
        packed, values = rne_e2m1_packed_finite(ys, with_values=True)
        assert torch.equal(packed, pack_nibbles(rne_e2m1_codes(ys)))
        assert torch.equal(values.view(torch.int32), decode_packed_e2m1(packed).view(torch.int32))
        assert rne_e2m1_packed_finite(ys)[1] is None
