"""The cache inside real transformers models: generate(), beams, padding, hybrid layers, read modes."""

from __future__ import annotations

import inspect

import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from nvfp4kv.cache import KVCacheConfig, PackedKVLayer, cache_kwarg_name, make_cache
from nvfp4kv.testing import tiny_llama, tiny_qwen3, tiny_sliding

FORMATS = ["bf16", "fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4", "int4", "int2"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "qwen3": tiny_qwen3(), "sliding": tiny_sliding()}


@pytest.fixture(scope="module")
def bf16_llama():
    return tiny_llama(dtype=torch.bfloat16)


def _batch(b: int = 2, t: int = 10, pad: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row 0 has ``pad`` pad tokens (id 0) in front."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, t), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :pad] = 0
    mask[0, :pad] = 0
    return ids, mask


def _generate(model, cache=None, **kwargs):
    ids, mask = _batch()
    extra = {} if cache is None else {cache_kwarg_name(model): cache}
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0, **extra, **kwargs)


def test_cache_kwarg_name_follows_the_forward_signature(bf16_llama):
    takes_cache = "cache" in inspect.signature(bf16_llama.forward).parameters  # transformers >= 5.2x renamed it
    assert cache_kwarg_name(bf16_llama) == ("cache" if takes_cache else "past_key_values")

    class Legacy:
        def forward(self, input_ids, past_key_values=None):
            pass

    assert cache_kwarg_name(Legacy()) == "past_key_values"


