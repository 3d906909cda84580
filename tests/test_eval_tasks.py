"""Data resolution, generated lm-eval task YAMLs, and the ``lm_eval`` task kind end to end.

The end-to-end cells run the embedded SmolLM2 on local data with tiny limits (GSM8K 2 docs x 32
new tokens, MMLU 2 subjects x 2 docs). The generated YAMLs are loaded by lm-eval's own
TaskManager, so a YAML lm-eval cannot read fails here, not in a sweep.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval import get_task_runner
from nvfp4kv.eval.data import DATA_DIR_ENV, gsm8k_files, mmlu_files, resolve_data_dir
from nvfp4kv.eval.lmeval_tasks import (
    LmEvalTaskConfig,
    _metrics,
    _samples,
    mmlu_subject_descriptions,
    prepare_task,
    run_lm_eval_task,
    write_include_dir,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (local GSM8K/MMLU)")


@pytest.fixture
def yaml_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated YAMLs go to a temporary root instead of ~/.cache/nvfp4kv/lm_eval_tasks."""
    import nvfp4kv.eval.lmeval_prepare as lmeval_prepare

    root = tmp_path / "lm_eval_tasks"
    monkeypatch.setattr(lmeval_prepare, "task_yaml_root", lambda: root)
    return root


# ---------------------------------------------------------------------------- data resolution
def test_env_var_overrides_config_and_unset_means_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, cfg_dir = tmp_path / "env", tmp_path / "cfg"
    env_dir.mkdir(), cfg_dir.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env_dir))
    assert resolve_data_dir(cfg_dir) == env_dir.resolve()
    monkeypatch.delenv(DATA_DIR_ENV)
    assert resolve_data_dir(cfg_dir) == cfg_dir.resolve()
    assert resolve_data_dir(None) is None


