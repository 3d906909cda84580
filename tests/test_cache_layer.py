"""The packed cache layer on raw tensors: storage, windows, scale policies, read modes, editing.

Everything goes through the public Cache API (``QuantizedKVCache(config).update(k, v, layer)``,
then ``cache.layers[i]``) and is checked against the formats' own reference functions, so
these tests pin what is *stored*, not just that generation runs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.cache import KVCacheConfig, PackedKVLayer, QuantizedKVCache, cache_kwarg_name
from nvfp4kv.errors import NonFiniteKVError
from nvfp4kv.formats import available_formats, get_format
from nvfp4kv.formats.conventions import from_decode_scale

B, H, D = 2, 2, 32
ALL_FORMATS = ["bf16", "fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4", "int4", "int2"]


def kv(t: int, seed: int = 0, b: int = B, h: int = H, d: int = D, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g).to(dtype)
    v = torch.randn(b, h, t, d, generator=g).to(dtype)
    return k, v


def cache_for(fmt: str = "nvfp4", v_fmt: str | None = None, **kwargs) -> QuantizedKVCache:
    return QuantizedKVCache(KVCacheConfig(k_format=fmt, v_format=v_fmt or fmt, **kwargs))


def layer0(cache: QuantizedKVCache) -> PackedKVLayer:
    layer = cache.layers[0]
    assert isinstance(layer, PackedKVLayer)
    return layer


def test_all_formats_registered():
    assert set(ALL_FORMATS) <= set(available_formats())


# ---------------------------------------------------------------- memory arithmetic
def _direct_bytes(fmt: str, tokens: int, h: int = 8, d: int = 128) -> tuple[int, int]:
    cache = cache_for(fmt)
    k, v = kv(tokens, b=1, h=h, d=d, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    return cache.nbytes(), 2 * k.numel() * 2  # (stored, what BF16 holds)


def test_nvfp4_stores_4p5_bits_per_element_plus_two_global_scales():
    h, d, tokens = 8, 128, 4096
    stored, bf16 = _direct_bytes("nvfp4", tokens, h, d)
    per_token = 2 * h * d * (0.5 + 1 / 16)  # K and V: packed E2M1 + one E4M3 scale per 16
    assert stored == tokens * per_token + 2 * 4  # + one FP32 global scale each for K and V
    assert stored / bf16 <= 0.285


def test_fp8_is_half_of_bf16():
    stored, bf16 = _direct_bytes("fp8_e4m3", 1024)
    assert stored == bf16 // 2 + 2 * 4


def test_appending_one_token_costs_exactly_the_nominal_bits():
    cache = cache_for("nvfp4")
    k, v = kv(64, b=1, h=8, d=128)
    cache.update(k, v, 0)
    before = cache.nbytes()
    cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert cache.nbytes() - before == 2 * 8 * 128 * 4.5 / 8


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_packed_bytes_match_the_formats_bits_per_element(fmt):
    # 64 tokens: a whole number of KIVI channel groups, so nothing waits in the pending buffer
    cache = cache_for(fmt)
    k, v = kv(64)
    cache.update(k, v, 0)
    layer = layer0(cache)
    for stream, x in ((layer.k_stream, k), (layer.v_stream, v)):
        assert stream.n_pending == 0
        assert stream.packed_nbytes() * 8 == x.numel() * stream.fmt.bits_per_element(D)
    row = cache.memory_report()[0]
    assert row["tokens"] == 64 and row["k_bytes"] + row["v_bytes"] == cache.nbytes()
    assert row["bf16_bytes"] == 2 * 2 * k.numel()


def test_memory_report_counts_residual_and_sink_in_full_precision():
    cache = cache_for("nvfp4", residual_length=8, sink_tokens=4)
    k, v = kv(40)
    cache.update(k, v, 0)
    layer = layer0(cache)
    assert (layer.k_stream.n_sink, layer.k_stream.n_packed, layer.k_stream.n_pending) == (4, 28, 8)
    full = B * H * 12 * D * 4  # fp32 sink + residual tokens
    packed = B * H * 28 * D * 4.5 / 8
    # one FP32 prefill scale per batch row (per-request scales: a row's codes never depend on its neighbours)
    assert layer.k_stream.nbytes() == full + packed + 4 * B


# ---------------------------------------------------------------- what is stored
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_e4m3", "int4", "mxfp4"])
def test_written_codes_never_change(fmt):
    cache = cache_for(fmt, residual_length=4)
    k, v = kv(100)
    cache.update(k[:, :, :40], v[:, :, :40], 0)
    layer = layer0(cache)
    first = {name: t.clone() for name, t in layer.k_stream.parts.items()}
    for i in range(40, 100, 7):
        cache.update(k[:, :, i : i + 7], v[:, :, i : i + 7], 0)
    for name, old in first.items():
        new = layer.k_stream.parts[name]
        assert torch.equal(new[:, :, : old.shape[2]], old), name
    assert cache.get_seq_length() == 100


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(["nvfp4", "fp8_e4m3", "int4", "int2", "fp4_mx_block16"]),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    residual=st.integers(0, 12),
    sink=st.integers(0, 5),
)
def test_any_chunking_stores_the_one_shot_encoding(fmt, chunks, residual, sink):
    """Sink and residual tokens are exact; packed tokens are the format's encoding of them."""
    total = sum(chunks)
    k, v = kv(total, seed=total)
    static = {0: (0.01, 0.02)}
    cache = cache_for(fmt, residual_length=residual, sink_tokens=sink, scale_policy="static", static_scales=static)
    start = 0
    for n in chunks:
        cache.update(k[:, :, start : start + n], v[:, :, start : start + n], 0)
        start += n
    layer = layer0(cache)
    assert cache.get_seq_length() == total
    for stream, x, gs in ((layer.k_stream, k, 0.01), (layer.v_stream, v, 0.02)):
        n_sink, n_packed = stream.n_sink, stream.n_packed
        assert n_sink == min(sink, total)
        assert n_packed % stream.fmt.token_group == 0
        assert stream.n_pending >= min(residual, total - n_sink)
        assert stream.n_pending < residual + stream.fmt.token_group or stream.n_pending == total - n_sink
        if n_sink:
            assert torch.equal(stream.sink, x[:, :, :n_sink])
        if stream.n_pending:
            assert torch.equal(stream.pending, x[:, :, n_sink + n_packed :])
        if n_packed:
            scale = torch.tensor(gs).reshape(1, 1, 1, 1) if stream.fmt.uses_global_scale else None
            expected = stream.fmt.quantize(x[:, :, n_sink : n_sink + n_packed], scale)
            assert stream.parts.keys() == expected.keys()
            for name in expected:
                assert torch.equal(stream.parts[name], expected[name]), name
        # the read-back is sink raw | packed dequantized | pending raw
        back = stream.read(torch.float32)
        assert torch.equal(back[:, :, :n_sink], x[:, :, :n_sink])
        assert torch.equal(back[:, :, n_sink + n_packed :], x[:, :, n_sink + n_packed :])


