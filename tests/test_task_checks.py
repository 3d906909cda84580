"""Model-free pre-checks of ``lm_eval`` task configs (:func:`check_lm_eval_task`).

Every refusal must come before any model loads (``load_model`` is patched to fail in every test
here), as one line that names the config key and the fix. Checking a GSM8K/MMLU name must not
pay for lm-eval's task index; other names use it, cached in the process and on disk. Preparing a
task twice (validation, then the run) must not redo the work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import nvfp4kv.eval.data as data
import nvfp4kv.eval.lmeval_prepare as lmeval_prepare
import nvfp4kv.eval.task_checks as task_checks
from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval.data import DATA_DIR_ENV, SAMPLE_DIR
from nvfp4kv.eval.lmeval_tasks import LmEvalTaskConfig, check_lm_eval_task, prepare_task


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import nvfp4kv.models

    def refuse(*args, **kwargs):
        raise AssertionError("a pre-check loaded a model")

    monkeypatch.setattr(nvfp4kv.models, "load_model", refuse)


@pytest.fixture(autouse=True)
def yaml_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lm_eval_tasks"
    monkeypatch.setattr(lmeval_prepare, "task_yaml_root", lambda: root)
    return root


@pytest.fixture
def data_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small local data directory (a copy of the sample) named by $NVFP4KV_DATA_DIR."""
    root = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, root)
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    return root


def refusal(error: type[Exception], task_cfg: dict, *patterns: str, limit: int | None = 4) -> str:
    """Run the check, expect ``error``; the message is one line matching every pattern."""
    with pytest.raises(error) as info:
        check_lm_eval_task(task_cfg, limit=limit)
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


# ---------------------------------------------------------------------------- config keys
def test_unknown_key_names_the_key_and_the_likely_fix() -> None:
    refusal(ConfigError, {"lm_eval_task": "gsm8k", "fewshot": 5}, "'fewshot'", "did you mean 'num_fewshot'")


def test_bad_loglikelihood_mode_and_num_fewshot() -> None:
    refusal(ConfigError, {"lm_eval_task": "mmlu", "loglikelihood_mode": "fast"},
            "loglikelihood_mode='fast'", "decode_faithful")
    refusal(ConfigError, {"lm_eval_task": "gsm8k", "num_fewshot": -1}, "num_fewshot=-1", ">= 0")
    refusal(ConfigError, {"lm_eval_task": "gsm8k", "num_fewshot": "5"}, "num_fewshot='5'")


def test_subjects_only_apply_to_mmlu() -> None:
    refusal(ConfigError, {"lm_eval_task": "gsm8k", "subjects": ["anatomy"]},
            "subjects=['anatomy']", "lm_eval_task: mmlu", "drop subjects")


# ---------------------------------------------------------------------------- task names
def test_gsm8k_and_mmlu_names_skip_lm_evals_task_index(monkeypatch: pytest.MonkeyPatch) -> None:
    indexed: list[str] = []

    def small_index() -> frozenset[str]:
        indexed.append("index")
        return frozenset({"alpha_task"})

    monkeypatch.setattr(task_checks, "lm_eval_task_names", small_index)
    for name in ("gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot", "mmlu", "mmlu_anatomy"):
        task_checks.check_task_name(name)
    assert indexed == []  # accepted without building lm-eval's task index
    # the shortcut is for those names only: any other name is looked up, and refused if unknown
    task_checks.check_task_name("alpha_task")
    with pytest.raises(ConfigError, match="lm_eval_task='mmlu_x_gsm8k' is not an lm-eval task"):
        task_checks.check_task_name("mmlu_x_gsm8k")
    assert indexed == ["index", "index"]


def test_unknown_task_name_lists_close_matches() -> None:
    """The real registry (lm-eval's TaskManager index; cached on disk after the first run)."""
    refusal(ConfigError, {"lm_eval_task": "gsm8kk"}, "lm_eval_task='gsm8kk' is not an lm-eval task",
            "did you mean gsm8k", "Fix lm_eval_task:")
    refusal(ConfigError, {"lm_eval_task": "mmlu_astronomyy"}, "did you mean mmlu_astronomy")
    # a name lm-eval knows passes, and a task without local data records lm-eval's own source
    prepared = check_lm_eval_task({"lm_eval_task": "niah_single_1"}, limit=None)
    assert prepared.data_identity() == {"data_source": "lm_eval", "data_sha256": None}


