"""Model-free checks of an ``lm_eval`` task config: each fails in milliseconds with one line that
names the config key and the fix, instead of a traceback after the model has loaded.

* :func:`check_task_name`: the task exists. GSM8K/MMLU names are checked against lm-eval's YAMLs
  directly; any other name against lm-eval's task registry plus this package's own task YAMLs
  (:func:`lm_eval_task_names`: building lm-eval's ``TaskManager`` index costs ~7 s, so the name
  list is cached in the process and on disk, keyed by the lm-eval version).
* :func:`check_mmlu_subjects`: every subject is one of MMLU's 57 (close matches suggested).
* :func:`check_num_fewshot` / :func:`check_sample_capacity`: the few-shot pool holds enough
  examples, and a run that only has the embedded sample asks for no more rows than it holds
  (a ``sampling: seeded`` draw of ``limit`` documents per (sub)task is held to the same bound).
* :func:`check_sampling`: ``sampling`` is one of ``first`` / ``seeded``.

:func:`nvfp4kv.eval.lmeval_tasks.check_lm_eval_task` runs them all, with the data checks.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.results import atomic_write_text

_NAMES_CACHE_DIR = "lm_eval_task_names"


# ---------------------------------------------------------------------------- helpers
def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``word`` (difflib), best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    return f"did you mean {', '.join(matches)}? " if matches else ""


# ---------------------------------------------------------------------------- task names
def _names_cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from nvfp4kv.eval.local_task_yaml import BUILTIN_TASKS_DIR, OWN_TASKS_DIR

    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - imported above, so installed
        lm_eval_version = "unknown"
    own = sorted((str(p.relative_to(OWN_TASKS_DIR)), p.stat().st_mtime_ns)
                 for p in OWN_TASKS_DIR.rglob("*.yaml")) if OWN_TASKS_DIR.is_dir() else []
    key = [lm_eval_version, str(BUILTIN_TASKS_DIR), BUILTIN_TASKS_DIR.stat().st_mtime_ns, own]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _names_cache_file() -> Path:
    from nvfp4kv.models import cache_root

    return cache_root() / _NAMES_CACHE_DIR / f"{_names_cache_key()}.json"


@functools.lru_cache(maxsize=1)
def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows, plus this package's own task YAMLs.

    Cached in the process and in ``~/.cache/nvfp4kv/lm_eval_task_names/`` (keyed by the lm-eval
    version and our YAMLs), so only the first call on a machine pays for the ``TaskManager`` index.
    """
    cache_file = _names_cache_file()
    try:
        return frozenset(json.loads(cache_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    from nvfp4kv.eval.local_task_yaml import OWN_TASKS_DIR

    include = str(OWN_TASKS_DIR) if OWN_TASKS_DIR.is_dir() else None
    names = frozenset(TaskManager(include_path=include, include_defaults=True).all_tasks)
    try:  # best effort: a read-only home only costs the next process the index again
        atomic_write_text(cache_file, json.dumps(sorted(names)))
    except OSError:
        pass
    return names


def is_known_builtin(task: str) -> bool:
    """GSM8K/MMLU names this package handles itself (no registry look-up needed)."""
    from nvfp4kv.eval.local_task_yaml import needs_data_dir

    return needs_data_dir(task)


def check_task_name(task: str, key: str = "lm_eval_task") -> None:
    """Raise :class:`ConfigError` unless ``task`` is a GSM8K/MMLU task, or in lm-eval's registry
    (or this package's task YAMLs)."""
    if not task or not isinstance(task, str):
        raise ConfigError(f"{key} is empty; name an lm-eval task (gsm8k, mmlu, niah_single_1, ...).")
    if is_known_builtin(task):
        return
    names = lm_eval_task_names()
    if task in names:
        return
    raise ConfigError(
        f"{key}={task!r} is not an lm-eval task; {_did_you_mean(task, names)}"
        f"Fix {key}: (`lm-eval ls tasks` lists the names lm-eval knows)."
    )


# ---------------------------------------------------------------------------- MMLU subjects
def check_mmlu_subjects(requested: Sequence[str] | None, key: str = "subjects") -> list[str]:
    """The requested MMLU subjects, de-duplicated in order (``None`` = all 57, sorted).

    Raises :class:`ConfigError` naming each unknown subject with its close matches."""
    from nvfp4kv.eval.local_task_yaml import mmlu_subject_descriptions

    known = mmlu_subject_descriptions()
    if requested is None:
        return sorted(known)
    if not requested:
        raise ConfigError(f"{key}=[] selects no MMLU subject; list some, or use {key}: all.")
    unknown = [s for s in requested if s not in known]
    if unknown:
        hints = "; ".join(f"{s!r}: {_did_you_mean(s, known).strip() or 'no close match'}" for s in unknown)
        raise ConfigError(
            f"{key}: unknown MMLU subject(s) {unknown} ({hints}). Fix {key}: with names from MMLU's "
            f"57 subjects (e.g. {', '.join(sorted(known)[:3])}, ...), or {key}: all."
        )
    return list(dict.fromkeys(requested))


# ---------------------------------------------------------------------------- rows
def check_num_fewshot(value: Any, key: str = "num_fewshot") -> int | None:
    """``None`` (the task's default) or an int >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r}: a number of few-shot examples >= 0, or null for the task's default.")
    return value


def check_sampling(value: Any, key: str = "sampling") -> str:
    """``first`` (the default; also for ``None``) or ``seeded``; anything else is one :class:`ConfigError`."""
    from nvfp4kv.config.choices import LM_EVAL_SAMPLINGS

    if value is None:
        return LM_EVAL_SAMPLINGS[0]
    if isinstance(value, str) and value in LM_EVAL_SAMPLINGS:
        return str(value)
    raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(LM_EVAL_SAMPLINGS)} "
                      f"(first: the first `limit` documents of each (sub)task; seeded: a seeded draw of them).")


def check_fewshot_pool(num_fewshot: int, pool_rows: int, *, what: str, sample: bool, sample_note: str = "",
                       key: str = "num_fewshot") -> None:
    """``num_fewshot`` examples must fit in the smallest few-shot pool (``pool_rows``)."""
    if num_fewshot <= pool_rows:
        return
    if sample:
        from nvfp4kv.eval.data import SAMPLE_FIX

        raise DatasetNotFoundError(
            f"{key}={num_fewshot} needs more few-shot examples than the {pool_rows} rows of its pool "
            f"({what}): {sample_note}. Set {key} <= {pool_rows}, or {SAMPLE_FIX}."
        )
    raise ConfigError(f"{key}={num_fewshot}: the few-shot pool ({what}) has only {pool_rows} rows; "
                      f"set {key} <= {pool_rows}.")


def check_sample_capacity(limit: int | None, rows: int, *, sample_note: str, key: str = "limit") -> None:
    """With only the embedded sample, ``limit`` must be a number of documents it holds (whichever
    documents ``sampling`` takes: the first ``limit`` or a seeded draw of ``limit`` per (sub)task)."""
    if limit is not None and limit <= rows:
        return
    from nvfp4kv.eval.data import SAMPLE_FIX

    asked = "every document" if limit is None else f"{limit} documents per (sub)task"
    raise DatasetNotFoundError(
        f"{key}={limit} asks for {asked}, but {sample_note}: set {key} <= {rows} for a quick test, "
        f"or {SAMPLE_FIX}."
    )
