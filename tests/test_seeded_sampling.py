"""``sampling: seeded`` of the ``lm_eval`` task kind: a seeded, sorted draw of ``limit`` documents per
(sub)task, handed to lm-eval as ``samples=``; ``sampling: first`` (the default) stays lm-eval's limit.

The draw is checked on its own (deterministic, seed-dependent, stratified, not the first N); the
end-to-end cells run the embedded SmolLM2 on local MMLU (2 subjects x 2 documents, 1 shot), as
``tests/test_eval_tasks.py`` does.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from nvfp4kv.config.choices import LM_EVAL_SAMPLINGS
from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval.data import DATA_DIR_ENV
from nvfp4kv.eval.lmeval_tasks import (
    LmEvalTaskConfig,
    draw_name,
    draw_samples,
    run_lm_eval_task,
    samples_sha256,
    seeded_indices,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (local GSM8K/MMLU)")

#: test-split sizes of three MMLU subjects
SIZES = {"mmlu_local_abstract_algebra": 100, "mmlu_local_anatomy": 135, "mmlu_local_astronomy": 152}


@pytest.fixture
def yaml_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated YAMLs go to a temporary root instead of ~/.cache/nvfp4kv/lm_eval_tasks."""
    import nvfp4kv.eval.lmeval_prepare as lmeval_prepare

    root = tmp_path / "lm_eval_tasks"
    monkeypatch.setattr(lmeval_prepare, "task_yaml_root", lambda: root)
    return root


# ---------------------------------------------------------------------------- the draw
def test_the_draw_is_seeded_stratified_sorted_and_not_the_first_n() -> None:
    draw = draw_samples(1234, SIZES, 10)
    assert draw == draw_samples(1234, SIZES, 10)  # deterministic
    assert draw != draw_samples(1235, SIZES, 10)  # another seed, other documents
    for leaf, indices in draw.items():
        assert len(indices) == len(set(indices)) == 10  # exactly `limit` per subject
        assert indices == sorted(indices) and all(0 <= i < SIZES[leaf] for i in indices)
        assert indices != list(range(10))
    assert len({tuple(i) for i in draw.values()}) == 3  # each subject draws under its own name
    # min(limit, n): a limit above a subject's size takes all of it; no limit takes every document
    big = draw_samples(1234, SIZES, 120)
    assert big["mmlu_local_abstract_algebra"] == list(range(100)) and [len(v) for v in big.values()] == [100, 120, 120]
    assert draw_samples(1234, SIZES, None) == {k: list(range(n)) for k, n in SIZES.items()}


def test_the_draw_is_the_same_in_every_process_and_on_either_data_route() -> None:
    # random.Random(str) seeds from the string's SHA-512 (no hash() randomisation): pinned values
    assert seeded_indices(0, "mmlu_anatomy", 135, 5) == [10, 26, 41, 48, 127]
    # the local copy (mmlu_local_<subject>, gsm8k_local) draws what the hub task (mmlu_<subject>, gsm8k) draws
    assert draw_name("mmlu_local_anatomy") == "mmlu_anatomy" and draw_name("gsm8k_local") == "gsm8k"
    assert draw_name("gsm8k_cot_local") == "gsm8k_cot" and draw_name("niah_single_1") == "niah_single_1"
    assert seeded_indices(7, "mmlu_local_anatomy", 135, 5) == seeded_indices(7, "mmlu_anatomy", 135, 5)
    assert samples_sha256({"mmlu_local_anatomy": [3, 1]}) == samples_sha256({"mmlu_anatomy": [1, 3]}) == \
        hashlib.sha256(json.dumps({"mmlu_anatomy": [1, 3]}, separators=(",", ":")).encode()).hexdigest()
    assert samples_sha256({"mmlu_anatomy": [1, 3]}) != samples_sha256({"mmlu_anatomy": [1, 4]})


# ---------------------------------------------------------------------------- config
def test_a_bad_sampling_value_is_one_config_error_naming_the_choices() -> None:
    assert LM_EVAL_SAMPLINGS == ("first", "seeded")
    assert LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu"}).sampling == "first"
    assert LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "sampling": None}).sampling == "first"
    assert LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "sampling": "seeded"}).sampling == "seeded"
    for bad in ("random", "Seeded", 1):
        with pytest.raises(ConfigError, match=r"sampling=.* is not allowed; use one of first, seeded"):
            LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "sampling": bad})
    with pytest.raises(ConfigError, match=r"sampling=.* is not allowed; use one of first, seeded"):
        run_lm_eval_task({"lm_eval_task": "mmlu", "sampling": "random"}, None, None, limit=2, seed=0)


