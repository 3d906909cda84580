"""nvfp4kv's own cache feeding the fused decode kernel (``attn_implementation="nvfp4kv_decode"``).

Greedy generation through the fused path must give the tokens (and, within the kernel's
tolerance, the scores) of the SDPA path over the same cache config, the kernel must really run
on every decode step of every layer, and once the attention function has accepted a layer's
handoff the layer must stop dequantizing its history (it hands over stand-ins plus the packed
view, through the one channel: the attention kwargs).
"""

from __future__ import annotations

import pytest
import torch

import nvfp4kv.kernels.attention_interface as ai
from nvfp4kv.cache import KVCacheConfig, PackedKVLayer, cache_kwarg_name, make_cache
from nvfp4kv.formats import get_format
from nvfp4kv.testing import tiny_llama

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEW_TOKENS = 4


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    return ids, attn


def _generate(impl: str, config: KVCacheConfig, dtype: torch.dtype, monkeypatch) -> dict:
    """Greedy generation; counts fused kernel calls and the cache's dequantize calls."""
    counts = {"fused": 0, "dequantize": 0}
    real_kernel = ai.decode_attention

    def counting_kernel(*args, **kwargs):
        counts["fused"] += 1
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(ai, "decode_attention", counting_kernel)
    model = tiny_llama(dtype=dtype).to(DEVICE)
    model.set_attn_implementation(impl)
    cache = make_cache(model, config)
    real_dequantize = cache.codec.dequantize

    def counting_dequantize(*args, **kwargs):
        counts["dequantize"] += 1
        return real_dequantize(*args, **kwargs)

    cache.codec.dequantize = counting_dequantize  # every stream shares the cache's codec
    ids, attn = _prompt()
    out = model.generate(ids.to(DEVICE), attention_mask=attn.to(DEVICE), max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         **{cache_kwarg_name(model): cache})
    monkeypatch.setattr(ai, "decode_attention", real_kernel)
    return {"tokens": out.sequences.cpu(), "scores": torch.stack(out.scores).float().cpu(),
            "layers": model.config.num_hidden_layers, **counts}


CONFIGS = [
    pytest.param(dict(k_format="nvfp4", v_format="nvfp4"), torch.float32, id="nvfp4"),
    pytest.param(dict(k_format="nvfp4", v_format="nvfp4", sink_tokens=2, residual_length=3), torch.float32,
                 id="nvfp4-sink-residual"),
    pytest.param(dict(k_format="fp8_e4m3", v_format="fp8_e4m3", residual_length=2), torch.float32, id="fp8"),
    pytest.param(dict(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="dynamic", sink_tokens=1),
                 torch.bfloat16, id="fp8-nvfp4-dynamic-bf16"),
]


@pytest.mark.parametrize(("options", "dtype"), CONFIGS)
def test_fused_generation_matches_sdpa_and_skips_dequantization(monkeypatch, options: dict, dtype: torch.dtype) -> None:
    name = ai.register_attention()
    config = KVCacheConfig(**options)
    ref = _generate("sdpa", config, dtype, monkeypatch)
    got = _generate(name, config, dtype, monkeypatch)
    decode_steps = NEW_TOKENS - 1
    assert ref["fused"] == 0 and ref["dequantize"] > 0  # SDPA reads dequantized K/V
    assert got["fused"] == decode_steps * got["layers"], "every decode step of every layer must run the kernel"
    assert got["dequantize"] == 0, "the fused path must read packed bytes, not dequantize the history"
    assert torch.equal(got["tokens"], ref["tokens"])
    atol = 0.05 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(got["scores"], ref["scores"], atol=atol, rtol=0)


@pytest.mark.parametrize("options", [dict(k_format="int4", v_format="int4"),
                                     dict(k_format="nvfp4", v_format="nvfp4", read_mode="raw_fresh")],
                         ids=["kivi-token-groups", "raw_fresh"])
def test_cases_without_a_fused_kernel_fall_back_to_real_kv(monkeypatch, options: dict) -> None:
    name = ai.register_attention()
    config = KVCacheConfig(**options)
    ref = _generate("sdpa", config, torch.float32, monkeypatch)
    got = _generate(name, config, torch.float32, monkeypatch)
    assert got["fused"] == 0 and got["dequantize"] == ref["dequantize"] > 0
    assert torch.equal(got["tokens"], ref["tokens"])
    torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-5, rtol=0)


def _layer(**options) -> PackedKVLayer:
    return PackedKVLayer(get_format("nvfp4"), get_format("fp8_e4m3"), layer_idx=0, **options)


def test_packed_view_lays_out_sink_packed_and_pending_tokens() -> None:
    layer = _layer(sink_tokens=2, residual_length=3)
    k, v = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    layer.update(k, v)
    view = layer.packed_view()
    assert view is not None
    assert view.packed_start == 2 and view.num_packed == 4 and view.num_raw == 5
    assert view.raw_positions.tolist() == [0, 1, 6, 7, 8]
    assert torch.equal(view.raw_k, torch.cat([k[:, :, :2], k[:, :, 6:]], dim=2))
    assert view.k_parts is layer.k_stream.parts and view.v_parts is layer.v_stream.parts
    assert torch.equal(view.k_global_scale, layer.k_stream.read_scale(0, 4))
    all_pending = _layer(residual_length=16)
    all_pending.update(k, v)
    assert all_pending.packed_view() is None  # nothing packed yet


def test_layer_hands_over_standins_only_after_an_accept() -> None:
    layer = _layer()
    k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    layer.update(k, v)
    one_k, one_v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    forwarded: dict = {}
    k_out, _ = layer.update(one_k, one_v, kwargs=forwarded)
    handoff = forwarded[ai.PACKED_KV_KWARG]
    assert k_out.stride(2) != 0 and handoff.view is None and not handoff.standins  # not accepted: real K/V
    handoff.accept()  # what nvfp4kv_decode does when it can run the kernel
    forwarded = {}
    k_out, v_out = layer.update(one_k, one_v, kwargs=forwarded)
    assert k_out.shape == (1, 2, 7, 32) and k_out.stride(2) == 0 and v_out.stride(2) == 0
    handoff = forwarded[ai.PACKED_KV_KWARG]
    assert isinstance(handoff.view, ai.PackedKVView) and handoff.standins
    k_out, _ = layer.update(one_k, one_v, kwargs={})  # the acceptance is not renewed by itself
    assert k_out.stride(2) != 0 and k_out.shape[2] == 8
    layer.claim_fused_reader()
    k_out, _ = layer.update(one_k, one_v)  # no channel (no forwarded kwargs): never stand-ins
    assert k_out.stride(2) != 0 and k_out.shape[2] == 9
