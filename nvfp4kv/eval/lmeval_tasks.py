"""Task kind ``lm_eval``: run an lm-eval task (GSM8K, MMLU, RULER, ...) for one cell.

GSM8K and MMLU data come from the first of: a configured data directory (``$NVFP4KV_DATA_DIR`` /
``data_dir``), ``shared/data`` beside the checkout, the hub, and, with the hub offline or
unreachable, the small sample this package embeds (quick start and tests only); the order and
its reasons are in :mod:`nvfp4kv.eval.data`. The hub route runs lm-eval's built-in tasks
unchanged; the local routes run generated task YAMLs that include the built-in ones and swap
only the data files (:mod:`nvfp4kv.eval.local_task_yaml`). ``subjects: [...]`` picks an MMLU
subset (hub too, via a generated group over ``mmlu_<subject>``).

Other tasks (e.g. RULER ``niah_single_1``, which synthesises its data from a tokenizer) run as
lm-eval defines them; ``metadata`` from the task config goes to the TaskManager together with
``pretrained=<tokenizer dir>``.

:func:`check_lm_eval_task` checks a task config without a model (task name, MMLU subjects, data
source and files, few-shot pool, and ``limit`` against the embedded sample), so a sweep can run it
before loading anything; :func:`prepare_task` is memoized, so the run repeats it for free.

Sample selection: lm-eval's ``limit=N`` takes the first N documents of each (sub)task in dataset
order: deterministic, identical across KV formats (so samples pair up), and independent of the
seed. ``seed`` seeds Python/NumPy/torch and lm-eval's few-shot sampler (GSM8K draws its 5 shots
at random from train; MMLU takes the first dev rows).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind
from nvfp4kv.eval.data import (
    SAMPLE_FIX,
    DataSource,
    announce_sample,
    count_rows,
    files_sha256,
    gsm8k_files,
    hub_is_offline,
    mmlu_files,
    offline_hub_error,
    resolve_data_dir,
    resolve_data_source,
    sample_mmlu_subjects,
)
from nvfp4kv.eval.local_task_yaml import (  # noqa: F401  (re-exported: the public names of this module)
    BUILTIN_TASKS_DIR,
    GSM8K_HUB,
    MMLU_CSV_COLUMNS,
    MMLU_HUB,
    MMLU_TEMPLATE,
    OWN_TASKS_DIR,
    builtin_task_config,
    gsm8k_builtin_tasks,
    gsm8k_local_yaml,
    group_yaml,
    hub_dataset_for,
    is_mmlu_task,
    mmlu_local_yaml,
    mmlu_subject_descriptions,
    needs_data_dir,
    process_mmlu_local_docs,
    task_yaml_root,
    write_include_dir,
)
from nvfp4kv.eval.task_checks import (
    check_fewshot_pool,
    check_mmlu_subjects,
    check_num_fewshot,
    check_sample_capacity,
    check_task_name,
)
from nvfp4kv.errors import ConfigError, DatasetNotFoundError

#: task_cfg keys this runner reads (others, like ``kind``/``name``, belong to the runner)
TASK_CONFIG_KEYS = (
    "kind", "name", "lm_eval_task", "num_fewshot", "metrics", "gen_kwargs", "subjects", "metadata",
    "data_dir", "loglikelihood_mode", "bootstrap_iters", "apply_chat_template", "fewshot_as_multiturn",
    "system_instruction", "batch_size",
)
_DATASET_LABELS = {GSM8K_HUB: "GSM8K", MMLU_HUB: "MMLU"}


# ---------------------------------------------------------------------------- task config
def to_plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig (also nested) as plain dicts/lists, so lm-eval and JSON see
    ordinary containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class LmEvalTaskConfig:
    """The validated ``task_cfg`` of an ``lm_eval`` cell."""

    name: str
    lm_eval_task: str
    num_fewshot: int | None = None
    metrics: tuple[str, ...] | None = None
    gen_kwargs: dict[str, Any] | None = None
    subjects: tuple[str, ...] | None = None  # None = all (MMLU only)
    metadata: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    loglikelihood_mode: str = "decode_faithful"
    bootstrap_iters: int = 100000
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    batch_size: int = 1

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> LmEvalTaskConfig:
        cfg = to_plain(dict(cfg))
        unknown = sorted(set(cfg) - set(TASK_CONFIG_KEYS))
        if unknown:
            hints = {k: difflib.get_close_matches(k, TASK_CONFIG_KEYS, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} -> did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ConfigError(f"Unknown key(s) {unknown} in lm_eval task config{f' ({hint})' if hint else ''}; "
                              f"allowed: {list(TASK_CONFIG_KEYS)}.")
        name = cfg.get("name") or cfg.get("lm_eval_task")
        if not name:
            raise ConfigError("An lm_eval task config needs `lm_eval_task:` (e.g. gsm8k, mmlu, niah_single_1).")
        subjects = cfg.get("subjects")
        if subjects in (None, "all", ["all"]):
            subjects = None
        elif isinstance(subjects, str):
            subjects = [subjects]
        metrics = cfg.get("metrics")
        return cls(
            name=str(name),
            lm_eval_task=str(cfg.get("lm_eval_task") or name),
            num_fewshot=check_num_fewshot(cfg.get("num_fewshot")),
            metrics=tuple(metrics) if metrics else None,
            gen_kwargs=dict(cfg["gen_kwargs"]) if cfg.get("gen_kwargs") else None,
            subjects=tuple(subjects) if subjects is not None else None,
            metadata=dict(cfg.get("metadata") or {}),
            data_dir=cfg.get("data_dir"),
            loglikelihood_mode=cfg.get("loglikelihood_mode", "decode_faithful"),
            bootstrap_iters=int(cfg.get("bootstrap_iters", 100000)),
            apply_chat_template=bool(cfg.get("apply_chat_template", False)),
            fewshot_as_multiturn=bool(cfg.get("fewshot_as_multiturn", False)),
            system_instruction=cfg.get("system_instruction"),
            batch_size=int(cfg.get("batch_size", 1)),
        )


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


# ---------------------------------------------------------------------------- preparation
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


# ---------------------------------------------------------------------------- running
_TASK_MANAGERS: dict[str, TaskManager] = {}


def _task_manager(prepared: PreparedTask, metadata: dict[str, Any]) -> TaskManager:
    """TaskManagers are cached: indexing lm-eval's built-in tasks costs ~7 s on a CPU."""
    include = [str(p) for p in (OWN_TASKS_DIR if prepared.include_defaults and OWN_TASKS_DIR.is_dir() else None,
                                prepared.include_dir) if p is not None]
    key = json.dumps([include, prepared.include_defaults, metadata], sort_keys=True, default=str)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(
            include_path=include or None,
            include_defaults=prepared.include_defaults,
            metadata=metadata or None,
        )
    return _TASK_MANAGERS[key]