def test_kivi_channel_keys_wait_for_a_full_group():
    cache = cache_for("int4", k_options={"group_size": 16})
    k, v = kv(20)
    cache.update(k, v, 0)
    layer = layer0(cache)
    assert layer.k_format.token_group == 16 and layer.v_format.token_group == 1
    assert (layer.k_stream.n_packed, layer.k_stream.n_pending) == (16, 4)
    assert (layer.v_stream.n_packed, layer.v_stream.n_pending) == (20, 0)
    cache.update(*kv(12, seed=1), 0)
    assert (layer.k_stream.n_packed, layer.k_stream.n_pending) == (32, 0)


# ---------------------------------------------------------------- global scale policies
def test_prefill_policy_freezes_the_scale_and_later_outliers_saturate():
    cache = cache_for("nvfp4")
    k, v = kv(16)
    cache.update(k, v, 0)
    layer = layer0(cache)
    frozen = layer.k_stream.scale.clone()
    # one scale per batch row, each from that row alone (per-request: batch-invariant)
    assert frozen.shape == (B, 1, 1, 1)
    for b in range(B):
        assert torch.equal(frozen[b : b + 1], get_format("nvfp4").global_scale(k[b : b + 1]))
    outlier = torch.full((B, H, 1, D), 1000.0)
    cache.update(outlier, outlier, 0)
    assert torch.equal(layer.k_stream.scale, frozen)
    assert layer.k_stream.scale_record is None
    expected = get_format("nvfp4").quantize(outlier, frozen)
    assert torch.equal(layer.k_stream.parts["codes"][:, :, -1:], expected["codes"])
    assert layer.k_stream.read(torch.float32)[:, :, -1].max() < 1000.0  # clipped by the frozen scale


