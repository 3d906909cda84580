"""lm-eval's built-in GSM8K/MMLU tasks, and the task YAMLs that point them at local files.

With a local data directory (or the embedded sample, :mod:`nvfp4kv.eval.data`) we *generate*
task YAMLs at run time into a content-hashed include directory under
``~/.cache/nvfp4kv/lm_eval_tasks/``. Each generated task ``include:``\\ s the built-in YAML by
absolute path (so prompts, filters and metrics stay lm-eval's) and only swaps the data source,
with absolute data paths (relative ones would resolve against the CWD):

* ``gsm8k`` / ``gsm8k_cot`` / any task in lm-eval's ``gsm8k/`` folder -> ``<task>_local``:
  ``dataset_path: json`` over ``gsm8k/{train,test}.jsonl``.
* ``mmlu`` -> group ``mmlu_local`` (``acc`` aggregated over subjects weighted by size, as lm-eval's
  ``mmlu`` group does) of ``mmlu_local_<subject>`` tasks built on the built-in
  ``mmlu/default/_default_template_yaml``: ``dataset_path: csv`` over the headerless CSVs with
  ``column_names``, ``keep_default_na: false`` (pandas would otherwise turn answer options that
  read "None" into NaN; four test files have such options) and ``process_docs`` mapping
  ``question,A,B,C,D,answer-letter`` to the hub schema (``choices`` list, ``answer`` index).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.tasks
import yaml
from lm_eval.tasks._yaml_loader import load_yaml

from nvfp4kv.eval.data import gsm8k_files, mmlu_files

BUILTIN_TASKS_DIR = Path(lm_eval.tasks.__file__).resolve().parent
#: task YAMLs this package ships (indexed next to lm-eval's when the directory exists)
OWN_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GSM8K_DIR = BUILTIN_TASKS_DIR / "gsm8k"
MMLU_DIR = BUILTIN_TASKS_DIR / "mmlu" / "default"
MMLU_TEMPLATE = MMLU_DIR / "_default_template_yaml"
MMLU_CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]
GSM8K_HUB = "openai/gsm8k"
MMLU_HUB = "cais/mmlu"
_LETTERS = ("A", "B", "C", "D")
_LOCAL_TAG = "nvfp4kv_local"


# ---------------------------------------------------------------------------- built-in lookup
@functools.lru_cache(maxsize=1)
def gsm8k_builtin_tasks() -> dict[str, Path]:
    """``task name -> YAML`` for every task in lm-eval's ``gsm8k/`` folder (read once)."""
    tasks: dict[str, Path] = {}
    for path in sorted(GSM8K_DIR.glob("*.yaml")):
        name = load_yaml(path, resolve_func=False, recursive=False).get("task")
        if isinstance(name, str):
            tasks.setdefault(name, path)
    return tasks


@functools.lru_cache(maxsize=64)
def builtin_task_config(path: Path) -> dict[str, Any]:
    """A built-in task YAML with its ``include:`` chain merged (``!function`` left unresolved)."""
    return dict(load_yaml(path, resolve_func=False, recursive=True))


def mmlu_subject_descriptions() -> dict[str, str]:
    """The 57 MMLU subjects of lm-eval's default MMLU, with their prompt descriptions."""
    return dict(_mmlu_subject_descriptions())


@functools.lru_cache(maxsize=1)
def _mmlu_subject_descriptions() -> dict[str, str]:
    subjects: dict[str, str] = {}
    for path in sorted(MMLU_DIR.glob("mmlu_*.yaml")):
        cfg = load_yaml(path, resolve_func=False, recursive=False)
        subjects[cfg["dataset_name"]] = cfg["description"]
    return subjects


def is_gsm8k_task(task: str) -> bool:
    return task in gsm8k_builtin_tasks()


def is_mmlu_task(task: str) -> bool:
    return task == "mmlu" or (task.startswith("mmlu_") and task[len("mmlu_"):] in _mmlu_subject_descriptions())


def needs_data_dir(task: str) -> bool:
    """Whether ``task`` has a local-data variant (so the data directory setting matters)."""
    return is_gsm8k_task(task) or is_mmlu_task(task)


def hub_dataset_for(task: str) -> str | None:
    """The hub dataset a GSM8K/MMLU task reads (``openai/gsm8k`` / ``cais/mmlu``), else None."""
    if is_gsm8k_task(task):
        return GSM8K_HUB
    if is_mmlu_task(task):
        return MMLU_HUB
    return None


# ---------------------------------------------------------------------------- YAML generation
def process_mmlu_local_docs(dataset: Any) -> Any:
    """Map the original CSV columns (question,A,B,C,D,answer letter) to the hub schema."""

    def convert(doc: dict[str, Any]) -> dict[str, Any]:
        letter = str(doc["answer"]).strip()
        if letter not in _LETTERS:
            raise ValueError(f"MMLU answer {letter!r} is not one of A-D (question: {str(doc['question'])[:60]!r})")
        return {"question": str(doc["question"]), "choices": [str(doc[k]) for k in _LETTERS],
                "answer": _LETTERS.index(letter)}

    import datasets

    # Explicit features: without them `answer` would keep the CSV column's string type ("2", not 2).
    features = datasets.Features({"question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("int64")})
    return dataset.map(convert, remove_columns=list(dataset.column_names), features=features)


def gsm8k_local_yaml(task_name: str, data_dir: Path) -> str:
    """``<task>_local``: the built-in GSM8K task ``task_name`` reading ``data_dir/gsm8k``."""
    files = gsm8k_files(data_dir)
    cfg = {
        "include": str(gsm8k_builtin_tasks()[task_name]),
        "task": f"{task_name}_local",
        "tag": [_LOCAL_TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def mmlu_local_yaml(subject: str, data_dir: Path) -> str:
    """``mmlu_local_<subject>``: lm-eval's MMLU template reading ``data_dir/mmlu``."""
    files = mmlu_files(data_dir, subject)
    cfg = {
        "include": str(MMLU_TEMPLATE),
        "task": f"mmlu_local_{subject}",
        "task_alias": subject,
        "tag": [_LOCAL_TAG],
        "description": _mmlu_subject_descriptions()[subject],
        "dataset_path": "csv",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(path) for split, path in files.items()},
            "column_names": MMLU_CSV_COLUMNS,
            "keep_default_na": False,
        },
    }
    # yaml.safe_dump cannot emit lm-eval's !function tag; append it verbatim.
    process_docs = f"process_docs: !function {__name__}.process_mmlu_local_docs\n"
    return yaml.safe_dump(cfg, sort_keys=False) + process_docs


def group_yaml(group: str, tasks: Sequence[str]) -> str:
    """A group over ``tasks`` whose ``acc`` is the size-weighted mean (as lm-eval's ``mmlu``)."""
    return yaml.safe_dump({
        "group": group,
        "task": list(tasks),
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }, sort_keys=False)


def task_yaml_root() -> Path:
    from nvfp4kv.models import cache_root

    return cache_root() / "lm_eval_tasks"


def write_include_dir(files: dict[str, str], root: Path | None = None) -> Path:
    """Write generated YAMLs into a directory named by their content hash (reused if present).

    Written into a temporary sibling and renamed into place, so concurrent runs never see a
    half-written directory (lm-eval would index whatever YAMLs it finds).
    """
    root = root or task_yaml_root()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    target = root / digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        try:
            os.replace(tmp, target)
        except OSError:  # another process created it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
