"""NVFP4: hand-checked codes and scales, zero/tiny blocks, exact grid round trips, error bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.errors import BlockSizeError
from nvfp4kv.formats import get_format
from nvfp4kv.formats.e2m1 import e2m1_lut, unpack_nibbles
from nvfp4kv.formats.e4m3 import e4m3_bits_to_float
from nvfp4kv.formats.nvfp4 import dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4

ONE = torch.tensor(1.0)
E4M3_ONE = 0x38


def block(values: list[float]) -> torch.Tensor:
    """One 16-element block, padded with zeros."""
    return torch.tensor(values + [0.0] * (16 - len(values)), dtype=torch.float32)


def test_unit_scale_block_encodes_every_tie_with_rne_and_packs_low_nibble_first() -> None:
    # block amax 6 with gs = 1: block scale 6 / (6 * 1) = 1.0 exactly, so codes are rne(x)
    x = block([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.5, -5.0, -6.0])
    codes, scales = quantize_nvfp4(x, ONE)
    assert scales.tolist() == [E4M3_ONE]
    assert unpack_nibbles(codes).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 12, 14, 15, 0, 0, 0]
    assert codes[:2].tolist() == [0x20, 0x42]  # (q1 << 4) | q0 = (2 << 4) | 0, (4 << 4) | 2
    expected = [0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -2, -4, -6, 0, 0, 0]
    assert dequantize_nvfp4(codes, scales, ONE).tolist() == expected


def test_elements_are_divided_by_the_rounded_fp8_scale() -> None:
    # block amax 7.2: unrounded scale 1.2, E4M3 rounds it to 1.25. Element 1.53:
    # 1.53 / 1.25 = 1.224 -> 1.0 (code 2); dividing by 1.2 would give 1.275 -> 1.5 (code 3).
    codes, scales = quantize_nvfp4(block([7.2, 1.53]), ONE)
    assert e4m3_bits_to_float(scales).tolist() == [1.25]
    assert unpack_nibbles(codes)[:2].tolist() == [7, 2]
    assert dequantize_nvfp4(codes, scales, ONE)[:2].tolist() == [7.5, 1.25]


def test_dequantize_multiplies_code_by_the_product_of_scales() -> None:
    gs = torch.tensor(0.1)  # not a power of two: order of operations matters in the last bit
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize_nvfp4(x, gs)
    s = e4m3_bits_to_float(scales).repeat_interleave(16, dim=-1)
    expected = e2m1_lut()[unpack_nibbles(codes).long()] * (s * gs)
    assert torch.equal(dequantize_nvfp4(codes, scales, gs), expected)


def test_global_scale_is_amax_over_6_times_448() -> None:
    x = torch.tensor([[1.0, -2688.0, 3.0] + [0.0] * 13])
    assert nvfp4_global_scale(x).item() == 1.0
    fmt = get_format("nvfp4")
    assert fmt.global_scale(x.reshape(1, 1, 1, 16)).shape == (1, 1, 1, 1)


def test_all_zero_tensor_gives_zeros_not_nan() -> None:
    fmt = get_format("nvfp4")
    x = torch.zeros(1, 2, 3, 32)
    gs = fmt.global_scale(x)
    assert gs.item() == 0.0
    parts = fmt.quantize(x)
    assert parts["codes"].eq(0).all() and parts["scales"].eq(0).all()
    out = fmt.dequantize(parts, gs, torch.float32)
    assert torch.equal(out, x)


def test_zero_block_next_to_a_nonzero_block() -> None:
    x = torch.cat([block([3.0, -1.0]), torch.zeros(16)])
    codes, scales = quantize_nvfp4(x, nvfp4_global_scale(x))
    assert scales[1].item() == 0
    assert dequantize_nvfp4(codes, scales, nvfp4_global_scale(x))[16:].eq(0).all()


def test_tiny_block_underflows_to_a_zero_block_by_default() -> None:
    # gs = 1: block scale 6 * 2^-11 / 6 = 2^-11, below half the smallest E4M3 subnormal
    x = block([6 * 2.0**-11, -3 * 2.0**-11])
    codes, scales = quantize_nvfp4(x, ONE)
    assert scales.tolist() == [0] and codes.eq(0).all()
    assert dequantize_nvfp4(codes, scales, ONE).eq(0).all()


def test_modelopt_tiny_scale_clamps_to_the_smallest_subnormal() -> None:
    x = block([6 * 2.0**-11, -3 * 2.0**-11])
    codes, scales = quantize_nvfp4(x, ONE, tiny_scale="modelopt")
    assert scales.tolist() == [0x01]  # 2^-9
    # 6 * 2^-11 / 2^-9 = 1.5 (code 3); -3 * 2^-11 / 2^-9 = -0.75 -> -1 (code 10)
    assert unpack_nibbles(codes)[:2].tolist() == [3, 10]
    zero_codes, zero_scales = quantize_nvfp4(torch.zeros(16), ONE, tiny_scale="modelopt")
    assert zero_scales.tolist() == [E4M3_ONE] and zero_codes.eq(0).all()


def test_static_scale_too_small_saturates_instead_of_overflowing() -> None:
    gs = torch.tensor(1.0 / 2688.0)  # covers amax 1; the block holds 100
    codes, scales = quantize_nvfp4(block([100.0, -0.5]), gs)
    assert e4m3_bits_to_float(scales).tolist() == [448.0]
    out = dequantize_nvfp4(codes, scales, gs)
    assert out[0].item() == pytest.approx(1.0) and not out.isnan().any()


def test_head_dim_40_raises_block_size_error_naming_the_fix() -> None:
    with pytest.raises(BlockSizeError, match="head_dim is 40") as info:
        get_format("nvfp4").quantize(torch.zeros(1, 1, 2, 40))
    assert "skip_layers" in str(info.value) and "fp8_e4m3" in str(info.value)


def test_parts_shapes_and_dtypes() -> None:
    fmt = get_format("nvfp4")
    x = torch.randn(2, 3, 5, 64)
    parts = fmt.quantize(x)
    assert parts["codes"].shape == (2, 3, 5, 32) and parts["codes"].dtype == torch.uint8
    assert parts["scales"].shape == (2, 3, 5, 4) and parts["scales"].dtype == torch.uint8
    assert fmt.bits_per_element(64) == 4.5
    assert fmt.dequantize(parts, fmt.global_scale(x), torch.bfloat16).dtype == torch.bfloat16


def test_per_head_and_per_write_global_scales_broadcast() -> None:
    fmt = get_format("nvfp4")
    x = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(1))
    gs = x.abs().amax(dim=(0, 2, 3), keepdim=True) / 2688.0  # [1, H, 1, 1]
    parts = fmt.quantize(x, gs)
    for h in range(2):
        codes, scales = quantize_nvfp4(x[:, h], gs[0, h, 0, 0])
        assert torch.equal(parts["codes"][:, h], codes)
        assert torch.equal(parts["scales"][:, h], scales)
    out = fmt.dequantize(parts, gs, torch.float32)
    assert (out - x).abs().max() < x.abs().max() / 4


# ---- properties -----------------------------------------------------------------------------

e4m3_normal_bytes = st.integers(0x08, 0x7E)  # normal E4M3 scales, 2^-6 .. 448


@settings(max_examples=60, deadline=None)
@given(
    scale_bytes=st.lists(e4m3_normal_bytes, min_size=1, max_size=4),
    gs_exponent=st.integers(-20, 10),
    data=st.data(),
)
def test_values_on_the_grid_round_trip_exactly(scale_bytes, gs_exponent, data) -> None:
    """x = e2m1 * s * gs, power-of-two gs, one +-6 per block: codes, scales, values exact."""
    gs = torch.tensor(2.0**gs_exponent)
    nblocks = len(scale_bytes)
    codes = data.draw(st.lists(st.sampled_from([c for c in range(16) if c != 8]),
                               min_size=16 * nblocks, max_size=16 * nblocks))
    codes_t = torch.tensor(codes, dtype=torch.uint8).reshape(nblocks, 16)
    codes_t[:, 0] = data.draw(st.sampled_from([7, 15]))  # block amax = 6 * s * gs
    scales_t = torch.tensor(scale_bytes, dtype=torch.uint8)
    x = (e2m1_lut()[codes_t.long()] * (e4m3_bits_to_float(scales_t)[:, None] * gs)).reshape(-1)
    got_codes, got_scales = quantize_nvfp4(x, gs)
    assert torch.equal(got_scales, scales_t)
    assert torch.equal(unpack_nibbles(got_codes), codes_t.reshape(-1))
    assert torch.equal(dequantize_nvfp4(got_codes, got_scales, gs), x)


def half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the gap between the E2M1 neighbours around |y| (|y| <= 6)."""
    a = y.abs()
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_magnitude=st.floats(-12, 12),
    static_factor=st.sampled_from([None, 0.25, 1.0, 4.0]),
    heavy_tail=st.booleans(),
    tiny_scale=st.sampled_from(["zero", "modelopt"]),
)
def test_per_block_error_bound_and_no_nan(
    seed, log_magnitude, static_factor, heavy_tail, tiny_scale
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 64, generator=gen) * 10.0**log_magnitude
    if heavy_tail:
        x = x * torch.exp(2 * torch.randn(3, 64, generator=gen))
    gs = nvfp4_global_scale(x)
    if static_factor is not None:  # a static scale off the data's amax: clipping or headroom
        gs = gs * static_factor
    codes, scales = quantize_nvfp4(x, gs, tiny_scale)
    out = dequantize_nvfp4(codes, scales, gs)
    assert codes.dtype == scales.dtype == torch.uint8
    assert codes.shape == (3, 32) and scales.shape == (3, 4)
    assert not out.isnan().any()

    d = (e4m3_bits_to_float(scales) * gs).repeat_interleave(16, dim=-1)
    err = (x - out).abs()
    zero_block = d == 0
    # a zero-scale block holds only values whose block scale underflowed E4M3 (< 2^-10)
    assert (x.abs()[zero_block] <= 6 * gs * 2.0**-10 * (1 + 1e-6)).all()
    y = x[~zero_block] / d[~zero_block]
    saturated = y.abs() > 6
    bound = torch.where(saturated, (y.abs() - 6) * d[~zero_block], half_step(y) * d[~zero_block])
    slack = 1e-6 * x.abs()[~zero_block]  # FP32 rounding of x / d and of (y - 6) * d
    assert (err[~zero_block] <= bound + slack).all()
    if static_factor is None or static_factor >= 1.0:
        # scales cover the amax: only E4M3 rounding of the block scale can push |y| past 6
        assert (y.abs() <= 6 * (1 + 2.0**-4)).all()


