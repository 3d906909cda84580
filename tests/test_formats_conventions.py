"""Scale conventions: exact values for a known amax, round trips, unknown names."""

from __future__ import annotations

import math

import pytest
import torch

from nvfp4kv.errors import ConfigError
from nvfp4kv.formats.conventions import available_conventions, from_decode_scale, to_decode_scale


def test_known_amax_in_every_convention() -> None:
    amax = 2688.0  # 6 * 448: decode scale exactly 1
    values = {
        "decode": 1.0,
        "flashinfer_encode": 1.0,
        "flashinfer_paged_kv": pytest.approx(1 / 6),
        "trtllm_xqa": 6.0,
        "amax": 2688.0,
    }
    assert sorted(values) == available_conventions()
    for name, expected in values.items():
        assert from_decode_scale(amax / 2688.0, name) == expected
        assert to_decode_scale(from_decode_scale(1.0, name), name) == pytest.approx(1.0, rel=1e-6)


def test_modelopt_scale_times_six_is_what_xqa_expects() -> None:
    amax = 3.7
    gs = to_decode_scale(amax, "amax")
    assert from_decode_scale(gs, "trtllm_xqa") == pytest.approx(amax / 448, rel=1e-6)
    assert from_decode_scale(gs, "flashinfer_paged_kv") == pytest.approx(448 / amax, rel=1e-6)
    assert from_decode_scale(gs, "flashinfer_encode") == pytest.approx(2688 / amax, rel=1e-6)


def test_amax_convention_matches_the_dynamic_global_scale_bit_for_bit() -> None:
    from nvfp4kv.formats.nvfp4 import nvfp4_global_scale

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_decode_scale(x.abs().amax(), "amax"), nvfp4_global_scale(x))


def test_tensors_stay_tensors_and_zero_maps_to_inf() -> None:
    gs = torch.tensor([[0.5], [0.0]])
    encoded = from_decode_scale(gs, "flashinfer_encode")
    assert isinstance(encoded, torch.Tensor) and encoded.dtype == torch.float32
    assert encoded.flatten().tolist() == [2.0, math.inf]
    assert to_decode_scale(encoded, "flashinfer_encode").flatten().tolist() == [0.5, 0.0]


def test_unknown_convention_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="flashinfer_encode") as info:
        to_decode_scale(1.0, "vllm")
    assert "'vllm'" in str(info.value)


def test_has_nonfinite_equals_isfinite_all_everywhere() -> None:
    """The sum(x * 0) test finds a NaN/Inf wherever it sits, in every float dtype, and never
    reports finite data (huge values and signed zeros included)."""
    from nvfp4kv.formats.numerics import has_nonfinite

    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        finfo = torch.finfo(dtype)
        base = torch.randn(2, 3, 37, 16, generator=g).to(dtype)
        base[0, 0, 0, :4] = torch.tensor([finfo.max, -finfo.max, -0.0, finfo.tiny], dtype=dtype)
        assert not has_nonfinite(base)
        assert not has_nonfinite(base[:, :, :0])
        flat = base.reshape(-1)
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in list(range(0, 70)) + torch.randint(0, flat.numel(), (40,), generator=g).tolist():
                x = flat.clone()
                x[pos] = bad
                assert has_nonfinite(x.reshape(base.shape)) == (not bool(torch.isfinite(x).all())) == True  # noqa: E712
    assert not has_nonfinite(torch.arange(5))
