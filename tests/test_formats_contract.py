"""Every registered format keeps the cache contract of ``nvfp4kv.formats.base``.

Parts are ``[B, H, t, ...]`` with ``t = T`` or ``T // token_group``; appending is ``cat(dim=2)``,
cropping keeps ``n * t // T`` rows, beam reordering is ``index_select(0)``; the storage the
parts really take equals ``bits_per_element``.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.errors import NonFiniteKVError, UnknownFormatError
from nvfp4kv.testing import FORMAT_CASES, format_case_id
from nvfp4kv.formats import KVFormat, available_formats, get_format

CONFIGS = FORMAT_CASES
IDS = [format_case_id(name, opts) for name, opts in CONFIGS]


def test_registered_names() -> None:
    assert available_formats() == [
        "bf16", "fp4_mx_block16", "fp8_e4m3", "int2", "int4", "mxfp4", "nvfp4",
    ]


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(UnknownFormatError) as info:
        get_format("nvfp5")
    message = str(info.value)
    assert "'nvfp5'" in message
    assert all(name in message for name in available_formats())


def test_formats_are_frozen_hashable_and_pass_through() -> None:
    fmt = get_format("int4", axis="channel", group_size=64)
    assert get_format(fmt) is fmt
    assert hash(fmt) == hash(get_format("int4", axis="channel", group_size=64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.group_size = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        get_format("nvfp4", name="fp8_e4m3")  # the name is not an option


@pytest.mark.parametrize(("name", "good", "bad", "error", "message"), [
    ("nvfp4", {"tiny_scale": "modelopt"}, {"tiny_scale": "one"}, ValueError,
     "nvfp4 option tiny_scale must be 'zero' or 'modelopt', got 'one'"),
    ("mxfp4", {"nonfinite": "map"}, {"nonfinite": "bogus"}, ValueError,
     "nonfinite='bogus' is not supported; use one of raise, map, keep"),
    ("int4", {"axis": "channel"}, {"axis": "head"}, ValueError, "int4 option axis must be 'token' or 'channel', got 'head'"),
    ("fp8_e4m3", {"scaling": "token"}, {"scaling": "bogus"}, ValueError, "fp8_e4m3 option scaling must be one of"),
    ("mxfp4", {}, {"x": 1}, TypeError, "unexpected keyword argument 'x'"),  # an unknown option is no option
], ids=["nvfp4-tiny_scale", "mxfp4-nonfinite", "int4-axis", "fp8-scaling", "mxfp4-unknown"])
def test_bad_option_values_are_refused(name: str, good: dict, bad: dict, error: type, message: str) -> None:
    """Each bad value is refused by its own check, naming the option, the value and the valid ones;
    the valid value of the same option is accepted and kept."""
    fmt = get_format(name, **good)
    assert all(getattr(fmt, key) == value for key, value in good.items())
    with pytest.raises(error, match=re.escape(message)):
        get_format(name, **bad)


def quantize_all(fmt: KVFormat, x: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    return fmt.quantize(x, gs), gs


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_part_layout_append_crop_and_beam_select(name: str, options: dict) -> None:
    fmt = get_format(name, **options)
    b, h, t, d = 3, 2, 32, 64
    x = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(0))
    parts, gs = quantize_all(fmt, x)
    group = fmt.token_group
    for part in parts.values():
        assert part.shape[:2] == (b, h) and part.shape[2] in (t, t // group)
    decoded = fmt.dequantize(parts, gs, torch.float32)
    assert decoded.shape == x.shape and not decoded.isnan().any()
    assert fmt.dequantize(parts, gs, torch.bfloat16).dtype == torch.bfloat16

    # append: two chunks quantized with the same global scale, concatenated on dim 2
    split = 2 * max(group, 8)
    first = fmt.quantize(x[:, :, :split], gs)
    second = fmt.quantize(x[:, :, split:], gs)
    for key, part in parts.items():
        assert torch.equal(torch.cat([first[key], second[key]], dim=2), part), key

    # crop to n tokens keeps n * t_part // T rows of every part
    n = split
    cropped = {k: p[:, :, : n * p.shape[2] // t] for k, p in parts.items()}
    assert torch.equal(fmt.dequantize(cropped, gs, torch.float32), decoded[:, :, :n])

    # beam reorder
    order = torch.tensor([2, 0, 0])
    selected = {k: p.index_select(0, order) for k, p in parts.items()}
    assert torch.equal(fmt.dequantize(selected, gs, torch.float32), decoded.index_select(0, order))


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_bits_per_element_is_the_real_storage(name: str, options: dict) -> None:
    fmt = get_format(name, **options)
    x = torch.randn(2, 2, 32, 128)
    parts, _ = quantize_all(fmt, x)
    stored_bits = sum(p.numel() * p.element_size() * 8 for p in parts.values())
    assert stored_bits / x.numel() == fmt.bits_per_element(128)


def nonfinite_limit(fmt: KVFormat, finite: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
    """The value each format documents for +Inf under nonfinite='map'."""
    if fmt.name == "bf16":
        return torch.tensor(torch.finfo(torch.bfloat16).max)
    if fmt.name == "nvfp4":
        return 2688.0 * gs
    if fmt.name == "fp8_e4m3":
        if fmt.scaling == "token":
            return finite.abs().amax(dim=-1, keepdim=True)
        return 448.0 * gs
    return finite.abs().amax()


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_nonfinite_error_by_default_and_documented_map(name: str, options: dict) -> None:
    x = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(2))
    bad = x.clone()
    bad[0, 0, 1, 3], bad[0, 1, 2, 5], bad[0, 1, 4, 0] = float("nan"), float("inf"), float("-inf")

    with pytest.raises(NonFiniteKVError, match="nonfinite='map'"):
        get_format(name, **options).quantize(bad)

    fmt = get_format(name, nonfinite="map", **options)
    finite = torch.where(torch.isfinite(bad), bad, torch.zeros(()))
    gs = fmt.global_scale(finite) if fmt.uses_global_scale else None
    assert gs is None or torch.equal(gs, fmt.global_scale(bad))  # scales ignore NaN/Inf
    limit = nonfinite_limit(fmt, finite, gs)
    mapped = torch.where(torch.isnan(bad), torch.zeros(()), bad)
    mapped = torch.where(torch.isinf(mapped), torch.sign(mapped) * limit, mapped)
    got = fmt.quantize(bad)
    expected = fmt.quantize(mapped)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.isfinite(fmt.dequantize(got, gs, torch.float32)).all()


@settings(max_examples=25, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    t_groups=st.integers(1, 3),
    d_blocks=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_shapes_dtypes_and_finiteness_on_random_shapes(
    config, b, h, t_groups, d_blocks, seed
) -> None:
    name, options = config
    fmt = get_format(name, **options)
    t = t_groups * fmt.token_group * 2
    d = d_blocks * 64
    x = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    parts, gs = quantize_all(fmt, x)
    for key, part in parts.items():
        if key in ("codes", "scales"):
            assert part.dtype == torch.uint8
        assert part.shape[:2] == (b, h)
    out = fmt.dequantize(parts, gs, torch.bfloat16)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_divide_is_true_division_and_ceil_log2_is_exact() -> None:
    from nvfp4kv.formats.numerics import ceil_log2_exact, divide

    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(divide(x, 448.0), x / torch.tensor(448.0))
    r = torch.tensor([1.0, 2.0, 3.0, 0.75, 0.5, 2.0**-140, 1e-10, 3e38])
    assert ceil_log2_exact(r).tolist() == [0, 1, 2, 0, -1, -140, -33, 128]
