"""Fused packed-KV decode attention vs dequantize + SDPA, and its transformers hook.

The reference dequantizes K/V with the format references (to the query dtype, as a cache
does), concatenates the raw extra tokens at their logical positions, and runs SDPA in FP32
with GQA and the same mask. The kernel must agree within ``DECODE_ATOL[dtype]`` (summation
order, softmax weights rounded to the query dtype before ``P @ V``); it is not bit-exact.
"""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch
import torch.nn.functional as F

from nvfp4kv.errors import BackendUnavailableError
from nvfp4kv.formats import get_format
from nvfp4kv.kernels.attention_interface import (
    PACKED_KV_KWARG,
    PackedKVHandoff,
    PackedKVView,
    make_standins,
    nvfp4kv_decode_attention,
    packed_operand,
    publish,
    register_attention,
)
from nvfp4kv.kernels.decode_attention import DECODE_ATOL, decode_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pack(fmt_name: str, x: torch.Tensor, **options: object):
    fmt = get_format(fmt_name, **options)
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    return fmt, fmt.quantize(x, gs), gs


def _reference(q, k_fmt, k_parts, k_gs, v_fmt, v_parts, v_gs, raw_k, raw_v, raw_pos, packed_start, mask_bool, scale):
    """SDPA in FP32 over dequantized (to q.dtype) K/V laid out by logical position."""
    kd = k_fmt.dequantize(k_parts, k_gs, q.dtype).float()
    vd = v_fmt.dequantize(v_parts, v_gs, q.dtype).float()
    tp = kd.shape[2]
    e = 0 if raw_k is None else raw_k.shape[2]
    total = max(packed_start + tp, int(raw_pos.max()) + 1 if e else 0)
    b, h, _, d = kd.shape
    keys = torch.zeros(b, h, total, d)
    vals = torch.zeros(b, h, total, d)
    present = torch.zeros(total, dtype=torch.bool)
    keys[:, :, packed_start : packed_start + tp] = kd
    vals[:, :, packed_start : packed_start + tp] = vd
    present[packed_start : packed_start + tp] = True
    if e:
        keys[:, :, raw_pos] = raw_k.float()
        vals[:, :, raw_pos] = raw_v.float()
        present[raw_pos] = True
    allowed = present[None, None, None, :].expand(b, 1, 1, total).clone()
    if mask_bool is not None:
        allowed &= mask_bool[..., :total]
    return F.scaled_dot_product_attention(q.float(), keys, vals, attn_mask=allowed, scale=scale, enable_gqa=True)


CASES = [
    # (k format, v format, head_dim, q heads, kv heads)
    ("nvfp4", "nvfp4", 32, 4, 2),
    ("nvfp4", "nvfp4", 96, 3, 1),  # head_dim not a power of two, GQA group 3
    ("fp8_e4m3", "fp8_e4m3", 64, 4, 4),
    ("fp4_mx_block16", "fp4_mx_block16", 32, 8, 2),
    ("mxfp4", "mxfp4", 64, 2, 2),
    ("nvfp4", "fp8_e4m3", 32, 4, 1),  # mixed K/V formats
]


