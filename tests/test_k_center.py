"""``k_center``: keys stored minus each sequence's per-channel prompt mean (nvfp4kv.cache.k_center).

What must hold: attention computed from what the cache returns equals attention from the raw keys
(softmax ignores a shift common to all keys), so only rounding changes; on keys dominated by a
per-channel offset (Qwen2's key bias) the rounding error that reaches attention drops; the offset
is per sequence, set by the prompt, follows batch operations and is counted in memory; configs,
labels and old cells stay consistent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nvfp4kv.cache import KVCacheConfig, QuantizedKVCache
from nvfp4kv.cache.k_center import key_offset
from nvfp4kv.engines import apply_engine
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval.identity import cell_config

B, H, D = 2, 2, 32


def offset_keys(t: int, seed: int = 0, offset: float = 300.0, spread: float = 1.0) -> tuple[torch.Tensor, ...]:
    """K with a large per-channel offset (a few channels per head, as Qwen2's key bias makes), V, Q."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(1, H, 1, D)
    shift[..., :3] = offset * torch.tensor([1.0, -0.7, 0.4])
    k = torch.randn(B, H, t, D, generator=g) * spread + shift
    v = torch.randn(B, H, t, D, generator=g)
    q = torch.randn(B, H, t, D, generator=g) * 0.2
    return k, v, q


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=q.shape[2] > 1)


def prefill_then_decode(config: KVCacheConfig, k, v, q, prompt: int) -> list[torch.Tensor]:
    """Attention outputs over a prompt and one-token decode steps, reading what the cache returns."""
    cache = QuantizedKVCache(config)
    k_out, v_out = cache.update(k[:, :, :prompt], v[:, :, :prompt], 0)
    outs = [attention(q[:, :, :prompt], k_out, v_out)]
    for i in range(prompt, k.shape[2]):
        k_out, v_out = cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0)
        outs.append(attention(q[:, :, i : i + 1], k_out, v_out))
    return outs


def rel_err(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    a, b = torch.cat(ref, dim=2), torch.cat(got, dim=2)
    return float((a - b).norm() / a.norm())


def test_centering_does_not_change_attention_when_nothing_is_rounded():
    k, v, q = offset_keys(24)
    exact = [attention(q[:, :, :16], k[:, :, :16], v[:, :, :16])]
    exact += [attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1]) for i in range(16, 24)]
    got = prefill_then_decode(KVCacheConfig(k_format="bf16", v_format="bf16", k_center=True), k.double().float(), v, q, 16)
    # bf16 storage rounds the centered keys (spread ~1) far more finely than the raw ones (~300)
    plain = prefill_then_decode(KVCacheConfig(k_format="bf16", v_format="bf16"), k, v, q, 16)
    assert rel_err(exact, got) < 1e-2
    assert rel_err(exact, got) < rel_err(exact, plain)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4", "mxfp4"])
def test_centering_removes_most_of_the_error_an_offset_puts_into_attention(fmt):
    k, v, q = offset_keys(48)
    v = v.to(torch.bfloat16).float()  # stored exactly in BF16: only the keys' rounding is measured
    exact = [attention(q[:, :, :32], k[:, :, :32], v[:, :, :32])]
    exact += [attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1]) for i in range(32, 48)]
    plain = rel_err(exact, prefill_then_decode(KVCacheConfig(k_format=fmt, v_format="bf16"), k, v, q, 32))
    centered = rel_err(exact, prefill_then_decode(KVCacheConfig(k_format=fmt, v_format="bf16", k_center=True),
                                                  k, v, q, 32))
    assert centered < plain / 5, (fmt, plain, centered)


def test_the_offset_is_the_prompt_mean_and_decode_steps_reuse_it():
    k, v, _ = offset_keys(20)
    cache = QuantizedKVCache(KVCacheConfig(k_format="bf16", v_format="bf16", k_center=True))
    k_out, _ = cache.update(k[:, :, :12], v[:, :, :12], 0)
    layer = cache.layers[0]
    mean = k[:, :, :12].mean(dim=2, keepdim=True)
    torch.testing.assert_close(layer.k_offset, mean)
    # serving reads: the prompt attends to its own (centered) keys raw, decode steps to what is stored
    torch.testing.assert_close(k_out, k[:, :, :12] - mean, rtol=0, atol=0)
    for i in range(12, 20):
        k_out, v_out = cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], 0)
    torch.testing.assert_close(layer.k_offset, mean)
    assert torch.equal(v_out, v.to(torch.bfloat16).float()), "values are never centered"
    torch.testing.assert_close(k_out, (k - mean).to(torch.bfloat16).float(), rtol=0, atol=0)


def test_offset_ignores_left_pads_and_matches_the_row_alone():
    k, _, _ = offset_keys(10)
    padded = torch.cat([torch.full((1, H, 4, D), 1e4), k[:1, :, :6]], dim=2)
    batch = torch.cat([padded, k[1:]])
    got = key_offset(batch, (4, 0), 0)
    assert torch.equal(got[:1], key_offset(k[:1, :, :6].contiguous(), None, 0))
    assert torch.equal(got[1:], key_offset(k[1:].contiguous(), None, 0))


def test_offset_follows_batch_operations_reset_and_is_counted_in_memory():
    k, v, _ = offset_keys(16)
    config = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", k_center=True)
    cache = QuantizedKVCache(config)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    plain = QuantizedKVCache(KVCacheConfig(k_format="nvfp4", v_format="nvfp4"))
    plain.update(k, v, 0)
    assert layer.nbytes() - plain.layers[0].nbytes() == B * H * D * 4
    before = layer.k_offset.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.k_offset, before.flip(0))
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.k_offset, before[:1])
    cache.reset()
    assert layer.k_offset is None
    cache.update(k[:1, :, :8] + 5.0, v[:1, :, :8], 0)  # a new sequence gets a new offset
    torch.testing.assert_close(layer.k_offset, (k[:1, :, :8] + 5.0).mean(dim=2, keepdim=True))


def test_a_failed_update_leaves_the_offset_as_it_was():
    k, v, _ = offset_keys(8)
    cache = QuantizedKVCache(KVCacheConfig(k_format="nvfp4", v_format="nvfp4", k_center=True))
    bad = v.clone()
    bad[0, 0, 3, 0] = float("nan")
    with pytest.raises(Exception):
        cache.update(k, bad, 0)
    assert cache.layers[0].k_offset is None
    cache.update(k, v, 0)
    assert cache.layers[0].k_offset is not None


def test_config_label_roundtrip_validation_and_engine_note():
    config = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", k_center=True, scale_policy="dynamic")
    assert config.label == "nvfp4+dynamic+kcenter"
    assert KVCacheConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="k_center must be true or false"):
        KVCacheConfig(k_format="nvfp4", v_format="nvfp4", k_center="yes")
    _, notes = apply_engine("vllm_v1", {"k_format": "fp8_e4m3", "v_format": "fp8_e4m3", "k_center": True})
    assert any("k_center is harness-only" in n for n in notes)


def test_cells_written_before_k_center_existed_still_match():
    task = SimpleNamespace(kind="passkey", config={"context_lengths": [4096]}, limit=None)
    off = cell_config(task, KVCacheConfig(k_format="nvfp4", v_format="nvfp4"))
    on = cell_config(task, KVCacheConfig(k_format="nvfp4", v_format="nvfp4", k_center=True))
    assert "k_center" not in off["kv_config"]
    assert on["kv_config"]["k_center"] is True