def test_task_names_are_indexed_once_then_read_from_the_disk_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.tasks

    built: list[int] = []

    class FakeTaskManager:
        def __init__(self, **kwargs):
            built.append(1)
            self.all_tasks = ["alpha_task", "beta_task"]

    cache_file = tmp_path / "names" / "key.json"
    monkeypatch.setattr(task_checks, "_names_cache_file", lambda: cache_file)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)
    task_checks.lm_eval_task_names.cache_clear()
    try:
        task_checks.check_task_name("alpha_task")
        task_checks.check_task_name("beta_task")
        assert built == [1] and cache_file.is_file()
        task_checks.lm_eval_task_names.cache_clear()  # a new process: read from disk, no index
        with pytest.raises(ConfigError, match="'alpha_tsak' is not an lm-eval task; did you mean alpha_task"):
            task_checks.check_task_name("alpha_tsak")
        assert built == [1]
    finally:
        task_checks.lm_eval_task_names.cache_clear()


# ---------------------------------------------------------------------------- MMLU subjects
def test_unknown_mmlu_subject_lists_close_matches_and_the_fix() -> None:
    message = refusal(ConfigError, {"lm_eval_task": "mmlu", "subjects": ["marketing", "astrology"]},
                      "subjects: unknown MMLU subject(s) ['astrology']", "astronomy", "subjects: all")
    assert "marketing'" not in message  # only the unknown one is named
    refusal(ConfigError, {"lm_eval_task": "mmlu", "subjects": []}, "subjects=[]", "subjects: all")


def test_all_57_subjects_are_known() -> None:
    assert len(task_checks.check_mmlu_subjects(None)) == 57
    assert task_checks.check_mmlu_subjects(["virology", "anatomy", "virology"]) == ["virology", "anatomy"]


# ---------------------------------------------------------------------------- data directory
def test_missing_data_directory_names_the_variable_and_the_fix(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    refusal(DatasetNotFoundError, {"lm_eval_task": "gsm8k"}, str(tmp_path / "nowhere"),
            f"(from ${DATA_DIR_ENV}) does not exist", "Fix the path")
    monkeypatch.delenv(DATA_DIR_ENV)
    refusal(DatasetNotFoundError, {"lm_eval_task": "gsm8k", "data_dir": str(tmp_path / "typo")},
            "(from data_dir) does not exist")


def test_data_directory_without_the_tasks_files_names_the_file(data_copy: Path) -> None:
    (data_copy / "gsm8k" / "train.jsonl").unlink()
    refusal(DatasetNotFoundError, {"lm_eval_task": "gsm8k"}, str(data_copy / "gsm8k" / "train.jsonl"),
            f"point {DATA_DIR_ENV} / data_dir at a complete data directory")
    refusal(DatasetNotFoundError, {"lm_eval_task": "mmlu", "subjects": ["anatomy"]},
            str(data_copy / "mmlu" / "dev" / "anatomy_dev.csv"))


def test_few_shot_pool_too_small_for_num_fewshot(data_copy: Path) -> None:
    """MMLU's dev split has 5 questions per subject, in the full data too."""
    refusal(ConfigError, {"lm_eval_task": "mmlu", "subjects": ["marketing"], "num_fewshot": 6},
            "num_fewshot=6", "MMLU dev split", "set num_fewshot <= 5")
    prepared = check_lm_eval_task({"lm_eval_task": "mmlu", "subjects": ["marketing"], "num_fewshot": 5}, limit=None)
    assert prepared.data_source == f"local:{data_copy}" and prepared.task_name == "mmlu_local"


def test_a_full_local_directory_takes_any_limit(data_copy: Path) -> None:
    prepared = check_lm_eval_task({"lm_eval_task": "gsm8k"}, limit=None)
    assert prepared.data_source == f"local:{data_copy}" and len(prepared.data_sha256) == 64


# ---------------------------------------------------------------------------- repeated preparation
def test_preparation_is_memoized_and_survives_a_deleted_yaml_dir(data_copy: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = lmeval_prepare.write_include_dir

    def counting(files, root=None):
        calls.append(1)
        return real(files, root)

    monkeypatch.setattr(lmeval_prepare, "write_include_dir", counting)
    cfg = LmEvalTaskConfig.from_dict({"lm_eval_task": "mmlu", "subjects": ["marketing", "abstract_algebra"]})
    first = prepare_task(cfg, None)
    again = check_lm_eval_task({"lm_eval_task": "mmlu", "subjects": ["marketing", "abstract_algebra"]}, limit=2)
    assert again is first and calls == [1]
    shutil.rmtree(first.include_dir)
    third = prepare_task(cfg, None)
    assert calls == [1, 1] and third.include_dir.is_dir() and third.task_name == "mmlu_local"


def test_the_hub_probe_is_skipped_when_a_directory_is_configured(data_copy: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the hub although a data directory is set")

    monkeypatch.setattr(data, "hub_reachable", no_probe)
    assert check_lm_eval_task({"lm_eval_task": "gsm8k"}, limit=3).data_source == f"local:{data_copy}"