def _load_task(tm: TaskManager, prepared: PreparedTask) -> Any:
    """Build the Task/Group object now, so a data problem surfaces with a useful message."""
    try:
        loaded = tm.load([prepared.task_name])
    except KeyError as err:
        raise ConfigError(f"lm-eval does not know task {prepared.task_name!r} ({err}); check `lm_eval_task:`.") from err
    except DatasetNotFoundError:
        raise
    except Exception as err:
        if prepared.hub_dataset is not None and hub_is_offline():
            raise offline_hub_error(prepared.hub_dataset, err) from err
        raise
    return loaded["groups"].get(prepared.task_name) or loaded["tasks"][prepared.task_name]


def _tokenizer_dir(bundle: Any) -> str:
    from nvfp4kv.models import resolve_path

    return str(getattr(bundle.tokenizer, "name_or_path", "") or resolve_path(bundle.spec.name_or_path))


@register_task_kind("lm_eval")
def run_lm_eval_task(
    task_cfg: dict[str, Any],
    bundle: Any,
    kv: Any,
    *,
    limit: int | None,
    seed: int,
    lm: Any | None = None,
    progress: bool = True,
) -> CellResult:
    """Evaluate one (model, lm-eval task, KV config) cell.

    ``task_cfg`` keys (only ``lm_eval_task`` is required):

    - ``name``: the cell's task name (default: ``lm_eval_task``); ``kind: lm_eval``.
    - ``lm_eval_task``: an lm-eval task or group: ``gsm8k``, ``gsm8k_cot``, ``mmlu``,
      ``mmlu_<subject>``, ``niah_single_1``, ...
    - ``num_fewshot``: overrides the task's default (None keeps it: 5 for gsm8k, 0 for mmlu).
    - ``metrics``: keep only these (``"exact_match,strict-match"`` or a bare ``"exact_match"``);
      default: every numeric metric lm-eval reports.
    - ``gen_kwargs``: merged into the task's generation kwargs (``{max_gen_toks: 256}``).
    - ``subjects``: MMLU subset (list) or ``all`` (default).
    - ``metadata``: TaskManager metadata for lm-eval-defined tasks (RULER: ``max_seq_lengths``);
      ``pretrained`` defaults to the model's tokenizer directory.
    - ``data_dir``: local data directory (``$NVFP4KV_DATA_DIR`` wins); unset: ``shared/data``
      beside the checkout, else the hub, else (hub offline) the embedded sample.
    - ``loglikelihood_mode``: ``decode_faithful`` (default) | ``all_quantized`` | ``raw_prefill``.
    - ``bootstrap_iters`` (100000; only non-mean aggregations bootstrap), ``apply_chat_template``
      (False), ``fewshot_as_multiturn`` (False), ``system_instruction`` (None), ``batch_size`` (1).

    ``limit`` takes the first N documents of each (sub)task; ``seed`` seeds everything lm-eval
    seeds. ``lm`` reuses a :class:`~nvfp4kv.eval.lm.KVQuantLM` across cells (``set_kv`` is called).
    Metric keys are lm-eval's (``acc,none``, ``exact_match,strict-match``); samples have
    ``doc_id`` (``"<subtask>:<id>"`` for groups), ``subtask``, ``metrics``, ``target``,
    ``prediction`` (generated text, or the argmax choice index) and ``filtered`` (per filter).
    ``extra`` records ``data_source`` (``hub`` / ``local:<dir>`` / ``embedded-sample`` / ``lm_eval``)
    and ``data_sha256`` (:meth:`PreparedTask.data_identity`).
    """
    cfg = LmEvalTaskConfig.from_dict(task_cfg)
    # memoized: free when the sweep ran check_lm_eval_task; fails in ms, before lm-eval indexes its tasks
    prepared = prepare_task(cfg, resolve_data_dir(cfg.data_dir) if needs_data_dir(cfg.lm_eval_task) else None)
    check_rows(cfg, prepared, limit)
    from lm_eval.evaluator import simple_evaluate

    from nvfp4kv.eval.lm import KVQuantLM

    if lm is None:
        lm = KVQuantLM.from_bundle(bundle, kv, loglikelihood_mode=cfg.loglikelihood_mode,
                                   progress=progress, batch_size=cfg.batch_size)
    else:
        lm.set_kv(kv, cfg.loglikelihood_mode)
        lm.progress = progress
    metadata = {"pretrained": _tokenizer_dir(bundle), **cfg.metadata} if prepared.include_defaults else {}
    tm = _task_manager(prepared, metadata)
    task_obj = _load_task(tm, prepared)
    stats_before = dict(lm.stats)
    output = simple_evaluate(
        model=lm,
        tasks=[task_obj],
        num_fewshot=cfg.num_fewshot,
        limit=limit,
        log_samples=True,
        task_manager=tm,
        gen_kwargs=cfg.gen_kwargs,
        bootstrap_iters=cfg.bootstrap_iters,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        system_instruction=cfg.system_instruction,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if output is None:  # non-zero rank in a distributed launch
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    leaves = _leaf_tasks(output, prepared.task_name)
    metrics = _metrics(output, prepared.task_name, leaves, cfg.metrics)
    samples = _samples(output, leaves)
    extra = {
        "lm_eval_task": prepared.task_name,
        **prepared.data_identity(),
        "loglikelihood_mode": lm.loglikelihood_mode,
        "num_fewshot": {t: output.get("n-shot", {}).get(t) for t in leaves},
        "limit": limit,
        "seed": seed,
        "lm_stats": {k: v - stats_before.get(k, 0) for k, v in lm.stats.items() if v != stats_before.get(k, 0)},
    }
    if len(leaves) > 1 or leaves != [prepared.task_name]:
        extra["subtasks"] = {t: {k: vars(v) for k, v in _metrics(output, t, [t], cfg.metrics).items()} for t in leaves}
    return CellResult(metrics=metrics, samples=samples, extra=_jsonable(extra))



# ---------------------------------------------------------------------------- result extraction
def _leaf_tasks(output: dict[str, Any], top: str) -> list[str]:
    """The leaf tasks under ``top`` (itself if it is a task)."""
    groups = output.get("group_subtasks", {})
    if top not in groups:
        return [top]
    leaves: list[str] = []
    for child in groups[top]:
        leaves.extend(_leaf_tasks(output, child))
    return leaves


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _metrics(output: dict[str, Any], top: str, leaves: list[str],
             wanted: tuple[str, ...] | None) -> dict[str, MetricValue]:
    row = output["results"].get(top) or output.get("groups", {}).get(top)
    if row is None:
        raise RuntimeError(f"lm-eval returned no results for {top!r}; got {sorted(output['results'])}")
    n_samples = output.get("n-samples", {})
    n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves) or None
    metrics: dict[str, MetricValue] = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        number = _number(value)
        if number is None or number == -1.0:  # RULER reports -1 for lengths it did not run
            continue
        name, _, filter_name = key.partition(",")
        stderr = _number(row.get(f"{name}_stderr,{filter_name}"))
        metrics[key] = MetricValue(value=number, stderr=stderr, n=n)
    if wanted:
        chosen = {k: v for k, v in metrics.items() if k in wanted or k.split(",")[0] in wanted}
        missing = [w for w in wanted if not any(k == w or k.split(",")[0] == w for k in chosen)]
        if missing:
            raise ConfigError(f"Metric(s) {missing} not produced by {top!r}; available: {sorted(metrics)}.")
        metrics = chosen
    return metrics


