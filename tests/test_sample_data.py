"""The embedded GSM8K/MMLU sample: what it holds, where it comes from, and when it is used.

The quick start must run on a fresh clone with no network and no ``../shared`` beside it. These
tests rebuild that situation (``$NVFP4KV_DATA_DIR`` unset, the beside-the-checkout lookup patched
out, the hub offline with empty caches) and check that the GSM8K and MMLU tasks resolve to the
embedded sample, say so in one log line, record it (source + SHA-256), and that lm-eval builds
its documents from it, all without loading a model.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

import nvfp4kv.eval.data as data
import nvfp4kv.eval.lmeval_prepare as lmeval_prepare
import nvfp4kv.eval.lmeval_tasks as lmeval_tasks
from nvfp4kv.eval.data import DATA_DIR_ENV, SAMPLE_DIR, count_rows, resolve_data_source
from nvfp4kv.eval.lmeval_tasks import LmEvalTaskConfig, check_lm_eval_task, prepare_task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOKE_SUBJECTS = ["abstract_algebra", "high_school_geography", "marketing"]
#: file -> rows, as PROVENANCE.md documents them
EXPECTED_ROWS = {
    "gsm8k/test.jsonl": 24,
    "gsm8k/train.jsonl": 8,
    **{f"mmlu/dev/{s}_dev.csv": 5 for s in SMOKE_SUBJECTS},
    **{f"mmlu/test/{s}_test.csv": 8 for s in SMOKE_SUBJECTS},
}


def _sample_files() -> list[str]:
    return sorted(p.relative_to(SAMPLE_DIR).as_posix() for p in SAMPLE_DIR.rglob("*") if p.is_file())


@pytest.fixture
def yaml_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lm_eval_tasks"
    monkeypatch.setattr(lmeval_prepare, "task_yaml_root", lambda: root)
    return root


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything below must work without a model: loading one is an error."""
    import nvfp4kv.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(nvfp4kv.models, "load_model", refuse)


@pytest.fixture
def fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_root: Path, no_model: None) -> None:
    """No data directory, no shared/data beside the checkout, hub offline with empty caches."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(data, "_ANNOUNCED", set())


# ---------------------------------------------------------------------------- contents
def test_sample_holds_the_documented_rows_and_its_notes() -> None:
    assert _sample_files() == sorted([*EXPECTED_ROWS, "LICENSE", "PROVENANCE.md"])
    for name, rows in EXPECTED_ROWS.items():
        assert count_rows(SAMPLE_DIR / name) == rows, name
    license_text = (SAMPLE_DIR / "LICENSE").read_text()
    assert license_text.count("MIT License") == 2
    assert "Copyright (c) 2021 OpenAI" in license_text and "Copyright (c) 2020 Dan Hendrycks" in license_text
    provenance = (SAMPLE_DIR / "PROVENANCE.md").read_text()
    assert "not for published numbers" in provenance and "Never report numbers" in provenance
    assert "github.com/openai/grade-school-math" in provenance and "github.com/hendrycks/test" in provenance
    # the table's row counts and SHA-256 are those of the shipped files
    for name, rows in EXPECTED_ROWS.items():
        line = next(line for line in provenance.splitlines() if f"`{name}`" in line)
        assert f"| {rows} |" in line, name
        assert hashlib.sha256((SAMPLE_DIR / name).read_bytes()).hexdigest() in line, name


def test_sample_rows_are_well_formed() -> None:
    import csv
    import json

    for split in ("train", "test"):
        for line in (SAMPLE_DIR / "gsm8k" / f"{split}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            assert set(doc) == {"question", "answer"} and re.search(r"#### -?[\d,.]+$", doc["answer"])
    for path in (SAMPLE_DIR / "mmlu").rglob("*.csv"):
        rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
        assert all(len(r) == 6 and r[5] in "ABCD" for r in rows), path


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data to check the provenance")
def test_sample_is_the_first_rows_of_the_full_data_byte_for_byte() -> None:
    for name, rows in EXPECTED_ROWS.items():
        full = (SHARED_DATA / name).read_bytes().splitlines(keepends=True)
        assert (SAMPLE_DIR / name).read_bytes() == b"".join(full[:rows]), name


def test_package_data_ships_every_sample_file() -> None:
    """pyproject's package-data globs cover the sample, so a wheel install has it too."""
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    package_dir = Path(lmeval_tasks.__file__).resolve().parents[1]  # nvfp4kv/
    shipped = {p.resolve() for pattern in pyproject["tool"]["setuptools"]["package-data"]["nvfp4kv"]
               for p in package_dir.glob(pattern) if p.is_file()}
    missing = [name for name in _sample_files() if (SAMPLE_DIR / name).resolve() not in shipped]
    assert not missing, f"not covered by [tool.setuptools.package-data]: {missing}"