def test_prefill_scale_excludes_sink_tokens():
    cache = cache_for("nvfp4", sink_tokens=2)
    k, v = kv(10)
    k[:, :, :2] *= 100  # huge sink keys must not set the scale of the quantized ones
    cache.update(k, v, 0)
    scale = layer0(cache).k_stream.scale
    for b in range(B):  # per row (per request)
        assert torch.equal(scale[b : b + 1], get_format("nvfp4").global_scale(k[b : b + 1, :, 2:]))


def test_dynamic_policy_records_one_scale_per_write_and_counts_it():
    cache = cache_for("nvfp4", scale_policy="dynamic")
    fmt = get_format("nvfp4")
    k, v = kv(12)
    cache.update(k[:, :, :8], v[:, :, :8], 0)
    for i in range(8, 12):
        cache.update(k[:, :, i : i + 1] * (i - 6), v[:, :, i : i + 1], 0)
    layer = layer0(cache)
    record = layer.k_stream.scale_record
    # one scale per write and per batch row (each row's from its own tokens)
    assert record.shape == (B, 1, 12, 1) and record.dtype == torch.float32
    for b in range(B):
        row = slice(b, b + 1)
        assert torch.equal(record[row, :, :8], fmt.global_scale(k[row, :, :8]).expand(1, 1, 8, 1))
        for i in range(8, 12):
            assert torch.equal(record[row, :, i], fmt.global_scale(k[row, :, i : i + 1] * (i - 6))[:, :, 0])
    assert layer.k_stream.scale is None
    assert layer.k_stream.nbytes() == B * H * 12 * D * 4.5 / 8 + B * 12 * 4


def test_static_scales_are_used_and_converted_from_their_convention():
    gs_k, gs_v = 0.003, 0.004
    # the same scales given in FlashInfer's encode convention (1/gs)
    given = {0: (from_decode_scale(gs_k, "flashinfer_encode"), from_decode_scale(gs_v, "flashinfer_encode"))}
    cache = cache_for("nvfp4", scale_policy="static", static_scales=given, scale_convention="flashinfer_encode")
    k, v = kv(8)
    cache.update(k, v, 0)
    layer = layer0(cache)
    assert layer.k_stream.scale.item() == pytest.approx(gs_k, rel=1e-6)
    assert layer.v_stream.scale.item() == pytest.approx(gs_v, rel=1e-6)
    expected = get_format("nvfp4").quantize(k, layer.k_stream.scale)
    assert torch.equal(layer.k_stream.parts["codes"], expected["codes"])
    # static FP8 in the decode convention: amax/448 given directly
    cache = cache_for("fp8_e4m3", scale_policy="static", static_scales={0: (0.5, 0.25)})
    cache.update(k, v, 0)
    assert layer0(cache).v_stream.scale.item() == 0.25
    assert torch.equal(layer0(cache).v_stream.parts["codes"],
                       get_format("fp8_e4m3").quantize(v, torch.tensor(0.25).reshape(1, 1, 1, 1))["codes"])


# ---------------------------------------------------------------- read modes
def _prefill_then_decode(read_mode: str):
    cache = cache_for("nvfp4", read_mode=read_mode)
    k, v = kv(9)
    out_prefill = cache.update(k[:, :, :8], v[:, :, :8], 0)
    out_decode = cache.update(k[:, :, 8:], v[:, :, 8:], 0)
    return k, out_prefill, out_decode, layer0(cache)


def test_serving_reads_the_prefill_chunk_raw_and_decode_steps_dequantized():
    k, (pk, _), (dk, _), layer = _prefill_then_decode("serving")
    assert torch.equal(pk, k[:, :, :8])
    stored = layer.k_stream.read(torch.float32)
    assert torch.equal(dk, stored) and not torch.equal(dk[:, :, 8:], k[:, :, 8:])


def test_quantized_mode_reads_everything_dequantized():
    k, (pk, _), (dk, _), layer = _prefill_then_decode("quantized")
    stored = layer.k_stream.read(torch.float32)
    assert torch.equal(pk, stored[:, :, :8]) and not torch.equal(pk, k[:, :, :8])
    assert torch.equal(dk, stored)


def test_raw_fresh_mode_returns_the_fresh_tokens_raw():
    k, (pk, _), (dk, _), layer = _prefill_then_decode("raw_fresh")
    stored = layer.k_stream.read(torch.float32)
    assert torch.equal(pk, k[:, :, :8])
    assert torch.equal(dk[:, :, :8], stored[:, :, :8]) and torch.equal(dk[:, :, 8:], k[:, :, 8:])