def _reference_agreement_inputs() -> list[torch.Tensor]:
    """Blocks whose ratios and scaled elements fall on the E4M3 and E2M1 ties and thresholds,
    blocks spread over 2^-40..2^40 (tiny blocks that underflow included), zero blocks, and
    blocks holding NaN/Inf (what nonfinite="keep" lets through)."""
    from nvfp4kv.formats.e2m1 import E2M1_BOUNDS, E2M1_MAGNITUDES

    g = torch.Generator().manual_seed(21)
    out = []
    spread = torch.randn(3, 4, 64, 64, generator=g) * torch.exp2(
        torch.randint(-40, 40, (3, 4, 64, 4), generator=g).float()).repeat_interleave(16, -1)
    spread[0, 0, :4] = 0.0
    spread[0, 1, 0, 5] = float("inf")
    spread[0, 1, 1, 7] = float("nan")
    spread[0, 1, 2, 9] = -float("inf")
    spread[0, 2, 0, :16] = -0.0
    out.append(spread)
    # every E2M1 value, threshold and neighbour, at block scales that are themselves E4M3 ties
    e2m1 = torch.tensor(E2M1_BOUNDS + E2M1_MAGNITUDES, dtype=torch.float32).view(torch.int32)
    elems = torch.cat([(e2m1 + k).view(torch.float32) for k in (-1, 0, 1)])
    elems = torch.cat([elems, -elems])
    elems = elems[: elems.numel() // 15 * 15].reshape(-1, 15)
    rows = torch.cat([elems, torch.full((elems.shape[0], 1), 6.0)], dim=1)  # amax 6: ratio = block scale
    e4m3 = e4m3_bits_to_float(torch.arange(0, 127, dtype=torch.uint8))
    mids = (e4m3[:-1] + e4m3[1:]) / 2  # E4M3 ties of the block scale
    for s in torch.cat([e4m3[1:], mids, mids.view(torch.int32).add(1).view(torch.float32)]).tolist():
        out.append((rows * s).reshape(1, 1, -1, 16))
    return out


@pytest.mark.parametrize("tiny_scale", ["zero", "modelopt"])
def test_fast_encoder_equals_the_reference_definition(tiny_scale: str) -> None:
    """quantize_nvfp4 (few ops: native float8 cast, bucketize, pair table) writes the same code
    and scale bytes as quantize_nvfp4_reference (integer E4M3 rounding, threshold E2M1 rounding)
    for every kind of global scale: per tensor, per head, per row, Python float, 0, Inf, NaN,
    huge and tiny; and for FP16/BF16 inputs."""
    from nvfp4kv.formats.nvfp4 import quantize_nvfp4_reference

    g = torch.Generator().manual_seed(22)
    scales = [1.0, torch.tensor(1.0), torch.tensor(0.003).reshape(1, 1, 1, 1),
              torch.rand(1, 4, 1, 1, generator=g), torch.rand(3, 1, 1, 1, generator=g) * 1e-3,
              torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), float("inf")), torch.full((1, 1, 1, 1), float("nan")),
              torch.full((1, 1, 1, 1), 3e37), torch.full((1, 1, 1, 1), 1e-30), torch.full((1, 1, 1, 1), 2.0**-126)]
    for x in _reference_agreement_inputs():
        for gs in scales:
            if isinstance(gs, torch.Tensor) and gs.dim() == 4 and x.shape[0] != gs.shape[0] != 1:
                continue
            if isinstance(gs, torch.Tensor) and gs.dim() == 4 and gs.shape[1] not in (1, x.shape[1]):
                continue
            fast, ref = quantize_nvfp4(x, gs, tiny_scale), quantize_nvfp4_reference(x, gs, tiny_scale)
            assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]), (x.shape, gs)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(2, 3, 40, 32, generator=g) * 7).to(dtype)
        gs = nvfp4_global_scale(x)
        fast, ref = quantize_nvfp4(x, gs, tiny_scale), quantize_nvfp4_reference(x, gs, tiny_scale)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def _step_inputs(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Stacked ``[2, B, H, T, 64]`` K/V with an all-zero block, a tiny block (scale underflows
    to 0), a block at the dtype's largest finite value, and random magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 3, 5, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (2, 2, 3, 5, 1), generator=g).float())
    x[0, 0, 0, 0, :16] = 0
    x[1, 0, 1, 1, 16:32] = 1e-30
    x[0, 1, 2, 2, 32:48] = torch.finfo(dtype).max
    return x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_kind", ["data", "per_row", "tiny", "huge"])
def test_step_encoder_gives_the_bits_of_quantize_and_dequantize(dtype: torch.dtype, scale_kind: str) -> None:
    """NVFP4Format.step_encoder (the cache's decode-step encoder) equals quantize + dequantize
    bit for bit: codes, scale bytes, decoded values (-0.0 and saturation included), for a
    per-tensor scale from the data, per-row scales, a tiny scale (every block saturates at 448)
    and a huge one (FP32 products overflow: the saturating clamp must stay)."""
    fmt = get_format("nvfp4")
    for seed in range(4):
        x = _step_inputs(dtype, seed)
        scale = {
            "data": fmt.global_scale(x[0]).float(),
            "per_row": torch.tensor([1e-3, 0.5, 7.0, 2.0 ** -20]).reshape(2, 2, 1, 1, 1),
            "tiny": torch.full((1, 1, 1, 1), 1e-38),
            "huge": torch.full((1, 1, 1, 1), 3e36),
        }[scale_kind]
        encode = fmt.step_encoder(scale)
        assert encode is not None
        parts, decoded = encode(x, dtype)
        ref = fmt.quantize(x, scale)
        assert parts.keys() == ref.keys()
        for name in ref:
            assert parts[name].dtype == ref[name].dtype and torch.equal(parts[name], ref[name]), name
        expect = fmt.dequantize(ref, scale, dtype)
        assert decoded.dtype == expect.dtype
        assert torch.equal(decoded.contiguous().view(torch.uint8), expect.contiguous().view(torch.uint8))
        assert encode(x, None)[1] is None


def test_step_encoder_is_declined_where_it_would_not_be_exact() -> None:
    """No fast encoder for a scale that is zero, negative, NaN or Inf anywhere, for none, or for
    tiny_scale="modelopt": the cache then runs the format's own quantize/dequantize."""
    fmt = get_format("nvfp4")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert fmt.step_encoder(torch.tensor([1.0, bad]).reshape(2, 1, 1, 1, 1)) is None
    assert fmt.step_encoder(None) is None
    assert get_format("nvfp4", tiny_scale="modelopt").step_encoder(torch.ones(1, 1, 1, 1)) is None