# ---------------------------------------------------------------------------- resolution
def test_fresh_clone_offline_resolves_gsm8k_and_mmlu_to_the_sample_and_lm_eval_reads_it(
        fresh_clone: None, caplog: pytest.LogCaptureFixture) -> None:
    from lm_eval.tasks import TaskManager

    caplog.set_level(logging.WARNING, logger="nvfp4kv.eval.data")
    gsm8k = check_lm_eval_task({"lm_eval_task": "gsm8k", "num_fewshot": 1}, limit=4)
    mmlu = check_lm_eval_task({"lm_eval_task": "mmlu", "subjects": SMOKE_SUBJECTS}, limit=4)
    check_lm_eval_task({"lm_eval_task": "gsm8k", "num_fewshot": 1}, limit=4)  # again: no second line

    for prepared in (gsm8k, mmlu):
        assert prepared.data_source == "embedded-sample" and prepared.source.root == SAMPLE_DIR
        assert re.fullmatch(r"[0-9a-f]{64}", prepared.data_sha256)
        assert prepared.data_identity() == {"data_source": "embedded-sample", "data_sha256": prepared.data_sha256}
        assert all(p.is_relative_to(SAMPLE_DIR) for p in prepared.data_files)
    assert gsm8k.data_sha256 != mmlu.data_sha256
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "using the embedded 24-row sample of GSM8K (quick start/tests only; not for published numbers)" in lines[0]
    assert "using the embedded 24-row sample of MMLU (quick start/tests only; not for published numbers)" in lines[1]

    tm = TaskManager(include_path=[str(gsm8k.include_dir), str(mmlu.include_dir)], include_defaults=False)
    loaded = tm.load([gsm8k.task_name, mmlu.task_name])
    task = loaded["tasks"]["gsm8k_local"]
    assert len(list(task.test_docs())) == 24 and len(list(task.fewshot_docs())) == 8
    assert task.doc_to_target(next(iter(task.test_docs()))).strip() != ""
    assert loaded["group_map"]["mmlu_local"] == [f"mmlu_local_{s}" for s in SMOKE_SUBJECTS]
    for subject in SMOKE_SUBJECTS:
        sub = loaded["tasks"][f"mmlu_local_{subject}"]
        docs = list(sub.test_docs())
        assert len(docs) == 8 and len(list(sub.fewshot_docs())) == 5
        assert all(isinstance(d["answer"], int) and len(d["choices"]) == 4 for d in docs)