def test_bf16_cache_reproduces_dynamic_cache_bit_for_bit(bf16_llama):
    common = dict(output_logits=True, return_dict_in_generate=True)
    ref = _generate(bf16_llama, DynamicCache(config=bf16_llama.config), **common)
    cache = make_cache(bf16_llama, KVCacheConfig(k_format="bf16", v_format="bf16"))
    got = _generate(bf16_llama, cache, **common)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert torch.equal(a, b)
    assert all(isinstance(layer, PackedKVLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 10 + NEW_TOKENS - 1


def test_both_cache_keywords_work_in_generate(bf16_llama):
    ids, mask = _batch()
    outs = []
    kwargs = ("cache", "past_key_values") if "cache" in inspect.signature(bf16_llama.forward).parameters else (
        "past_key_values",)  # older transformers 5.x releases know only the old name
    for kwarg in kwargs:
        cache = make_cache(bf16_llama, KVCacheConfig())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # past_key_values is deprecated in transformers 5
            outs.append(bf16_llama.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                            pad_token_id=0, **{kwarg: cache}))
        assert cache.get_seq_length() == 10 + NEW_TOKENS - 1, kwarg  # the cache given was the one used
    assert all(torch.equal(outs[0], out) for out in outs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_format_generates_with_padding_and_beams(models, arch, fmt):
    model = models[arch]
    cfg = KVCacheConfig(k_format=fmt, v_format=fmt, k_options={"group_size": 4} if fmt.startswith("int") else {})
    greedy_cache = make_cache(model, cfg)
    greedy = _generate(model, greedy_cache)
    assert greedy.shape == (2, 10 + NEW_TOKENS)
    assert greedy_cache.get_seq_length() == 10 + NEW_TOKENS - 1
    beam_cache = make_cache(model, cfg)
    beams = _generate(model, beam_cache, num_beams=3)
    assert beams.shape == (2, 10 + NEW_TOKENS)
    layer = beam_cache.layers[0]
    assert layer.k_stream.read(torch.float32).shape[0] == 2 * 3  # beams expanded before the cache filled
    if fmt != "bf16":
        assert layer.k_stream.n_packed > 0 and layer.k_stream.packed_nbytes() > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_sliding_window_layers_stay_transformers_own(models, fmt):
    model = models["sliding"]
    cache = make_cache(model, KVCacheConfig(k_format=fmt, v_format=fmt))
    out = _generate(model, cache, num_beams=2)
    assert out.shape == (2, 10 + NEW_TOKENS)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [PackedKVLayer, DynamicSlidingWindowLayer, PackedKVLayer]
    report = cache.memory_report()
    assert report[1]["kind"] == "sliding" and report[1]["tokens"] == 7  # window 8 keeps 7 past tokens
    assert cache.nbytes() == sum(r["k_bytes"] + r["v_bytes"] for r in report)


def test_nvfp4_output_is_close_but_not_identical_to_bf16(bf16_llama):
    """Sanity on a random model: NVFP4 KV perturbs logits, mildly."""
    common = dict(output_logits=True, return_dict_in_generate=True)
    ref = _generate(bf16_llama, make_cache(bf16_llama, KVCacheConfig(k_format="bf16", v_format="bf16")), **common)
    got = _generate(bf16_llama, make_cache(bf16_llama, KVCacheConfig()), **common)
    first_decode_ref, first_decode = ref.logits[1].float(), got.logits[1].float()
    assert not torch.equal(first_decode, first_decode_ref)
    assert torch.allclose(first_decode, first_decode_ref, atol=0.5)


# ---------------------------------------------------------------- read modes, end to end
def _prefill_and_step(model, read_mode: str, fmt: str = "nvfp4") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a 12-token prompt (one forward) and of one decode step after it."""
    ids = torch.randint(3, 128, (1, 13), generator=torch.Generator().manual_seed(1))
    cache = make_cache(model, KVCacheConfig(k_format=fmt, v_format=fmt, read_mode=read_mode))
    kw = cache_kwarg_name(model)
    with torch.no_grad():
        prefill = model(ids[:, :12], use_cache=True, **{kw: cache}).logits
        step = model(ids[:, 12:], use_cache=True, **{kw: cache}).logits
    return prefill, step


def test_read_modes_differ_as_documented(bf16_llama):
    bf16_prefill, bf16_step = _prefill_and_step(bf16_llama, "serving", fmt="bf16")
    serving = _prefill_and_step(bf16_llama, "serving")
    quantized = _prefill_and_step(bf16_llama, "quantized")
    raw_fresh = _prefill_and_step(bf16_llama, "raw_fresh")
    # serving and raw_fresh: a prefill chunk attends to its own raw K/V -> unquantized logits
    assert torch.equal(serving[0], bf16_prefill) and torch.equal(raw_fresh[0], bf16_prefill)
    # quantized: the prompt already reads dequantized K/V (its first token reads only itself,
    # so only later positions can move)
    assert not torch.equal(quantized[0][:, -1], bf16_prefill[:, -1])
    # a decode step: serving reads its own K/V dequantized, raw_fresh reads it raw
    assert not torch.equal(serving[1], bf16_step)
    assert not torch.equal(serving[1], raw_fresh[1])


def test_skip_layers_store_bf16_and_change_the_output(bf16_llama):
    cfg = KVCacheConfig(skip_layers=(0, 1), read_mode="quantized")
    cache = make_cache(bf16_llama, cfg)
    all_skipped = _generate(bf16_llama, cache, output_logits=True, return_dict_in_generate=True)
    ref = _generate(bf16_llama, make_cache(bf16_llama, KVCacheConfig(k_format="bf16", v_format="bf16")),
                    output_logits=True, return_dict_in_generate=True)
    assert torch.equal(all_skipped.sequences, ref.sequences)  # every layer skipped == BF16 cache
    assert all(row["kind"] == "bf16_skip" and row["bits_per_element"] == 16 for row in cache.memory_report())
    cache = make_cache(bf16_llama, KVCacheConfig(skip_layers=(0,)))
    _generate(bf16_llama, cache)
    kinds = [(row["kind"], row["k_format"]) for row in cache.memory_report()]
    assert kinds == [("bf16_skip", "bf16"), ("packed", "nvfp4")]


def test_nonfinite_kv_in_a_model_names_the_layer(bf16_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="Layer 1 K holds NaN/Inf"):
        _generate(model, make_cache(model, KVCacheConfig()))


def test_assisted_decoding_crops_token_wise_caches_and_refuses_kivi_groups(bf16_llama):
    """Prompt-lookup decoding verifies drafts and crops the rejected ones (needs is_croppable)."""
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 6:] = ids[0, :6]  # a repeat gives the lookup drafts to propose
    bf16 = KVCacheConfig(k_format="bf16", v_format="bf16")
    plain = bf16_llama.generate(ids, max_new_tokens=8, do_sample=False, **{cache_kwarg_name(bf16_llama): DynamicCache(config=bf16_llama.config)})
    cache = make_cache(bf16_llama, bf16)
    assisted = bf16_llama.generate(ids, max_new_tokens=8, do_sample=False, **{cache_kwarg_name(bf16_llama): cache}, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, plain) and cache.get_seq_length() == 12 + 8 - 1
    cache = make_cache(bf16_llama, KVCacheConfig())
    bf16_llama.generate(ids, max_new_tokens=8, do_sample=False, **{cache_kwarg_name(bf16_llama): cache}, prompt_lookup_num_tokens=3)
    assert cache.get_seq_length() == 12 + 8 - 1
    with pytest.raises(ValueError, match="cropped"):
        bf16_llama.generate(ids, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3,
                            **{cache_kwarg_name(bf16_llama): make_cache(bf16_llama, KVCacheConfig(k_format="int4", v_format="int4"))})


def test_a_deep_copied_cache_continues_exactly_like_the_original(bf16_llama):
    """The eval harness copies a prefilled cache to score several continuations."""
    import copy

    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    cache = make_cache(bf16_llama, KVCacheConfig(scale_policy="dynamic", residual_length=2))
    with torch.no_grad():
        bf16_llama(ids[:, :8], cache=cache, use_cache=True)
        twin = copy.deepcopy(cache)
        a = bf16_llama(ids[:, 8:], cache=cache, use_cache=True).logits
        b = bf16_llama(ids[:, 8:], cache=twin, use_cache=True).logits
    assert torch.equal(a, b) and twin.nbytes() == cache.nbytes()
