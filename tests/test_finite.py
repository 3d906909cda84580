"""Sweeps that cannot lie about numerics.

- Finite in, finite out: every registered format, for every model dtype (fp32, bf16, fp16),
  maps finite K/V to finite K/V after quantize -> dequantize back to that dtype; beyond the
  dtype's range it saturates at the largest finite value, as engines' ``satfinite`` casts do.
- The NaN/Inf policy (``raise``, ``map``, ``keep``) holds on every path that reads K/V, the raw
  prefill chunk of ``serving`` reads and the sink/residual windows included.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.cache import KVCacheConfig, PackedKVLayer, QuantizedKVCache, cache_kwarg_name, make_cache
from nvfp4kv.errors import NonFiniteKVError
from nvfp4kv.testing import FORMAT_CASES, format_case_id
from nvfp4kv.formats import KVFormat, available_formats, get_format
from nvfp4kv.testing import tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: every registered format, with the options that change its arithmetic
CONFIGS = FORMAT_CASES
IDS = [format_case_id(name, opts) for name, opts in CONFIGS]
D = 64


def extremes(dtype: torch.dtype) -> list[float]:
    """Largest finite values (the dtype's, FP16's 65504, 57984 that rounds up past it in
    block-16 FP4, 3.3e38 near BF16/FP32's), smallest normal and subnormal, zeros."""
    fi = torch.finfo(dtype)
    magnitudes = [fi.max, 65504.0, 57984.0, 3.3e38, fi.tiny, fi.tiny * fi.eps, 1.0]
    values = [s * m for m in magnitudes if m <= fi.max for s in (1.0, -1.0)]
    return [*values, 0.0, -0.0]


def round_trip(fmt: KVFormat, x: torch.Tensor) -> torch.Tensor:
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    return fmt.dequantize(fmt.quantize(x, gs), gs, x.dtype)


def assert_finite_out(fmt: KVFormat, x: torch.Tensor) -> None:
    assert torch.isfinite(x).all()
    out = round_trip(fmt, x)
    assert out.dtype == x.dtype and out.shape == x.shape
    bad = ~torch.isfinite(out)
    assert not bad.any(), f"{fmt} {x.dtype}: finite {x[bad][:4].tolist()} came back as {out[bad][:4].tolist()}"


def tokens_for(fmt: KVFormat, groups: int = 1) -> int:
    return fmt.token_group * groups if fmt.token_group > 1 else 2 * groups


# ---------------------------------------------------------------- finite in, finite out
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_extreme_values_and_all_equal_blocks_stay_finite(name: str, options: dict, dtype: torch.dtype) -> None:
    fmt = get_format(name, **options)
    t = tokens_for(fmt)
    values = torch.tensor(extremes(dtype), dtype=torch.float32)
    for value in values:  # all-equal blocks (one value everywhere) of every extreme
        assert_finite_out(fmt, torch.full((1, 2, t, D), float(value)).to(dtype))
    mixed = values.repeat(2 * t * D // len(values) + 1)[: 2 * t * D]  # every extreme in one tensor
    assert_finite_out(fmt, mixed.reshape(1, 2, t, D).to(dtype))


@pytest.mark.parametrize(("name", "value"), [("bf16", 65504.0), ("fp4_mx_block16", 57984.0),
                                             ("int4", 65504.0), ("int2", 65504.0)])
def test_fp16_overflow_saturates_at_65504_without_changing_the_stored_bits(name: str, value: float) -> None:
    """The measured failures: FP16 65504 -> BF16 65536 -> Inf; 57984 -> code 4 at 2^14 = 65536."""
    fmt = get_format(name)
    x = torch.full((1, 1, 16, D), 1.0, dtype=torch.float16)
    x[0, 0, 0, :16] = value
    parts = fmt.quantize(x)
    assert fmt.dequantize(parts, None, torch.float16)[0, 0, 0, 0].item() == 65504.0
    assert fmt.dequantize(parts, None, torch.float32)[0, 0, 0, 0].item() > 65504.0  # stored as before
    if name == "fp4_mx_block16":  # the codes and exponent byte are the reference's, unchanged
        assert parts["scales"][0, 0, 0, 0].item() == 14 + 127 and parts["codes"][0, 0, 0, 0].item() == 0x66


@st.composite
def finite_kv(draw: st.DrawFn) -> tuple[KVFormat, torch.Tensor]:
    """A format and a finite K/V tensor of a model dtype: random values of any magnitude or one
    value everywhere (all-equal blocks), with extremes and arbitrary finite values injected."""
    name, options = draw(st.sampled_from(CONFIGS))
    dtype = draw(st.sampled_from(DTYPES))
    fmt = get_format(name, **options)
    fi = torch.finfo(dtype)
    value = st.one_of(
        st.sampled_from(extremes(dtype)),
        st.floats(-fi.max, fi.max, allow_nan=False, allow_infinity=False, width=16 if dtype == torch.float16 else 32),
    )
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), tokens_for(fmt, draw(st.integers(1, 2))), D)
    if draw(st.booleans()):
        x = torch.full(shape, draw(value))
    else:
        low = math.frexp(fi.tiny * fi.eps)[1]
        exponent = draw(st.integers(low, math.frexp(fi.max)[1]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        x = torch.randn(shape, generator=g) * 2.0**exponent
    flat = x.flatten()
    for index, v in draw(st.lists(st.tuples(st.integers(0, flat.numel() - 1), value), max_size=6)):
        flat[index] = v
    x = flat.reshape(shape).clamp(-fi.max, fi.max).to(dtype)  # finite in the dtype by construction
    return fmt, x


@settings(max_examples=150, deadline=None)
@given(case=finite_kv())
def test_finite_in_finite_out_for_every_format_and_model_dtype(case: tuple[KVFormat, torch.Tensor]) -> None:
    assert {name for name, _ in CONFIGS} == set(available_formats())  # a new format joins the property
    assert_finite_out(*case)


@pytest.mark.parametrize("fmt", ["bf16", "fp4_mx_block16", "int4", "nvfp4", "fp8_e4m3", "mxfp4"])
def test_an_fp16_model_reads_finite_kv_back_from_the_cache(fmt: str) -> None:
    cache = QuantizedKVCache(KVCacheConfig(k_format=fmt, v_format=fmt, read_mode="quantized"))
    k = torch.randn(1, 2, 16, D).to(torch.float16)
    k[0, 0, :, :16] = 57984.0
    k[0, 1, 3, 5] = 65504.0
    k_out, v_out = cache.update(k, -k, 0)
    assert k_out.dtype == torch.float16 and torch.isfinite(k_out).all() and torch.isfinite(v_out).all()


# ---------------------------------------------------------------- the NaN/Inf policy
def test_error_is_a_deprecated_alias_of_raise() -> None:
    with pytest.warns(DeprecationWarning, match="nonfinite='raise'"):
        cfg = KVCacheConfig(nonfinite="error")
    assert cfg == KVCacheConfig() and cfg.nonfinite == "raise" and cfg.label == "nvfp4"
    with pytest.warns(DeprecationWarning):
        assert get_format("nvfp4", nonfinite="error").nonfinite == "raise"
    assert KVCacheConfig(nonfinite="keep").label == "nvfp4+keepnonfinite"
    assert KVCacheConfig(nonfinite="map").label == "nvfp4+mapnonfinite"


def _poisoned_keys() -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of 10 tokens: NaN in the sink (token 0), -Inf in a packed token (4), +Inf and NaN in
    the residual window (8, 9)."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 10, 32, generator=g), torch.randn(1, 2, 10, 32, generator=g)
    k[0, 0, 0, 1] = float("nan")
    k[0, 1, 4, 2] = float("-inf")
    k[0, 0, 8, 3] = float("inf")
    v[0, 1, 9, 0] = float("nan")
    return k, v


@pytest.mark.parametrize("read_mode", ["serving", "quantized", "raw_fresh"])
def test_map_applies_to_every_read_path_windows_and_prefill_chunk_included(read_mode: str) -> None:
    cache = QuantizedKVCache(KVCacheConfig(nonfinite="map", sink_tokens=2, residual_length=4, read_mode=read_mode))
    k, v = _poisoned_keys()
    k_out, v_out = cache.update(k, v, 0)  # the prefill chunk
    assert torch.isfinite(k_out).all() and torch.isfinite(v_out).all()
    layer = cache.layers[0]
    assert isinstance(layer, PackedKVLayer)
    amax = k[torch.isfinite(k)].abs().max()
    assert layer.k_stream.sink[0, 0, 0, 1] == 0  # NaN -> 0 in the sink
    assert layer.k_stream.pending[0, 0, 2, 3] == amax  # +Inf -> largest finite |K| of the write
    assert layer.v_stream.pending[0, 1, 3, 0] == 0
    for stream in (layer.k_stream, layer.v_stream):
        assert torch.isfinite(stream.read(torch.float32)).all()
    k_step, v_step = cache.update(*(t[:, :, :1] for t in _poisoned_keys()), 0)  # a NaN decode step
    assert torch.isfinite(k_step).all() and torch.isfinite(v_step).all()
    view = layer.packed_view()  # what the fused decode kernel would read
    if view is not None:
        assert torch.isfinite(view.raw_k).all() and torch.isfinite(view.raw_v).all()


def test_keep_stores_and_returns_nan_inf_as_they_are() -> None:
    cache = QuantizedKVCache(KVCacheConfig(k_format="bf16", v_format="bf16", nonfinite="keep", read_mode="quantized"))
    k, v = _poisoned_keys()
    k_out, _ = cache.update(k, v, 0)
    assert torch.equal(torch.isnan(k_out), torch.isnan(k)) and torch.equal(torch.isinf(k_out), torch.isinf(k))


# ---------------------------------------------------------------- a model whose K goes bad
POISONED_TOKEN = 3


@pytest.fixture(scope="module")
def poisoned_llama():
    """A tiny Llama whose layer-0 K projection emits NaN (and Inf) for prompt token 3."""
    model = tiny_llama()

    def poison(module, inputs, output):
        if output.shape[1] <= POISONED_TOKEN + 1:  # decode steps stay clean
            return output
        output = output.clone()
        output[:, POISONED_TOKEN, :2] = float("nan")
        output[:, POISONED_TOKEN + 1, 5] = float("inf")
        return output

    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(poison)
    yield model
    handle.remove()


def _prefill(model, cache) -> torch.Tensor:
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, use_cache=True, **{cache_kwarg_name(model): cache}).logits


@pytest.mark.parametrize("fmt", ["nvfp4", "bf16"])
@pytest.mark.parametrize("read_mode", ["serving", "quantized"])
def test_map_gives_finite_prefill_and_decode_logits(poisoned_llama, fmt: str, read_mode: str) -> None:
    cache = make_cache(poisoned_llama, KVCacheConfig(k_format=fmt, v_format=fmt, nonfinite="map", read_mode=read_mode))
    assert torch.isfinite(_prefill(poisoned_llama, cache)).all()
    with torch.no_grad():
        step = poisoned_llama(torch.tensor([[5]]), use_cache=True, **{cache_kwarg_name(poisoned_llama): cache}).logits
    assert torch.isfinite(step).all()


def test_raise_names_layer_k_position_and_the_fix(poisoned_llama) -> None:
    cache = make_cache(poisoned_llama, KVCacheConfig(nonfinite="raise"))
    with pytest.raises(NonFiniteKVError, match=rf"Layer 0 K holds NaN/Inf \(first at batch 0, kv head 0, token "
                                               rf"{POISONED_TOKEN}\).*nonfinite='map'.*nonfinite='keep'"):
        _prefill(poisoned_llama, cache)
    assert cache.get_seq_length() == 0


def test_keep_lets_nan_propagate(poisoned_llama) -> None:
    """Documented research behaviour: with ``keep`` the prefill chunk attends to its raw NaN key,
    so every query from the poisoned token on turns NaN (with an additive causal mask, earlier
    ones too: NaN + -inf is NaN)."""
    logits = _prefill(poisoned_llama, make_cache(poisoned_llama, KVCacheConfig(nonfinite="keep")))
    assert torch.isnan(logits[:, POISONED_TOKEN:]).all()


# ---------------------------------------------------------------- the kernel backends saturate too
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # the interpreter's FP32 math
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "options"), [c for c in CONFIGS if get_format(c[0]).kernels.has("triton")],
                         ids=[i for c, i in zip(CONFIGS, IDS) if get_format(c[0]).kernels.has("triton")])
def test_triton_backend_saturates_bit_identically_to_the_reference(name: str, options: dict, dtype: torch.dtype) -> None:
    """Issue 10 F9: the Triton dequantize path (here under TRITON_INTERPRET=1, small tensors)
    returns the reference's saturated bits, not Inf, for every extreme value and output dtype."""
    from nvfp4kv.kernels import get_backend

    fmt = get_format(name, **options)
    values = torch.tensor(extremes(dtype), dtype=torch.float32)
    x = values.repeat(2 * 2 * D // len(values) + 1)[: 2 * 2 * D].reshape(1, 2, 2, D).to(dtype)
    x[0, 1, 1, :16] = float(values[0])  # an all-max block: the overflow case of block-16 FP4
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    parts = fmt.quantize(x, gs)
    backend = get_backend("triton")
    for out_dtype in DTYPES:  # narrower outputs than the input overflow unless saturated
        ref = fmt.dequantize(parts, gs, out_dtype)
        got = backend.dequantize(fmt, parts, gs, out_dtype)
        assert torch.isfinite(got).all(), f"{fmt} -> {out_dtype}: Inf from the Triton path"
        assert torch.equal(_bits(got), _bits(ref)), f"{fmt} -> {out_dtype}: not the reference's bits"