def test_an_unreachable_hub_is_decided_in_one_quick_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          yaml_root: Path) -> None:
    """Not offline by environment, but nothing answers: the sample, after one short probe."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(data, "hub_endpoint", lambda: "http://127.0.0.1:9")  # discard port: refused at once
    data._probe.cache_clear()
    try:
        start = time.monotonic()
        source = resolve_data_source(None, "openai/gsm8k")
        assert source.kind == "sample" and "unreachable" in source.origin
        assert resolve_data_source(None, "cais/mmlu").kind == "sample"  # the probe is remembered
        assert time.monotonic() - start < data.HUB_PROBE_TIMEOUT_S + 0.5
        assert data._probe.cache_info().misses == 1
    finally:
        data._probe.cache_clear()


def test_precedence_data_dir_then_beside_the_checkout_then_hub_then_sample(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_clone: None) -> None:
    import huggingface_hub.constants

    copy = tmp_path / "copy"
    shutil.copytree(SAMPLE_DIR, copy)
    beside = tmp_path / "beside"
    shutil.copytree(SAMPLE_DIR, beside)
    cfg = LmEvalTaskConfig.from_dict({"lm_eval_task": "gsm8k"})

    assert prepare_task(cfg, None).data_source == "embedded-sample"
    (Path(huggingface_hub.constants.HF_HUB_CACHE) / "datasets--openai--gsm8k").mkdir(parents=True)
    hub = prepare_task(cfg, None)  # offline, but the dataset is in the hub cache
    assert hub.data_source == "hub" and hub.data_identity() == {"data_source": "hub", "data_sha256": None,
                                                                "hub_dataset": "openai/gsm8k"}
    monkeypatch.setattr(data, "shared_data_dir", lambda: beside)
    assert prepare_task(cfg, None).data_source == f"local:{beside}"
    configured = prepare_task(cfg, copy)
    assert configured.data_source == f"local:{copy}"
    monkeypatch.setenv(DATA_DIR_ENV, str(beside))
    assert prepare_task(cfg, copy).data_source == f"local:{beside}"  # the variable wins
    # the hash covers names relative to the root and content: the same rows elsewhere hash the same
    sample_hash = gsm8k_sha256(SAMPLE_DIR)
    assert configured.data_sha256 == sample_hash
    with (copy / "gsm8k" / "test.jsonl").open("a") as handle:
        handle.write('{"question": "1+1?", "answer": "#### 2"}\n')
    monkeypatch.delenv(DATA_DIR_ENV)
    assert prepare_task(cfg, copy).data_sha256 != sample_hash


def gsm8k_sha256(root: Path) -> str:
    from nvfp4kv.eval.data import files_sha256, gsm8k_files

    files = gsm8k_files(root)
    return files_sha256([files["test"], files["train"]], root)


# ---------------------------------------------------------------------------- what the sample cannot do
@pytest.mark.parametrize(("task_cfg", "limit", "pattern"), [
    ({"lm_eval_task": "gsm8k"}, None, r"limit=None asks for every document.*24-row sample of GSM8K"),
    ({"lm_eval_task": "gsm8k"}, 25, r"limit=25 .*set limit <= 24"),
    ({"lm_eval_task": "mmlu", "subjects": ["marketing"]}, 9, r"limit=9 .*set limit <= 8"),
    ({"lm_eval_task": "gsm8k", "num_fewshot": 9}, 4, r"num_fewshot=9 .*8 rows.*GSM8K train"),
    ({"lm_eval_task": "mmlu", "subjects": ["anatomy", "marketing"]}, 4,
     r"subjects: MMLU subject\(s\) \['anatomy'\] are not in the embedded sample.*abstract_algebra"),
    ({"lm_eval_task": "mmlu"}, 4, r"subjects=all asks for all 57 MMLU subjects"),
    ({"lm_eval_task": "mmlu_anatomy"}, 4, r"lm_eval_task: MMLU subject\(s\) \['anatomy'\]"),
])
def test_asking_the_sample_for_more_fails_in_one_line_naming_the_fix(
        fresh_clone: None, task_cfg: dict, limit: int | None, pattern: str) -> None:
    from nvfp4kv.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=pattern) as info:
        check_lm_eval_task(task_cfg, limit=limit)
    message = str(info.value)
    assert "\n" not in message
    assert f"{DATA_DIR_ENV}=/path/to/data" in message and "go online" in message
    assert "offline" in message  # says why only the sample is there


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_cell_on_the_sample_records_its_source_and_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          yaml_root: Path) -> None:
    import datasets.config
    import huggingface_hub.constants

    from nvfp4kv.models import load_model

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task_cfg = {"kind": "lm_eval", "name": "mmlu", "lm_eval_task": "mmlu", "num_fewshot": 1,
                "subjects": ["marketing"]}
    expected = check_lm_eval_task(task_cfg, limit=2).data_identity()
    result = lmeval_tasks.run_lm_eval_task(task_cfg, load_model({"device": "cpu"}), "nvfp4", limit=2, seed=0,
                                           progress=False)
    assert result.metrics["acc,none"].n == 2
    assert result.extra["data_source"] == "embedded-sample" and result.extra["data_sha256"] == expected["data_sha256"]