def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars/arrays and tuples from lm-eval become floats/lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    from lm_eval.utils import handle_non_serializable

    return _jsonable(handle_non_serializable(value))


def _prediction(sample: dict[str, Any]) -> Any:
    """A human-readable prediction: generated text, or the argmax choice of a loglikelihood task."""
    resps = sample.get("filtered_resps")
    if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 and isinstance(resps[0][1], bool):
        logprobs = [float(r[0]) for r in resps]
        return max(range(len(logprobs)), key=logprobs.__getitem__)
    raw = sample.get("resps")
    if raw and isinstance(raw[0], (list, tuple)) and raw[0] and isinstance(raw[0][0], str):
        return raw[0][0]
    return resps[0] if isinstance(resps, list) and len(resps) == 1 else resps


def _samples(output: dict[str, Any], leaves: list[str]) -> list[dict[str, Any]]:
    """One record per document: metrics of every filter merged, keyed ``metric,filter``."""
    records: list[dict[str, Any]] = []
    qualify = len(leaves) > 1
    for task in leaves:
        by_doc: dict[Any, dict[str, Any]] = {}
        for sample in output.get("samples", {}).get(task, []):
            doc_id = sample["doc_id"]
            record = by_doc.setdefault(doc_id, {
                "doc_id": f"{task}:{doc_id}" if qualify else doc_id,
                "subtask": task,
                "metrics": {},
                "target": _jsonable(sample.get("target")),
                "prediction": _jsonable(_prediction(sample)),
                "filtered": {},
            })
            filter_name = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                value = _number(sample.get(metric))
                if value is not None and value != -1.0:
                    record["metrics"][f"{metric},{filter_name}"] = value
            record["filtered"][filter_name] = _jsonable(sample.get("filtered_resps"))
        records.extend(by_doc.values())
    return records
