"""Preparing an ``lm_eval`` task without a model: data source, generated YAMLs, and the checks.

:func:`prepare_task` picks the data source and writes the YAMLs its route needs, memoized;
:func:`check_lm_eval_task` runs every check a task config allows without a model (task name,
MMLU subjects, data source and files, few-shot pool, and ``limit`` against the embedded sample),
so a sweep can run it before loading anything and the run repeats it for free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval.data import (
    SAMPLE_FIX,
    DataSource,
    announce_sample,
    count_rows,
    files_sha256,
    gsm8k_files,
    mmlu_files,
    resolve_data_dir,
    resolve_data_source,
    sample_mmlu_subjects,
)
from nvfp4kv.eval.lmeval_config import LmEvalTaskConfig
from nvfp4kv.eval.local_task_yaml import (
    GSM8K_HUB,
    MMLU_HUB,
    MMLU_TEMPLATE,
    builtin_task_config,
    group_yaml,
    gsm8k_builtin_tasks,
    gsm8k_local_yaml,
    hub_dataset_for,
    is_mmlu_task,
    mmlu_local_yaml,
    needs_data_dir,
    task_yaml_root,
    write_include_dir,
)
from nvfp4kv.eval.task_checks import (
    check_fewshot_pool,
    check_mmlu_subjects,
    check_sample_capacity,
    check_task_name,
)

_DATASET_LABELS = {GSM8K_HUB: "GSM8K", MMLU_HUB: "MMLU"}


@dataclass(frozen=True)
class PreparedTask:
    """What to hand lm-eval (the top-level task/group name and where its YAMLs live), and which
    data it reads."""

    task_name: str
    include_dir: Path | None
    include_defaults: bool
    hub_dataset: str | None  # the hub dataset the task reads, for the offline error
    data_source: str  # "hub", "local:<dir>", "embedded-sample", or "lm_eval" (lm-eval's own data)
    source: DataSource | None = None
    eval_files: tuple[Path, ...] = ()  # test split per (sub)task, local routes only
    fewshot_files: tuple[Path, ...] = ()  # few-shot pool per (sub)task, local routes only
    data_sha256: str | None = None  # over eval_files + fewshot_files (names relative to the root)

    @property
    def data_files(self) -> tuple[Path, ...]:
        return self.eval_files + self.fewshot_files

    def data_identity(self) -> dict[str, Any]:
        """What a run identity / cell record needs about the data: ``data_source`` (``hub``,
        ``local:<dir>``, ``embedded-sample``, ``lm_eval``), ``data_sha256`` (None for the hub and
        lm-eval's own data), and the ``hub_dataset`` id on the hub route."""
        identity: dict[str, Any] = {"data_source": self.data_source, "data_sha256": self.data_sha256}
        if self.hub_dataset:
            identity["hub_dataset"] = self.hub_dataset
        return identity


_PREPARED: dict[tuple[Any, ...], PreparedTask] = {}


def _sample_note(source: DataSource, dataset: str, rows: int) -> str:
    return (f"only the embedded {rows}-row sample of {_DATASET_LABELS.get(dataset, dataset)} ({dataset}) "
            f"is available ({source.origin})")


def _prepare(task: str, subjects: tuple[str, ...] | None, all_subjects: bool, source: DataSource,
             key: str) -> PreparedTask:
    if source.kind == "hub":
        if task == "mmlu" and not all_subjects:
            group = "mmlu_hub_subset"
            files = {f"_{group}.yaml": group_yaml(group, [f"mmlu_{s}" for s in subjects or ()])}
            return PreparedTask(group, write_include_dir(files, task_yaml_root()), True, MMLU_HUB, "hub", source)
        return PreparedTask(task, None, True, hub_dataset_for(task), "hub", source)

    root = source.root
    assert root is not None
    if subjects is None:  # GSM8K
        split_files = gsm8k_files(root)
        text = gsm8k_local_yaml(task, root)
        prepared_files = {f"{task}_local.yaml": text}
        top = f"{task}_local"
        eval_files, fewshot_files = (split_files["test"],), (split_files["train"],)
    else:
        if source.is_sample:
            have = sample_mmlu_subjects()
            missing = [s for s in subjects if s not in have]
            if missing:
                what = ("subjects=all asks for all 57 MMLU subjects, but they are" if task == "mmlu" and all_subjects
                        else f"{key}: MMLU subject(s) {missing} are")
                raise DatasetNotFoundError(
                    f"{what} not in the embedded sample, which has only {', '.join(have)} ({source.origin}); "
                    f"pick from those, or {SAMPLE_FIX}."
                )
        per_subject = {s: mmlu_files(root, s) for s in subjects}
        prepared_files = {f"mmlu_local_{s}.yaml": mmlu_local_yaml(s, root) for s in subjects}
        if task == "mmlu":
            prepared_files["_mmlu_local.yaml"] = group_yaml("mmlu_local", [f"mmlu_local_{s}" for s in subjects])
            top = "mmlu_local"
        else:
            top = f"mmlu_local_{subjects[0]}"
        eval_files = tuple(f["test"] for f in per_subject.values())
        fewshot_files = tuple(f["dev"] for f in per_subject.values())
    return PreparedTask(
        top, write_include_dir(prepared_files, task_yaml_root()), False, None, source.label, source,
        eval_files, fewshot_files, files_sha256(eval_files + fewshot_files, root),
    )


def prepare_task(cfg: LmEvalTaskConfig, data_dir: str | Path | None = None) -> PreparedTask:
    """Pick the data source (:func:`~nvfp4kv.eval.data.resolve_data_source`; ``data_dir`` is the
    configured directory, ``$NVFP4KV_DATA_DIR`` still wins, ``None`` goes on to the directory
    beside the checkout, the hub, the embedded sample) and generate the YAMLs that route needs.

    Memoized by (task, subjects, data source, YAML root): validation and the run (and every KV
    config of a sweep) share one preparation; a hit costs env checks and a stat per data file.
    Raises :class:`ConfigError` for an unknown MMLU subject and :class:`DatasetNotFoundError`
    for missing files, or subjects the embedded sample lacks.
    """
    task = cfg.lm_eval_task
    dataset = hub_dataset_for(task)
    if dataset is None:
        return PreparedTask(task, None, True, None, "lm_eval")
    subjects: tuple[str, ...] | None = None
    key = "lm_eval_task"
    if is_mmlu_task(task):
        requested = cfg.subjects if task == "mmlu" else (task[len("mmlu_"):],)
        key = "subjects" if task == "mmlu" else "lm_eval_task"
        subjects = tuple(check_mmlu_subjects(requested, key=key))
    all_subjects = task != "mmlu" or cfg.subjects is None
    source = resolve_data_source(data_dir, dataset)
    memo_key = (task, subjects, all_subjects, source.kind, str(source.root), str(task_yaml_root()))
    prepared = _PREPARED.get(memo_key)
    if prepared is None or (prepared.include_dir is not None and not prepared.include_dir.is_dir()) \
            or not all(p.is_file() for p in prepared.data_files):
        prepared = _PREPARED[memo_key] = _prepare(task, subjects, all_subjects, source, key)
    elif prepared.data_files and source.root is not None:
        # the YAMLs name files, not contents: only the fingerprint can go stale (memoized per file stat)
        digest = files_sha256(prepared.data_files, source.root)
        if digest != prepared.data_sha256:
            prepared = _PREPARED[memo_key] = dataclasses.replace(prepared, data_sha256=digest)
    if source.is_sample:
        announce_sample(_DATASET_LABELS[dataset], sum(count_rows(p) for p in prepared.eval_files), source.origin)
    return prepared


def _default_num_fewshot(task: str) -> int:
    if task in gsm8k_builtin_tasks():
        return int(builtin_task_config(gsm8k_builtin_tasks()[task]).get("num_fewshot") or 0)
    return int(builtin_task_config(MMLU_TEMPLATE).get("num_fewshot") or 0)


def _uses_fewshot_split(task: str) -> bool:
    path = gsm8k_builtin_tasks().get(task, MMLU_TEMPLATE)
    return builtin_task_config(path).get("fewshot_split") is not None


def check_rows(cfg: LmEvalTaskConfig, prepared: PreparedTask, limit: int | None) -> None:
    """The few-shot pool holds ``num_fewshot`` examples, and, when the task reads the embedded
    sample, ``limit`` asks for no more documents per (sub)task than it has (``None`` = all is too
    many). Nothing to check on the hub route or for lm-eval's own data."""
    source = prepared.source
    if source is None or source.kind == "hub" or not prepared.eval_files:
        return
    dataset = hub_dataset_for(cfg.lm_eval_task) or ""
    note = _sample_note(source, dataset, sum(count_rows(p) for p in prepared.eval_files)) if source.is_sample else ""
    shots = cfg.num_fewshot if cfg.num_fewshot is not None else _default_num_fewshot(cfg.lm_eval_task)
    if shots and prepared.fewshot_files and _uses_fewshot_split(cfg.lm_eval_task):
        pool = min(count_rows(p) for p in prepared.fewshot_files)
        what = "GSM8K train split" if dataset == GSM8K_HUB else "MMLU dev split, per subject"
        check_fewshot_pool(shots, pool, what=what, sample=source.is_sample, sample_note=note)
    if source.is_sample:
        check_sample_capacity(limit, min(count_rows(p) for p in prepared.eval_files), sample_note=note)


def check_lm_eval_task(task_cfg: Mapping[str, Any], *, limit: int | None = None) -> PreparedTask:
    """Every check an ``lm_eval`` task config allows without a model; returns the prepared task.

    In order: config keys, ``loglikelihood_mode``, ``num_fewshot``, the task name (GSM8K/MMLU
    directly, other names against lm-eval's registry, cached), ``subjects`` (MMLU only, each one of
    the 57), the data source and its files, the few-shot pool, and ``limit`` (the sweep's
    effective limit for this task) against the embedded sample. Each failure is one
    :class:`ConfigError` / :class:`DatasetNotFoundError` line naming the key and the fix.
    ``result.data_identity()`` is what a run identity needs about the data.
    """
    from nvfp4kv.eval.lm import LOGLIKELIHOOD_MODES

    cfg = LmEvalTaskConfig.from_dict(task_cfg)
    if cfg.loglikelihood_mode not in LOGLIKELIHOOD_MODES:
        raise ConfigError(f"loglikelihood_mode={cfg.loglikelihood_mode!r}; use one of {', '.join(LOGLIKELIHOOD_MODES)}.")
    check_task_name(cfg.lm_eval_task)
    if cfg.subjects is not None and cfg.lm_eval_task != "mmlu":
        raise ConfigError(f"subjects={list(cfg.subjects)} only applies to lm_eval_task: mmlu (this task is "
                          f"{cfg.lm_eval_task!r}); drop subjects, or set lm_eval_task: mmlu.")
    prepared = prepare_task(cfg, resolve_data_dir(cfg.data_dir) if needs_data_dir(cfg.lm_eval_task) else None)
    check_rows(cfg, prepared, limit)
    return prepared


def task_data_identity(task_cfg: Mapping[str, Any], *, limit: int | None = None) -> dict[str, Any]:
    """``{"data_source": ..., "data_sha256": ..., ["hub_dataset": ...]}`` for an ``lm_eval`` task
    config (see :meth:`PreparedTask.data_identity`); runs :func:`check_lm_eval_task`."""
    return check_lm_eval_task(task_cfg, limit=limit).data_identity()