def test_serving_chunk_sees_its_prefix_dequantized():
    cache = cache_for("nvfp4")
    k, v = kv(12)
    cache.update(k[:, :, :8], v[:, :, :8], 0)
    out_k, _ = cache.update(k[:, :, 8:], v[:, :, 8:], 0)
    stored = layer0(cache).k_stream.read(torch.float32)
    assert torch.equal(out_k[:, :, :8], stored[:, :, :8]) and torch.equal(out_k[:, :, 8:], k[:, :, 8:])


def test_update_returns_the_incoming_dtype():
    cache = cache_for("nvfp4")
    k, v = kv(4, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    out_k, out_v = cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert out_k.dtype == out_v.dtype == torch.bfloat16 and out_k.shape == (B, H, 5, D)


# ---------------------------------------------------------------- fast path
@pytest.mark.parametrize("fmt,policy", [("nvfp4", "dynamic"), ("nvfp4", "prefill"), ("int4", "prefill"),
                                        ("fp8_e4m3", "dynamic")])
def test_fast_path_reads_are_identical_and_its_memory_is_reported(fmt, policy):
    k, v = kv(70)
    outs = []
    caches = []
    for fast in (False, True):
        cache = cache_for(fmt, scale_policy=policy, dequant_cache=fast, residual_length=3, sink_tokens=1,
                          k_options={"group_size": 8} if fmt == "int4" else {})
        got = [cache.update(k[:, :, :30], v[:, :, :30], 0)]
        got += [cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0) for i in range(30, 70)]
        outs.append(got)
        caches.append(cache)
    for (a_k, a_v), (b_k, b_v) in zip(*outs):
        assert torch.equal(a_k, b_k) and torch.equal(a_v, b_v)
    slow, fast = caches
    assert slow.nbytes() == fast.nbytes() and slow.fastpath_nbytes() == 0
    packed = layer0(fast).k_stream.n_packed + layer0(fast).v_stream.n_packed
    assert fast.fastpath_nbytes() == B * H * D * 4 * packed
    assert fast.memory_report()[0]["fastpath_bytes"] == fast.fastpath_nbytes()


# ---------------------------------------------------------------- editing
def test_crop_removes_the_newest_tokens_exactly():
    k, v = kv(30)
    cache = cache_for("nvfp4", residual_length=4, sink_tokens=2)
    cache.update(k, v, 0)
    full = layer0(cache).k_stream.read(torch.float32)
    assert cache.is_croppable
    for remove, keep in ((3, 27), (10, 17), (16, 1)):
        cache.crop(-remove)
        assert cache.get_seq_length() == keep
        assert torch.equal(layer0(cache).k_stream.read(torch.float32), full[:, :, :keep])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(5)


def test_crop_then_append_matches_never_having_written_the_cropped_tokens():
    k, v = kv(20)
    a = cache_for("nvfp4", scale_policy="static", static_scales={0: (0.01, 0.01)})
    a.update(k[:, :, :15], v[:, :, :15], 0)
    a.crop(-5)
    a.update(k[:, :, 10:], v[:, :, 10:], 0)
    b = cache_for("nvfp4", scale_policy="static", static_scales={0: (0.01, 0.01)})
    b.update(k, v, 0)
    for name in ("codes", "scales"):
        assert torch.equal(layer0(a).k_stream.parts[name], layer0(b).k_stream.parts[name])


def test_crop_inside_a_kivi_group_keeps_the_survivors_as_read_before():
    k, v = kv(32)
    cache = cache_for("int4", k_options={"group_size": 16})
    cache.update(k, v, 0)
    assert not cache.is_croppable  # a cut inside a group cannot be undone exactly
    before = layer0(cache).k_stream.read(torch.float32)
    cache.crop(-10)  # 22 tokens: one whole key group + 6 survivors of the second
    stream = layer0(cache).k_stream
    assert (stream.n_packed, stream.n_pending) == (16, 6)
    assert torch.equal(stream.read(torch.float32), before[:, :, :22])
    assert cache.get_seq_length() == 22