def test_missing_dir_and_files_name_the_path_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nope'}.*{DATA_DIR_ENV}"):
        resolve_data_dir(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "gsm8k" / "train.jsonl")):
        gsm8k_files(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv")):
        mmlu_files(tmp_path, "anatomy")


def test_offline_hub_without_data_dir_reads_the_sample_and_refuses_a_full_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, no data directory, nothing beside the checkout: GSM8K falls back to the embedded
    sample, which cannot serve a run over more documents than it has: the error names the hub
    dataset, why the hub is out, and the variable to set, before any model is touched."""
    import datasets.config
    import huggingface_hub.constants

    import nvfp4kv.eval.data as data

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(DatasetNotFoundError, match=f"openai/gsm8k.*offline.*{DATA_DIR_ENV}"):
        run_lm_eval_task({"lm_eval_task": "gsm8k"}, None, None, limit=100, seed=0)


# ---------------------------------------------------------------------------- YAML generation
@needs_data
def test_generated_yamls_include_builtins_with_absolute_local_paths(yaml_root: Path) -> None:
    gsm8k = prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "gsm8k_cot"}), SHARED_DATA)
    assert gsm8k.task_name == "gsm8k_cot_local" and not gsm8k.include_defaults
    cfg = yaml.safe_load((gsm8k.include_dir / "gsm8k_cot_local.yaml").read_text())
    assert Path(cfg["include"]).is_absolute() and Path(cfg["include"]).name == "gsm8k-cot.yaml"
    assert cfg["dataset_path"] == "json"
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in cfg["dataset_kwargs"]["data_files"].values())

    mmlu = prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "subjects": ["anatomy", "virology"]}),
                        SHARED_DATA)
    assert mmlu.task_name == "mmlu_local"
    names = sorted(p.name for p in mmlu.include_dir.iterdir())
    assert names == ["_mmlu_local.yaml", "mmlu_local_anatomy.yaml", "mmlu_local_virology.yaml"]
    group = yaml.safe_load((mmlu.include_dir / "_mmlu_local.yaml").read_text())
    assert group["task"] == ["mmlu_local_anatomy", "mmlu_local_virology"]
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    # the same content maps to the same directory (resumed sweeps reuse it)
    again = prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "subjects": ["anatomy", "virology"]}),
                         SHARED_DATA)
    assert again.include_dir == mmlu.include_dir and mmlu.include_dir.parent == yaml_root

    full = prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "subjects": "all"}), SHARED_DATA)
    assert len(list(full.include_dir.glob("mmlu_local_*.yaml"))) == 57 == len(mmlu_subject_descriptions())


def test_unknown_subject_and_config_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown MMLU subject.*astrology.*astronomy"):
        prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "subjects": ["astrology"]}), None)
    with pytest.raises(ConfigError, match="Unknown key"):
        LmEvalTaskConfig.from_dict({"lm_eval_task": "gsm8k", "fewshot": 5})


def test_write_include_dir_is_content_addressed(tmp_path: Path) -> None:
    a = write_include_dir({"x.yaml": "task: x\n"}, root=tmp_path)
    b = write_include_dir({"x.yaml": "task: x\n"}, root=tmp_path)
    c = write_include_dir({"x.yaml": "task: y\n"}, root=tmp_path)
    assert a == b != c and (a / "x.yaml").read_text() == "task: x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, c.name])  # no temp dirs left


@needs_data
def test_local_mmlu_docs_match_the_hub_schema_and_keep_none_options(yaml_root: Path) -> None:
    """Pandas would read an option 'None' as NaN; the generated YAML must keep it as text."""
    from lm_eval.tasks import TaskManager

    prepared = prepare_task(LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu_college_computer_science"}),
                            SHARED_DATA)
    task = TaskManager(include_path=str(prepared.include_dir), include_defaults=False).load(
        [prepared.task_name])["tasks"][prepared.task_name]
    docs = list(task.test_docs())
    assert len(docs) == 100
    assert all(isinstance(d["answer"], int) and 0 <= d["answer"] < 4 and len(d["choices"]) == 4 for d in docs)
    assert all(isinstance(c, str) for d in docs for c in d["choices"])
    assert any("None" in d["choices"] for d in docs)
    assert task.doc_to_text(docs[0]).endswith("\nAnswer:")


# ---------------------------------------------------------------------------- result extraction
def test_metric_extraction_keeps_stderr_and_filters() -> None:
    output = {
        "results": {"t": {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                          "exact_match,flexible-extract": 0.75, "exact_match_stderr,flexible-extract": "N/A",
                          "4096,none": -1, "1024,none": 1.0, "1024_stderr,none": 0.0}},
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }
    metrics = _metrics(output, "t", ["t"], None)
    assert set(metrics) == {"exact_match,strict-match", "exact_match,flexible-extract", "1024,none"}
    assert metrics["exact_match,strict-match"].stderr == 0.1 and metrics["exact_match,strict-match"].n == 4
    assert metrics["exact_match,flexible-extract"].stderr is None
    assert set(_metrics(output, "t", ["t"], ("exact_match,strict-match",))) == {"exact_match,strict-match"}
    assert len(_metrics(output, "t", ["t"], ("exact_match",))) == 2
    with pytest.raises(ConfigError, match="not produced"):
        _metrics(output, "t", ["t"], ("acc",))


def test_samples_merge_filters_per_document() -> None:
    import numpy as np

    base = {"doc_id": 0, "target": "18", "resps": [["#### 18"]], "metrics": ["exact_match"]}
    output = {"samples": {"t": [
        {**base, "filter": "strict-match", "filtered_resps": ["18"], "exact_match": np.float64(1.0)},
        {**base, "filter": "flexible-extract", "filtered_resps": ["18"], "exact_match": np.float64(1.0)},
    ]}}
    (record,) = _samples(output, ["t"])
    assert record["doc_id"] == 0 and record["prediction"] == "#### 18" and record["target"] == "18"
    assert record["metrics"] == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}
    assert all(type(v) is float for v in record["metrics"].values())


# ---------------------------------------------------------------------------- end to end
# ``bundle`` and ``lm`` (the embedded model, BF16 KV): tests/conftest.py


@pytest.mark.slow
@needs_data
def test_lm_eval_kind_runs_local_gsm8k(bundle, lm, yaml_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvfp4kv.cache import KVCacheConfig

    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))
    assert get_task_runner("lm_eval") is run_lm_eval_task
    task_cfg = {"kind": "lm_eval", "name": "gsm8k", "lm_eval_task": "gsm8k", "num_fewshot": 1,
                "gen_kwargs": {"max_gen_toks": 32}}
    kv = KVCacheConfig(k_format="nvfp4", v_format="nvfp4")
    result = run_lm_eval_task(task_cfg, bundle, kv, limit=2, seed=0, lm=lm, progress=False)
    assert set(result.metrics) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    for metric in result.metrics.values():
        assert metric.n == 2 and 0.0 <= metric.value <= 1.0 and metric.stderr is not None
    assert [s["doc_id"] for s in result.samples] == [0, 1]
    assert all(isinstance(s["prediction"], str) and "####" in s["target"] for s in result.samples)
    assert set(result.samples[0]["metrics"]) == set(result.metrics)
    assert result.extra["lm_eval_task"] == "gsm8k_local" and result.extra["data_source"].startswith("local:")
    assert result.extra["lm_stats"]["generate_caches"] == 2  # one fresh quantized cache per document
    assert lm.kv is kv


@pytest.mark.slow
@needs_data
def test_lm_eval_kind_runs_local_mmlu_subset(bundle, lm, yaml_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED_DATA))
    task_cfg = {"kind": "lm_eval", "name": "mmlu", "lm_eval_task": "mmlu", "num_fewshot": 1,
                "subjects": ["anatomy", "astronomy"]}
    result = run_lm_eval_task(task_cfg, bundle, "nvfp4", limit=2, seed=0, lm=lm, progress=False)
    assert set(result.metrics) == {"acc,none"}
    acc = result.metrics["acc,none"]
    assert acc.n == 4 and acc.stderr is not None
    assert sorted(result.extra["subtasks"]) == ["mmlu_local_anatomy", "mmlu_local_astronomy"]
    # the group's acc is the size-weighted mean of the subjects'
    sub = [v["acc,none"] for v in result.extra["subtasks"].values()]
    assert math.isclose(acc.value, sum(s["value"] * s["n"] for s in sub) / sum(s["n"] for s in sub))
    assert [s["doc_id"] for s in result.samples] == ["mmlu_local_anatomy:0", "mmlu_local_anatomy:1",
                                                     "mmlu_local_astronomy:0", "mmlu_local_astronomy:1"]
    assert all(s["target"] in range(4) and s["prediction"] in range(4) for s in result.samples)
    assert math.isclose(acc.value, sum(s["metrics"]["acc,none"] for s in result.samples) / 4)
    # decode-faithful scoring: one prefill + one chunk forward per question, shared by 4 choices
    assert result.extra["lm_stats"] == {"prefill_forwards": 4, "chunk_forwards": 4}
