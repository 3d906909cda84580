"""An atomic cache update: malformed K/V are refused before anything changes, and any failure
while K or V is stored (a format or kernel raising on V after K was appended) leaves the layer
exactly as it was, byte for byte, so K and V can never get out of step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from nvfp4kv.cache import KVCacheConfig, PackedKVLayer, QuantizedKVCache
from nvfp4kv.errors import BlockSizeError, KVStateError, NonFiniteKVError

B, H, T, D = 2, 2, 10, 32
MODEL_CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=H, head_dim=D)

#: configurations that exercise every piece of stored state: sink, pending, packed parts,
#: frozen and per-write scales, the fast path's dequantized copy, KIVI token groups, BF16
CONFIGS: dict[str, dict[str, Any]] = {
    "nvfp4-dynamic-windows-fastpath": dict(scale_policy="dynamic", residual_length=3, sink_tokens=2,
                                           dequant_cache=True),
    "int4-keys-fp8-values": dict(k_format="int4", v_format="fp8_e4m3", k_options={"group_size": 8}),
    "bf16": dict(k_format="bf16", v_format="bf16"),
}


def kv(t: int = T, seed: int = 0, b: int = B, h: int = H, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def make(config: str = "nvfp4-dynamic-windows-fastpath", prefilled: bool = True, **extra: Any) -> QuantizedKVCache:
    cache = QuantizedKVCache(KVCacheConfig(**{**CONFIGS[config], **extra}), MODEL_CONFIG)
    if prefilled:
        cache.update(*kv(), 0)
        cache.update(*kv(1, seed=1), 0)  # a decode step too: pending, records and fast path all move
    return cache


def layer0(cache: QuantizedKVCache) -> PackedKVLayer:
    layer = cache.layers[0]
    assert isinstance(layer, PackedKVLayer)
    return layer


def stored_state(layer: PackedKVLayer) -> dict[str, Any]:
    """Every stored value of a layer: all stream attributes (tensors cloned), seq length, dims."""
    state: dict[str, Any] = {
        "seq_length": layer.get_seq_length(),
        "head_dims": layer.head_dims,
        "is_initialized": layer.is_initialized,
    }
    for which, stream in (("K", layer.k_stream), ("V", layer.v_stream)):
        for name, value in vars(stream).items():
            if name == "parts":
                for part, tensor in (value or {}).items():
                    state[f"{which}.parts.{part}"] = tensor.clone()
            elif isinstance(value, torch.Tensor):
                state[f"{which}.{name}"] = value.clone()
            elif value is None or isinstance(value, (int, str, torch.dtype)):
                state[f"{which}.{name}"] = value
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, torch.Tensor):
            assert isinstance(new, torch.Tensor), key
            assert (old.dtype, old.shape, old.device) == (new.dtype, new.shape, new.device), key
            assert torch.equal(old.contiguous().view(torch.uint8), new.contiguous().view(torch.uint8)), key
        else:
            assert old == new, key


class FailingQuantize:
    """A codec whose quantize raises (a kernel failing on V after K was stored)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def quantize(self, fmt, x, global_scale):
        raise RuntimeError("V kernel failed")

    def dequantize(self, fmt, parts, global_scale, dtype):
        return self.real.dequantize(fmt, parts, global_scale, dtype)


# ---------------------------------------------------------------- failures inside V's write
@pytest.mark.parametrize("prefilled", [True, False], ids=["prefilled", "empty"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_failing_v_write_leaves_the_layer_exactly_as_before(config: str, prefilled: bool) -> None:
    cache = make(config, prefilled)
    layer = layer0(cache)
    before = stored_state(layer)
    real = layer.v_stream.codec
    layer.v_stream.codec = FailingQuantize(real)  # type: ignore[assignment]
    k, v = kv(12, seed=2)  # enough tokens to leave the residual window and fill KIVI groups
    with pytest.raises(RuntimeError, match="V kernel failed"):
        cache.update(k, v, 0)
    assert_same_state(before, stored_state(layer))

    # the layer is still usable: the same write now gives what a cache that never failed holds
    layer.v_stream.codec = real
    out = cache.update(k, v, 0)
    reference = make(config, prefilled)
    expected = reference.update(k, v, 0)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert_same_state(stored_state(layer0(reference)), stored_state(layer))


def test_nan_in_v_under_raise_names_v_and_changes_nothing() -> None:
    cache = make(nonfinite="raise")
    layer = layer0(cache)
    before = stored_state(layer)
    k, v = kv(4, seed=3)
    v[1, 0, 2, 7] = float("nan")
    with pytest.raises(NonFiniteKVError, match=r"Layer 0 V holds NaN/Inf \(first at batch 1, kv head 0, token 13\).*nonfinite='map'"):
        cache.update(k, v, 0)
    assert_same_state(before, stored_state(layer))


def test_a_block_size_v_cannot_take_is_refused_before_k_is_stored() -> None:
    cache = QuantizedKVCache(KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4"))  # lazy layers
    k, v = kv(4, d=24)
    with pytest.raises(BlockSizeError, match="Layer 0 V: format 'nvfp4' .*head_dim is 24.*skip_layers"):
        cache.update(k, v, 0)
    layer = layer0(cache)  # created lazily by transformers, but holds nothing
    assert layer.get_seq_length() == 0 and layer.k_stream.parts is None and layer.k_stream.n_tokens == 0


# ---------------------------------------------------------------- malformed K/V
def _bad_states(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = kv(3, seed=4)
    if case == "tokens":
        return kv(5, seed=4)[0], v
    if case == "3-D":
        return k[0], v[0]
    if case == "int64":
        return k.long(), v.long()
    if case == "head_dim":
        return kv(3, d=2 * D)[0], v
    if case == "batch":
        return kv(3, b=B + 1)
    if case == "heads":
        return kv(3, h=H + 1)
    if case == "kv-devices":
        return k, v.to("meta")
    if case == "stored-device":
        return k.to("meta"), v.to("meta")
    raise AssertionError(case)


BAD = {
    "tokens": r"must have equal batch, kv heads and tokens.*same tokens",
    "3-D": r"key_states must be 4-D \[batch, kv_heads, tokens, head_dim\]; got shape \(2, 3, 32\)",
    "int64": r"must be floating point .*got torch.int64\. Cast it",
    "head_dim": r"head_dim is 32 for K and 32 for V; got 64 and 32",
    "batch": r"holds batch 2 x 2 kv heads; got 3 x 2.*make_cache",
    "heads": r"holds batch 2 x 2 kv heads; got 2 x 3",
    "kv-devices": r"K is on cpu but V on meta",
    "stored-device": r"stores K/V on cpu; got meta",
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_states_are_refused_before_anything_changes(case: str) -> None:
    cache = make()
    layer = layer0(cache)
    before = stored_state(layer)
    with pytest.raises(KVStateError, match=BAD[case]) as info:
        cache.update(*_bad_states(case), 0)
    assert isinstance(info.value, ValueError) and str(info.value).startswith("Layer 0: ")
    assert_same_state(before, stored_state(layer))


@pytest.mark.parametrize("case", ["tokens", "3-D", "int64", "kv-devices"])
def test_a_refused_first_update_creates_no_layer(case: str) -> None:
    cache = QuantizedKVCache(KVCacheConfig())  # layers are created lazily, on first update
    with pytest.raises(KVStateError):
        cache.update(*_bad_states(case), 0)
    assert len(cache.layers) == 0