def test_reorder_repeat_and_select_act_on_packed_storage():
    k, v = kv(20, b=3)
    cache = cache_for("nvfp4", residual_length=5, sink_tokens=1, scale_policy="dynamic")
    cache.update(k, v, 0)
    layer = layer0(cache)
    base_k = layer.k_stream.read(torch.float32)
    codes = layer.k_stream.parts["codes"].clone()
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    assert torch.equal(layer.k_stream.parts["codes"], codes[beam_idx])
    assert torch.equal(layer.k_stream.read(torch.float32), base_k[beam_idx])
    cache.batch_repeat_interleave(2)
    assert layer.k_stream.read(torch.float32).shape[0] == 6
    assert torch.equal(layer.k_stream.read(torch.float32), base_k[beam_idx].repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(layer.k_stream.read(torch.float32), base_k[torch.tensor([2, 0])])
    # the next write still lands after everything, for the selected rows only
    out_k, _ = cache.update(*kv(1, b=2, seed=9), 0)
    assert out_k.shape == (2, H, 21, D)


def test_reset_forgets_everything():
    cache = cache_for("nvfp4")
    cache.update(*kv(5), 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


# ---------------------------------------------------------------- bad numerics
@pytest.mark.parametrize("which", ["K", "V"])
def test_nonfinite_input_names_layer_and_tensor(which):
    cache = cache_for("nvfp4")
    k, v = kv(4)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    bad_k, bad_v = kv(2)
    (bad_k if which == "K" else bad_v)[1, 0, 1, 3] = float("nan")
    with pytest.raises(NonFiniteKVError, match=rf"Layer 1 {which} .*batch 1, kv head 0, token 5.*nonfinite='map'"):
        cache.update(bad_k, bad_v, 1)


def test_nonfinite_map_stores_the_mapping():
    cache = cache_for("nvfp4", nonfinite="map")
    k, v = kv(4)
    k[0, 0, 0, 0] = float("inf")
    k[0, 0, 1, 0] = float("nan")
    cache.update(k, v, 0)
    back = layer0(cache).k_stream.read(torch.float32)
    assert torch.isfinite(back).all() and back[0, 0, 1, 0] == 0


def test_append_tokens_equals_cat_and_never_changes_earlier_views() -> None:
    from nvfp4kv.cache.parts import append_tokens

    g = torch.Generator().manual_seed(5)
    buffers: dict[str, torch.Tensor] = {}
    stored, expected, views = None, None, []
    for t in (7, 1, 1, 3, 1, 1, 1, 9, 1):
        new = torch.randn(2, 3, t, 4, generator=g)
        stored = append_tokens(buffers, "x", stored, new)
        expected = new.clone() if expected is None else torch.cat([expected, new], dim=2)
        assert torch.equal(stored, expected)
        views.append((stored, expected.clone()))
    for view, value in views:  # later appends wrote only past each view's end
        assert torch.equal(view, value)
    # a tensor that is not a prefix view of the buffer (a crop's clone, a restore) gets a new buffer
    cropped = stored[:, :, :5].clone()
    again = append_tokens(buffers, "x", cropped, torch.ones(2, 3, 1, 4))
    assert again.data_ptr() != stored.data_ptr()
    assert torch.equal(again, torch.cat([cropped, torch.ones(2, 3, 1, 4)], dim=2))
    assert torch.equal(views[-1][0], views[-1][1])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
@pytest.mark.parametrize("dequant_cache", [False, True])
def test_decode_steps_append_in_place_without_recopying_history(fmt: str, dequant_cache: bool) -> None:
    """Per-step cost does not grow with context: single-token steps write into spare capacity
    (a new buffer only O(log T) times) and store exactly what one-shot concatenation stores."""
    cfg = KVCacheConfig(k_format=fmt, v_format=fmt, dequant_cache=dequant_cache)
    cache = QuantizedKVCache(cfg)
    k, v = kv(40, seed=9)
    cache.update(k[:, :, :8], v[:, :, :8], 0)
    layer = cache.layers[0]
    buffers = set()
    for i in range(8, 40):
        cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0)
        buffers.add(next(iter(layer.k_stream.parts.values())).data_ptr())
    assert len(buffers) <= 3  # 8 -> 16 -> 32 -> 64 tokens
    reference = QuantizedKVCache(cfg)
    reference.update(k[:, :, :8], v[:, :, :8], 0)
    fmt_obj = layer.k_stream.fmt
    scale = reference.layers[0].k_stream.scale
    expected = fmt_obj.quantize(k, scale)
    for name, part in layer.k_stream.parts.items():
        assert torch.equal(part, expected[name])
    keys, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert torch.equal(keys[:, :, :40], fmt_obj.dequantize(expected, scale, torch.float32))


def test_reserved_capacity_of_growth_buffers_is_reported_not_hidden():
    """Appends double buffer capacity; memory_report must show that capacity (reserved_bytes)
    separately from what the format stores (k/v_bytes), and it must be exactly allocated - used."""
    from nvfp4kv.cache import KVCacheConfig, make_cache
    from nvfp4kv.testing import tiny_llama

    model = tiny_llama()
    cache = make_cache(model, KVCacheConfig(k_format="nvfp4", v_format="nvfp4", dequant_cache=False))
    ids = torch.arange(1, 17).unsqueeze(0)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                   **{cache_kwarg_name(model): cache})
    stream = cache.layers[0].k_stream
    allocated = sum(b.numel() * b.element_size() for b in stream._buffers.values())
    used = sum(t.numel() * t.element_size() for t in stream.parts.values())
    if stream.scale_record is not None:
        used += stream.scale_record.numel() * stream.scale_record.element_size()
    assert stream.reserved_nbytes() == allocated - used
    assert stream.reserved_nbytes() > 0  # 16 prompt tokens, then one-token appends: capacity was doubled
    assert cache.reserved_nbytes() == sum(row["reserved_bytes"] for row in cache.memory_report()) > 0