@pytest.mark.parametrize(("k_name", "v_name", "d", "hq", "hkv"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_matches_dequant_sdpa(k_name: str, v_name: str, d: int, hq: int, hkv: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(f"{k_name}/{v_name}/{d}/{dtype}".encode()))
    b, tp, e = 2, 37, 3
    k = torch.randn(b, hkv, tp, d, generator=g) * 2
    v = torch.randn(b, hkv, tp, d, generator=g)
    k_fmt, k_parts, k_gs = _pack(k_name, k)
    v_fmt, v_parts, v_gs = _pack(v_name, v)
    q = torch.randn(b, hq, 1, d, generator=g).to(dtype)
    # raw tokens: two sinks in front (positions 0, 1), one residual token at the end
    raw_k = torch.randn(b, hkv, e, d, generator=g).to(dtype)
    raw_v = torch.randn(b, hkv, e, d, generator=g).to(dtype)
    packed_start = 2
    raw_pos = torch.tensor([0, 1, packed_start + tp])
    mask = torch.ones(b, 1, 1, packed_start + tp + 1, dtype=torch.bool)
    mask[1, ..., :9] = False  # left padding of the second sequence
    out = decode_attention(
        q.to(DEVICE),
        packed_operand(k_fmt, {n: t.to(DEVICE) for n, t in k_parts.items()}, None if k_gs is None else k_gs.to(DEVICE)),
        packed_operand(v_fmt, {n: t.to(DEVICE) for n, t in v_parts.items()}, None if v_gs is None else v_gs.to(DEVICE)),
        scale=d**-0.5, packed_start=packed_start, raw_k=raw_k.to(DEVICE), raw_v=raw_v.to(DEVICE),
        raw_positions=raw_pos.to(DEVICE), attn_mask=mask.to(DEVICE), num_splits=3,
    )
    ref = _reference(q, k_fmt, k_parts, k_gs, v_fmt, v_parts, v_gs, raw_k, raw_v, raw_pos, packed_start, mask, d**-0.5)
    assert out.dtype == dtype and out.shape == (b, hq, 1, d)
    torch.testing.assert_close(out.float().cpu(), ref, atol=DECODE_ATOL[dtype], rtol=0)


# finfo.min * log2(e) overflows to -inf inside the kernel, which is what masking wants
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_decode_masks_additive_kv_start_per_head_scale_and_token_scales() -> None:
    g = torch.Generator().manual_seed(11)
    b, hkv, hq, tp, d = 3, 2, 4, 50, 32
    k = torch.randn(b, hkv, tp, d, generator=g)
    v = torch.randn(b, hkv, tp, d, generator=g)
    k_fmt = get_format("nvfp4")
    k_gs = k.abs().amax(dim=(0, 2, 3), keepdim=True) / (6 * 448)  # per-head global scale
    k_parts = k_fmt.quantize(k, k_gs)
    v_fmt = get_format("fp8_e4m3", scaling="token")
    v_parts = v_fmt.quantize(v)
    q = torch.randn(b, hq, 1, d, generator=g, dtype=torch.float32)
    start = torch.tensor([0, 5, 49])
    allowed = torch.arange(tp)[None, :] >= start[:, None]
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    ref = _reference(q, k_fmt, k_parts, k_gs, v_fmt, v_parts, None, None, None, None, 0, allowed[:, None, None, :], None)
    kop = packed_operand(k_fmt, {n: t.to(DEVICE) for n, t in k_parts.items()}, k_gs.to(DEVICE))
    vop = packed_operand(v_fmt, {n: t.to(DEVICE) for n, t in v_parts.items()}, None)
    by_mask = decode_attention(q.to(DEVICE), kop, vop, attn_mask=additive.to(DEVICE), num_splits=2)
    by_start = decode_attention(q.to(DEVICE), kop, vop, kv_start=start.to(DEVICE))
    for out in (by_mask, by_start):
        torch.testing.assert_close(out.cpu(), ref, atol=DECODE_ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_tuning_knobs_change_nothing_beyond_tolerance(prefetch: bool) -> None:
    g = torch.Generator().manual_seed(13)
    k_fmt, k_parts, k_gs = _pack("nvfp4", torch.randn(1, 2, 70, 64, generator=g))
    v_fmt, v_parts, v_gs = _pack("fp8_e4m3", torch.randn(1, 2, 70, 64, generator=g))
    q = torch.randn(1, 4, 1, 64, generator=g, dtype=torch.float32)
    ref = _reference(q, k_fmt, k_parts, k_gs, v_fmt, v_parts, v_gs, None, None, None, 0, None, None)
    kop = packed_operand(k_fmt, {n: t.to(DEVICE) for n, t in k_parts.items()}, k_gs.to(DEVICE))
    vop = packed_operand(v_fmt, {n: t.to(DEVICE) for n, t in v_parts.items()}, v_gs.to(DEVICE))
    for block_n, splits in ((16, 1), (32, 3), (64, 2)):
        out = decode_attention(q.to(DEVICE), kop, vop, block_n=block_n, num_splits=splits, prefetch=prefetch)
        torch.testing.assert_close(out.cpu(), ref, atol=DECODE_ATOL[torch.float32], rtol=0)


def test_decode_fully_masked_row_is_zero_and_empty_packed_part_works() -> None:
    g = torch.Generator().manual_seed(12)
    fmt, parts, gs = _pack("nvfp4", torch.randn(1, 1, 16, 32, generator=g))
    q = torch.randn(1, 2, 1, 32, generator=g)
    mask = torch.zeros(1, 1, 1, 16, dtype=torch.bool)
    op = packed_operand(fmt, {n: t.to(DEVICE) for n, t in parts.items()}, gs.to(DEVICE))
    out = decode_attention(q.to(DEVICE), op, op, attn_mask=mask.to(DEVICE))
    assert torch.equal(out.cpu(), torch.zeros_like(q))
    # no packed tokens at all: only raw tokens
    empty = {n: t[:, :, :0].to(DEVICE) for n, t in parts.items()}
    raw = torch.randn(1, 1, 5, 32, generator=g)
    out = decode_attention(q.to(DEVICE), packed_operand(fmt, empty, gs.to(DEVICE)), packed_operand(fmt, empty, gs.to(DEVICE)),
                           raw_k=raw.to(DEVICE), raw_v=raw.to(DEVICE))
    ref = F.scaled_dot_product_attention(q, raw, raw, enable_gqa=True)
    torch.testing.assert_close(out.cpu(), ref, atol=DECODE_ATOL[torch.float32], rtol=0)


def test_decode_rejects_bad_shapes() -> None:
    fmt, parts, gs = _pack("nvfp4", torch.randn(1, 2, 8, 32))
    op = packed_operand(fmt, {n: t.to(DEVICE) for n, t in parts.items()}, gs.to(DEVICE))
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(torch.randn(1, 4, 2, 32, device=DEVICE), op, op)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 1, 32, device=DEVICE), op, op)
    assert packed_operand(get_format("bf16"), {"values": torch.zeros(1)}, None) is None


# ---------------------------------------------------------------------------------------------
# transformers integration
# ---------------------------------------------------------------------------------------------


class _PackedLayerForTest:
    """A minimal packed cache layer for the hook (the real one lives in nvfp4kv.cache)."""

    def __new__(cls, fmt_name: str, sinks: int):
        from transformers.cache_utils import DynamicLayer

        fmt = get_format(fmt_name)

        class Layer(DynamicLayer):
            def update(self, k, v, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(k, v)
                    self.gk, self.gv = fmt.global_scale(k), fmt.global_scale(v)
                    self.rk, self.rv = k[:, :, :sinks], v[:, :, :sinks]
                    self.kp, self.vp = fmt.quantize(k[:, :, sinks:], self.gk), fmt.quantize(v[:, :, sinks:], self.gv)
                else:
                    kp, vp = fmt.quantize(k, self.gk), fmt.quantize(v, self.gv)
                    self.kp = {n: torch.cat([self.kp[n], kp[n]], 2) for n in kp}
                    self.vp = {n: torch.cat([self.vp[n], vp[n]], 2) for n in vp}
                self.keys = torch.cat([self.rk, fmt.dequantize(self.kp, self.gk, k.dtype)], 2)
                self.values = torch.cat([self.rv, fmt.dequantize(self.vp, self.gv, v.dtype)], 2)
                view = PackedKVView(fmt, fmt, self.kp, self.vp, self.gk, self.gv, packed_start=sinks,
                                    raw_k=self.rk, raw_v=self.rv, raw_positions=torch.arange(sinks, device=k.device))
                publish(kwargs, PackedKVHandoff(view))  # the one channel: the forwarded attention kwargs
                return self.keys, self.values

        return Layer()


def _packed_cache(n_layers: int, fmt_name: str = "nvfp4", sinks: int = 2):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_PackedLayerForTest(fmt_name, sinks) for _ in range(n_layers)]
    cache.layer_class_to_replicate = None
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_implementation_runs_fused_decode_and_matches_sdpa(monkeypatch, dtype: torch.dtype) -> None:
    """A cache publishing a handoff in the forwarded attention kwargs reaches the kernel."""
    import nvfp4kv.kernels.attention_interface as ai
    from nvfp4kv.testing import tiny_llama
    from transformers.models.llama import modeling_llama

    if "kwargs=kwargs" not in inspect.getsource(modeling_llama.LlamaAttention.forward):
        pytest.skip("this transformers version does not forward the attention kwargs to cache.update "
                    "(no channel: nvfp4kv_decode runs SDPA on real K/V there)")
    name = register_attention()
    calls = {"fused": 0}
    real = ai.decode_attention

    def counting(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ai, "decode_attention", counting)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding
    scores = {}
    # transformers renamed generate's past_key_values to cache in 5.x; support both
    cache_kw = "cache" if "cache" in inspect.signature(tiny_llama().forward).parameters else "past_key_values"
    for impl in ("sdpa", name):
        model = tiny_llama(dtype=dtype).to(DEVICE)
        model.set_attn_implementation(impl)
        out = model.generate(
            ids.to(DEVICE), attention_mask=attn.to(DEVICE), max_new_tokens=4, do_sample=False,
            **{cache_kw: _packed_cache(model.config.num_hidden_layers)}, output_scores=True,
            return_dict_in_generate=True, pad_token_id=0,
        )
        scores[impl] = torch.stack(out.scores).float().cpu()
    assert calls["fused"] == 3 * 2, "every decode step of every layer must take the fused path"
    torch.testing.assert_close(scores[name], scores["sdpa"], atol=0.05 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_attention_fn_falls_back_to_sdpa_for_prefill_and_refuses_standins() -> None:
    fmt, parts, gs = _pack("nvfp4", torch.randn(1, 2, 6, 32))
    view = PackedKVView(fmt, fmt, parts, parts, gs, gs)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q = torch.randn(1, 4, 3, 32)
    k = fmt.dequantize(parts, gs, torch.float32)
    out, _ = nvfp4kv_decode_attention(module, q, k, k, None, scaling=32**-0.5,
                                      **{PACKED_KV_KWARG: PackedKVHandoff(view)})
    ref = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    k_stand, v_stand = make_standins(view, k, 6)
    assert k_stand.untyped_storage().nbytes() <= 4  # placeholders cost no memory
    with pytest.raises(BackendUnavailableError, match="stand-in"):
        nvfp4kv_decode_attention(module, q, k_stand, v_stand, None,
                                 **{PACKED_KV_KWARG: PackedKVHandoff(view, standins=True)})


def test_handoff_is_accepted_only_when_the_kernel_could_run(monkeypatch) -> None:
    """The attention function accepts (renews) the handoff for calls it could fuse; the
    accept callback is the only way the cache learns who reads it (no module/tensor state)."""
    import nvfp4kv.kernels.attention_interface as ai

    fmt, parts, gs = _pack("nvfp4", torch.randn(1, 2, 6, 32))
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    k = fmt.dequantize(parts, gs, torch.float32)
    accepted: list[bool] = []
    handoff = PackedKVHandoff(None, on_accept=lambda: accepted.append(True))
    nvfp4kv_decode_attention(module, torch.randn(1, 4, 3, 32), k, k, None, **{PACKED_KV_KWARG: handoff})
    assert accepted == [True]  # prefill: SDPA now, but its next decode step could fuse
    monkeypatch.setattr(ai, "call_blocker", lambda *a, **kw: "test: cannot run")
    nvfp4kv_decode_attention(module, torch.randn(1, 4, 3, 32), k, k, None, **{PACKED_KV_KWARG: handoff})
    assert accepted == [True]  # not renewed by a call that could not have fused
    with pytest.raises(ValueError, match="stand-in"):
        PackedKVHandoff(None, standins=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_saturates_kv_like_the_reference_dequantize(dtype: torch.dtype) -> None:
    """K/V decoding past the query dtype's range (block-16 FP4: 57984 -> code 4 at 2^14 =
    65536) saturate at its largest finite value, as ``dequantize(..., dtype)`` does, instead of
    turning the whole row's attention into NaN."""
    g = torch.Generator().manual_seed(21)
    b, hkv, hq, tp, d = 1, 1, 2, 20, 32
    k = torch.randn(b, hkv, tp, d, generator=g)
    k[0, 0, 3, :16] = 57984.0 if dtype == torch.float16 else 3.3e38
    v = torch.randn(b, hkv, tp, d, generator=g)
    k_fmt, k_parts, k_gs = _pack("fp4_mx_block16", k)
    v_fmt, v_parts, v_gs = _pack("fp4_mx_block16", v)
    assert not torch.isfinite(k_fmt.dequantize(k_parts, None, torch.float32).to(dtype)).all()  # a plain cast: Inf
    q = (torch.randn(b, hq, 1, d, generator=g) * 1e-6).to(dtype)  # keeps q.k finite in the query dtype
    ref = _reference(q, k_fmt, k_parts, k_gs, v_fmt, v_parts, v_gs, None, None, None, 0, None, None)
    out = decode_attention(q.to(DEVICE), packed_operand(k_fmt, {n: t.to(DEVICE) for n, t in k_parts.items()}, None),
                           packed_operand(v_fmt, {n: t.to(DEVICE) for n, t in v_parts.items()}, None))
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out.float().cpu(), ref, atol=DECODE_ATOL[dtype], rtol=0)