def test_the_schema_types_sampling_as_a_closed_choice() -> None:
    from hydra import compose, initialize_config_dir

    import nvfp4kv.config  # noqa: F401  (registers the schemas)
    from nvfp4kv.config.check import check_task, describe_error, resolve_config

    config_dir = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        cfg = compose(config_name="config", overrides=["+sweep=smoke"])
        assert "sampling" not in resolve_config(cfg)["tasks"]["mmlu"]  # not given: the family default, first
        seeded = compose(config_name="config", overrides=["+sweep=smoke", "tasks.mmlu.sampling=seeded"])
        assert resolve_config(seeded)["tasks"]["mmlu"]["sampling"] == "seeded"
        with pytest.raises(Exception) as err:  # OmegaConf refuses it when the config is composed
            compose(config_name="config", overrides=["+sweep=smoke", "tasks.mmlu.sampling=random"])
        assert describe_error(err.value) == "tasks.mmlu.sampling='random' is not allowed; use one of first, seeded."
    with pytest.raises(ConfigError, match=r"tasks\.m\.sampling='random' is not allowed; use one of first, seeded"):
        check_task("m", {"kind": "lm_eval", "lm_eval_task": "mmlu", "sampling": "random"})


def test_the_seeded_draw_is_held_to_the_embedded_samples_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the embedded sample, a seeded draw may ask for no more documents than it holds."""
    import datasets.config
    import huggingface_hub.constants

    import nvfp4kv.eval.data as data

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(DatasetNotFoundError, match=r"limit=100 asks for 100 documents per \(sub\)task"):
        run_lm_eval_task({"lm_eval_task": "gsm8k", "sampling": "seeded"}, None, None, limit=100, seed=0)


# ---------------------------------------------------------------------------- end to end
# ``bundle`` and ``lm`` (the embedded model, BF16 KV): tests/conftest.py


MMLU_CFG = {"kind": "lm_eval", "name": "mmlu", "lm_eval_task": "mmlu", "num_fewshot": 1,
            "subjects": ["anatomy", "astronomy"]}
LEAVES = ["mmlu_local_anatomy", "mmlu_local_astronomy"]


def _doc_ids(result) -> list[str]:
    return [s["doc_id"] for s in result.samples]


@pytest.mark.slow
@needs_data
def test_a_seeded_cell_evaluates_the_drawn_documents_under_every_kv_format(
        bundle, lm, yaml_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))
    task_cfg = {**MMLU_CFG, "sampling": "seeded"}
    drawn = draw_samples(5, {"mmlu_local_anatomy": 135, "mmlu_local_astronomy": 152}, 2)
    expected = [f"{leaf}:{i}" for leaf in LEAVES for i in drawn[leaf]]
    assert expected != [f"{leaf}:{i}" for leaf in LEAVES for i in (0, 1)]

    import lm_eval.evaluator

    outputs = []
    real = lm_eval.evaluator.simple_evaluate

    def capture(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", capture)
    bf16 = run_lm_eval_task(task_cfg, bundle, "bf16", limit=2, seed=5, lm=lm, progress=False)
    assert _doc_ids(bf16) == expected  # lm-eval records each document's index in its subject's test split
    # ... and the document it evaluated under that doc_id is the CSV row of that index
    for leaf in LEAVES:
        with open(SHARED_DATA / "mmlu" / "test" / f"{leaf[len('mmlu_local_'):]}_test.csv", newline="") as f:
            rows = list(csv.reader(f))
        logged = outputs[0]["samples"][leaf]
        assert sorted({s["doc_id"] for s in logged}) == drawn[leaf]
        assert all(s["doc"]["question"] == rows[s["doc_id"]][0] for s in logged)
    assert bf16.metrics["acc,none"].n == 4
    assert bf16.extra["sampling"] == {"mode": "seeded", "seed": 5, "limit": 2,
                                      "per_task": {leaf: 2 for leaf in LEAVES},
                                      "indices_sha256": samples_sha256(drawn)}

    nvfp4 = run_lm_eval_task(task_cfg, bundle, "nvfp4", limit=2, seed=5, lm=lm, progress=False)
    assert _doc_ids(nvfp4) == expected and [s["target"] for s in nvfp4.samples] == [s["target"] for s in bf16.samples]
    assert nvfp4.extra["sampling"] == bf16.extra["sampling"]
    # another seed draws other documents, and the record says so
    assert samples_sha256(draw_samples(6, {leaf: n for leaf, n in zip(LEAVES, (135, 152))}, 2)) != \
        bf16.extra["sampling"]["indices_sha256"]


@pytest.mark.slow
@needs_data
def test_sampling_first_is_lm_evals_limit(bundle, lm, yaml_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))
    default = run_lm_eval_task(MMLU_CFG, bundle, "bf16", limit=2, seed=5, lm=lm, progress=False)
    first = run_lm_eval_task({**MMLU_CFG, "sampling": "first"}, bundle, "bf16", limit=2, seed=5, lm=lm,
                             progress=False)
    assert _doc_ids(default) == _doc_ids(first) == [f"{leaf}:{i}" for leaf in LEAVES for i in (0, 1)]
    assert default.samples == first.samples and "sampling" not in first.extra
    # lm_stats may differ: the shared model replays prefills it has seen (same questions, same numbers)
    assert {k: v for k, v in default.extra.items() if k != "lm_stats"} == \
        {k: v for k, v in first.extra.items() if k != "lm_stats"}
    assert {k: vars(v) for k, v in default.metrics.items()} == {k: vars(v) for k, v in first.metrics.items()}