PAIR_CASES = [
    dict(fmt="nvfp4"),
    dict(fmt="nvfp4", dequant_cache=True),
    dict(fmt="nvfp4", dequant_cache=True, sink_tokens=3),
    dict(fmt="nvfp4", dequant_cache=True, sink_tokens=3, residual_length=4),  # never paired: a window
    dict(fmt="nvfp4", scale_policy="unit"),
    dict(fmt="nvfp4", dequant_cache=True, scale_policy="dynamic"),  # never paired: per-write scales
    dict(fmt="fp8_e4m3"),
    dict(fmt="fp8_e4m3", dequant_cache=True, k_options={"scaling": "head"}, v_options={"scaling": "head"}),
    dict(fmt="fp8_e4m3", dequant_cache=True, k_options={"scaling": "token"}, v_options={"scaling": "token"}),
    dict(fmt="mxfp4", dequant_cache=True, read_mode="quantized"),
    dict(fmt="fp4_mx_block16"),
    dict(fmt="bf16", dequant_cache=True),
    dict(fmt="nvfp4", v_fmt="fp8_e4m3", dequant_cache=True),  # different formats: never paired
    dict(fmt="int4", dequant_cache=True, residual_length=2),  # not rowwise: never paired
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("padded", [False, True])
def test_paired_k_v_encoding_stores_and_reads_the_same_bits(case: dict, padded: bool, monkeypatch) -> None:
    """Decode steps encode K and V as one stacked tensor (stream.append_pair) where the format is
    rowwise; the parts, scales, fast-path copies and every read are bit-identical to encoding
    each stream on its own (append_pair disabled)."""
    import nvfp4kv.cache.layer as layer_mod

    case = dict(case)
    fmt, v_fmt = case.pop("fmt"), case.pop("v_fmt", None)
    k, v = kv(30, seed=13)
    caches, reads, paired = [], [], []
    for allow in (True, False):
        real_pair = layer_mod.append_pair
        calls = []

        def spy(*args, _real=real_pair, _calls=calls, _allow=allow):
            done = _allow and _real(*args)
            _calls.append(done)
            return done

        monkeypatch.setattr(layer_mod, "append_pair", spy)
        cache = cache_for(fmt, v_fmt, **case)
        if padded:
            cache.set_padding([3, 0])
        out = [cache.update(k[:, :, :9], v[:, :, :9], 0)]
        for i in range(9, 30):
            out.append(cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0))
        caches.append(cache)
        reads.append(out)
        paired.append(any(calls))
    assert not paired[1]
    expect_paired = (case.get("scale_policy") != "dynamic" and v_fmt is None and fmt != "int4"
                     and not case.get("residual_length") and not (padded and case.get("sink_tokens")))
    assert paired[0] == expect_paired
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731 (bit-level: -0.0, NaN payloads)
    for a, b in zip(reads[0], reads[1]):
        for ta, tb in zip(a, b):
            assert torch.equal(bits(ta), bits(tb))
    la, lb = layer0(caches[0]), layer0(caches[1])
    for sa, sb in ((la.k_stream, lb.k_stream), (la.v_stream, lb.v_stream)):
        assert sa.n_tokens == sb.n_tokens and sa.n_packed == sb.n_packed
        if sa.row_by_row:
            continue
        assert (sa.parts is None) == (sb.parts is None)
        for name in sa.parts or {}:
            assert torch.equal(sa.parts[name], sb.parts[name])
        for attr in ("dequantized", "sink", "pending", "scale", "scale_record"):
            ta, tb = getattr(sa, attr), getattr(sb, attr)
            assert (ta is None) == (tb is None), attr
            if ta is not None:
                assert torch.equal(bits(ta), bits(tb)), attr
        assert sa.nbytes() == sb.nbytes()


