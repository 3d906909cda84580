"""Greedy generation with a prefill shared between KV formats (nvfp4kv/eval/greedy.py) gives the
same tokens as each format's own ``generate``, and runs the prefill once."""

from __future__ import annotations

import pytest
import torch

from nvfp4kv.cache import KVCacheConfig
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.eval import prefill_share
from nvfp4kv.eval.greedy import greedy_generate
from nvfp4kv.testing import tiny_llama

SETTINGS = {
    "bf16": KVCacheConfig(),
    "fp8_prefill": KVCacheConfig(k_format="fp8_e4m3", v_format="fp8_e4m3"),
    "nvfp4_prefill": KVCacheConfig(k_format="nvfp4", v_format="nvfp4"),
    "nvfp4_first_batch": KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="first_batch"),
    "nvfp4_dynamic": KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="dynamic"),
    "k_fp8_v_nvfp4": KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4"),
    "mxfp4": KVCacheConfig(k_format="mxfp4", v_format="mxfp4"),
    "int4_kivi": KVCacheConfig(k_format="int4", v_format="int4", residual_length=8),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama(seed=3).eval()


def _prompts(model, n: int = 3, length: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, model.config.vocab_size, (length + 5 * i,), generator=gen).tolist() for i in range(n)]


def _count_forwards(model, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of positions each forward of ``model`` processes."""
    seen: list[int] = []
    real = model.forward

    def spy(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return seen


@pytest.mark.parametrize("label", list(SETTINGS))
def test_shared_prefill_gives_the_tokens_of_the_formats_own_generate(model, label: str) -> None:
    kv = SETTINGS[label]
    prefill_share._STORES.pop(model, None)
    for prompt in _prompts(model):
        own = greedy_generate(model, prompt, kv, 12, pad_token_id=0, frozen_scales=FrozenScales(),
                              share_prefill=False)
        # another format fills the store, this one replays it
        filled = greedy_generate(model, prompt, SETTINGS["bf16"], 12, pad_token_id=0)
        shared = greedy_generate(model, prompt, kv, 12, pad_token_id=0, frozen_scales=FrozenScales())
        assert len(own) == 12 and shared == own, (label, own, shared)
        assert filled[0] == own[0]  # the first token comes from the raw prefill: the same for every format


def test_the_prefill_runs_once_for_all_formats(model, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_share._STORES.pop(model, None)
    seen = _count_forwards(model, monkeypatch)
    prompt = _prompts(model, n=1, length=50)[0]
    for kv in SETTINGS.values():
        greedy_generate(model, prompt, kv, 4, pad_token_id=0)
    prefills = [n for n in seen if n > 1]
    assert prefills == [50], seen  # one 50-token forward; every other forward decodes one token
    assert len(seen) == 1 + 3 * len(SETTINGS)


def test_nothing_is_shared_when_the_prefill_reads_the_quantized_cache(model, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_share._STORES.pop(model, None)
    seen = _count_forwards(model, monkeypatch)
    prompt = _prompts(model, n=1, length=30)[0]
    kv = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", read_mode="quantized")
    for _ in range(2):
        greedy_generate(model, prompt, kv, 3, pad_token_id=0)
    assert [n for n in seen if n > 1] == [30, 30]


def test_a_store_too_small_for_the_prompt_recomputes_it(model, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_share._STORES.pop(model, None)
    prefill_share.store_for(model).budget = 1  # nothing fits
    seen = _count_forwards(model, monkeypatch)
    prompt = _prompts(model, n=1, length=20)[0]
    nvfp4 = SETTINGS["nvfp4_prefill"]
    first = greedy_generate(model, prompt, nvfp4, 5, pad_token_id=0)
    again = greedy_generate(model, prompt, nvfp4, 5, pad_token_id=0)
    assert first == again and [n for n in seen if n > 1] == [20, 20]
    prefill_share._STORES.pop(model, None)