@pytest.mark.parametrize("case", [
    dict(fmt="nvfp4", dequant_cache=True),
    dict(fmt="nvfp4"),
    dict(fmt="fp8_e4m3", dequant_cache=True),
    dict(fmt="fp8_e4m3", dequant_cache=True, k_options={"scaling": "head"}, v_options={"scaling": "head"}),
    dict(fmt="nvfp4", dequant_cache=True, nonfinite="map"),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_use_the_format_step_encoder_with_the_same_bits(case: dict, dtype: torch.dtype, monkeypatch) -> None:
    """A decode step of the common configuration stacks K and V once in the layer, checks the
    stack for NaN/Inf once, and encodes it with the format's step encoder (KVFormat.step_encoder);
    every read, part and fast-path copy is bit-identical to the pair encoded by the format's own
    quantize/dequantize (append_pair without the stack)."""
    import nvfp4kv.cache.layer as layer_mod

    case = dict(case)
    fmt = case.pop("fmt")
    k, v = kv(20, seed=21, dtype=dtype)
    runs = []
    real_pair = layer_mod.append_pair
    for fast in (True, False):
        used: list[bool] = []

        def pair(ks, vs, kk, vv, stacked=None, _real=real_pair, _fast=fast, _used=used):
            _used.append(stacked is not None)
            return _real(ks, vs, kk, vv, stacked if _fast else None)

        monkeypatch.setattr(layer_mod, "append_pair", pair)
        cache = cache_for(fmt, **case)
        out = [cache.update(k[:, :, :8], v[:, :, :8], 0)]
        out += [cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0) for i in range(8, 20)]
        runs.append((cache, out, used))
    (fast_cache, fast_out, used), (ref_cache, ref_out, _) = runs
    assert used[0] is False and all(used[1:])  # the prefill is not paired; every decode step is
    assert layer0(fast_cache).k_stream._pair_cache[3] is not None  # a step encoder was built
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    for a, b in zip(fast_out, ref_out):
        for ta, tb in zip(a, b):
            assert torch.equal(bits(ta), bits(tb))
    for sa, sb in ((layer0(fast_cache).k_stream, layer0(ref_cache).k_stream),
                   (layer0(fast_cache).v_stream, layer0(ref_cache).v_stream)):
        for name in sb.parts:
            assert torch.equal(sa.parts[name], sb.parts[name])
        assert (sa.dequantized is None) == (sb.dequantized is None)
        if sb.dequantized is not None:
            assert torch.equal(bits(sa.dequantized), bits(sb.dequantized))


@pytest.mark.parametrize("which", ["K", "V"])
def test_nan_in_a_paired_decode_step_raises_naming_k_or_v_and_changes_nothing(which: str) -> None:
    """The one NaN/Inf check of the stacked K/V still names which of K or V holds it, and the
    position, and the layer stays as it was."""
    cache = cache_for("nvfp4", dequant_cache=True)
    k, v = kv(12, seed=2)
    cache.update(k[:, :, :10], v[:, :, :10], 0)
    before = layer0(cache).k_stream.n_tokens, layer0(cache).v_stream.dequantized
    nk, nv = k[:, :, 10:11].clone(), v[:, :, 10:11].clone()
    (nk if which == "K" else nv)[1, 0, 0, 3] = float("nan")
    with pytest.raises(NonFiniteKVError, match=f"Layer 0 {which} holds NaN/Inf \\(first at batch 1, kv head 0, token 10\\)"):
        cache.update(nk, nv, 0)
    assert (layer0(cache).k_stream.n_tokens, layer0(cache).v_stream.dequantized) == before
    k_out, _ = cache.update(k[:, :, 10:11], v[:, :, 10:11], 0)
    assert k_out.shape[2] == 11
