"""Task kind ``lm_eval``: run an lm-eval task (GSM8K, MMLU, RULER, ...) for one cell.

Data comes from the hub by default (lm-eval's built-in tasks unchanged). With a local data
directory (:mod:`nvfp4kv.eval.data`) we *generate* task YAMLs at run time into a content-hashed
include directory under ``~/.cache/nvfp4kv/lm_eval_tasks/``. Each generated task ``include:``\\ s the
built-in YAML by absolute path (so prompts, filters and metrics stay lm-eval's) and only swaps the
data source, with absolute data paths (relative ones would resolve against the CWD):

* ``gsm8k`` / ``gsm8k_cot`` / any task in lm-eval's ``gsm8k/`` folder -> ``<task>_local``:
  ``dataset_path: json`` over ``gsm8k/{train,test}.jsonl``.
* ``mmlu`` -> group ``mmlu_local`` (``acc`` aggregated over subjects weighted by size, as lm-eval's
  ``mmlu`` group does) of ``mmlu_local_<subject>`` tasks built on the built-in
  ``mmlu/default/_default_template_yaml``: ``dataset_path: csv`` over the headerless CSVs with
  ``column_names``, ``keep_default_na: false`` (pandas would otherwise turn answer options that
  read "None" into NaN; four test files have such options) and ``process_docs`` mapping
  ``question,A,B,C,D,answer-letter`` to the hub schema (``choices`` list, ``answer`` index).
  ``subjects: [...]`` picks a subset (hub too, via a generated group over ``mmlu_<subject>``).

Other tasks (e.g. RULER ``niah_single_1``, which synthesises its data from a tokenizer) run as
lm-eval defines them; ``metadata`` from the task config goes to the TaskManager together with
``pretrained=<tokenizer dir>``.

Sample selection: lm-eval's ``limit=N`` takes the first N documents of each (sub)task in dataset
order: deterministic, identical across KV formats (so samples pair up), and independent of the
seed. ``seed`` seeds Python/NumPy/torch and lm-eval's few-shot sampler (GSM8K draws its 5 shots
at random from train; MMLU takes the first dev rows).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.tasks
import yaml
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind
from nvfp4kv.eval.data import (
    gsm8k_files,
    hub_dataset_cached,
    hub_is_offline,
    mmlu_files,
    offline_hub_error,
    resolve_data_dir,
)
from nvfp4kv.errors import ConfigError, DatasetNotFoundError

BUILTIN_TASKS_DIR = Path(lm_eval.tasks.__file__).resolve().parent
_GSM8K_DIR = BUILTIN_TASKS_DIR / "gsm8k"
_MMLU_DIR = BUILTIN_TASKS_DIR / "mmlu" / "default"
_MMLU_TEMPLATE = _MMLU_DIR / "_default_template_yaml"
MMLU_CSV_COLUMNS = ["question", "A", "B", "C", "D", "answer"]
_LETTERS = ("A", "B", "C", "D")
_LOCAL_TAG = "nvfp4kv_local"

#: task_cfg keys this runner reads (others, like ``kind``/``name``, belong to the runner)
TASK_CONFIG_KEYS = (
    "kind", "name", "lm_eval_task", "num_fewshot", "metrics", "gen_kwargs", "subjects", "metadata",
    "data_dir", "loglikelihood_mode", "bootstrap_iters", "apply_chat_template", "fewshot_as_multiturn",
    "system_instruction", "batch_size",
)


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
    def from_dict(cls, cfg: dict[str, Any]) -> LmEvalTaskConfig:
        cfg = to_plain(cfg)
        unknown = sorted(set(cfg) - set(TASK_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"Unknown key(s) {unknown} in lm_eval task config; allowed: {list(TASK_CONFIG_KEYS)}.")
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
            num_fewshot=cfg.get("num_fewshot"),
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
    """What to hand lm-eval: the top-level task/group name and where its YAMLs live."""

    task_name: str
    include_dir: Path | None
    include_defaults: bool
    hub_dataset: str | None  # the hub dataset the task reads, for the offline error
    data_source: str  # "hub" or "local:<dir>"


# ---------------------------------------------------------------------------- built-in lookup
def _builtin_yaml_for(folder: Path, task_name: str) -> Path | None:
    for path in sorted(folder.glob("*.yaml")):
        if load_yaml(path, resolve_func=False, recursive=False).get("task") == task_name:
            return path
    return None


def mmlu_subject_descriptions() -> dict[str, str]:
    """The 57 MMLU subjects of lm-eval's default MMLU, with their prompt descriptions."""
    return dict(_mmlu_subject_descriptions())


@functools.lru_cache(maxsize=1)
def _mmlu_subject_descriptions() -> dict[str, str]:
    subjects: dict[str, str] = {}
    for path in sorted(_MMLU_DIR.glob("mmlu_*.yaml")):
        cfg = load_yaml(path, resolve_func=False, recursive=False)
        subjects[cfg["dataset_name"]] = cfg["description"]
    return subjects


def _is_gsm8k_task(task: str) -> bool:
    return _builtin_yaml_for(_GSM8K_DIR, task) is not None


def _is_mmlu_task(task: str) -> bool:
    return task == "mmlu" or (task.startswith("mmlu_") and task[len("mmlu_"):] in _mmlu_subject_descriptions())


def needs_data_dir(task: str) -> bool:
    """Whether ``task`` has a local-data variant (so the data directory setting matters)."""
    return _is_gsm8k_task(task) or _is_mmlu_task(task)


def _mmlu_subjects(requested: tuple[str, ...] | None) -> list[str]:
    known = mmlu_subject_descriptions()
    if requested is None:
        return sorted(known)
    unknown = [s for s in requested if s not in known]
    if unknown:
        raise ConfigError(f"Unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(known))} (or subjects: all).")
    return list(dict.fromkeys(requested))


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


def _gsm8k_local_yaml(builtin_yaml: Path, task_name: str, data_dir: Path) -> str:
    files = gsm8k_files(data_dir)
    cfg = {
        "include": str(builtin_yaml),
        "task": f"{task_name}_local",
        "tag": [_LOCAL_TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def _mmlu_local_yaml(subject: str, description: str, data_dir: Path) -> str:
    files = mmlu_files(data_dir, subject)
    cfg = {
        "include": str(_MMLU_TEMPLATE),
        "task": f"mmlu_local_{subject}",
        "task_alias": subject,
        "tag": [_LOCAL_TAG],
        "description": description,
        "dataset_path": "csv",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(path) for split, path in files.items()},
            "column_names": MMLU_CSV_COLUMNS,
            "keep_default_na": False,
        },
    }
    # yaml.safe_dump cannot emit lm-eval's !function tag; append it verbatim.
    process_docs = "process_docs: !function nvfp4kv.eval.lmeval_tasks.process_mmlu_local_docs\n"
    return yaml.safe_dump(cfg, sort_keys=False) + process_docs


def _group_yaml(group: str, tasks: Sequence[str]) -> str:
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


def prepare_task(cfg: LmEvalTaskConfig, data_dir: Path | None) -> PreparedTask:
    """Decide hub vs local, and generate the YAMLs the chosen route needs."""
    task = cfg.lm_eval_task
    local = f"local:{data_dir}" if data_dir is not None else "hub"
    gsm8k_yaml = _builtin_yaml_for(_GSM8K_DIR, task)
    if gsm8k_yaml is not None:
        if data_dir is None:
            return PreparedTask(task, None, True, "openai/gsm8k", "hub")
        text = _gsm8k_local_yaml(gsm8k_yaml, task, data_dir)
        return PreparedTask(f"{task}_local", write_include_dir({f"{task}_local.yaml": text}), False, None, local)

    if _is_mmlu_task(task):
        requested = cfg.subjects if task == "mmlu" else (task[len("mmlu_"):],)
        subjects = _mmlu_subjects(requested)
        if data_dir is None:
            if task != "mmlu" or cfg.subjects is None:
                return PreparedTask(task, None, True, "cais/mmlu", "hub")
            group = "mmlu_hub_subset"
            files = {f"_{group}.yaml": _group_yaml(group, [f"mmlu_{s}" for s in subjects])}
            return PreparedTask(group, write_include_dir(files), True, "cais/mmlu", "hub")
        descriptions = mmlu_subject_descriptions()
        files = {f"mmlu_local_{s}.yaml": _mmlu_local_yaml(s, descriptions[s], data_dir) for s in subjects}
        if task == "mmlu":
            files["_mmlu_local.yaml"] = _group_yaml("mmlu_local", [f"mmlu_local_{s}" for s in subjects])
            top = "mmlu_local"
        else:
            top = f"mmlu_local_{subjects[0]}"
        return PreparedTask(top, write_include_dir(files), False, None, local)

    return PreparedTask(task, None, True, None, "lm_eval")


# ---------------------------------------------------------------------------- running
_TASK_MANAGERS: dict[str, TaskManager] = {}


def _task_manager(prepared: PreparedTask, metadata: dict[str, Any]) -> TaskManager:
    """TaskManagers are cached: indexing lm-eval's built-in tasks costs ~10 s on a CPU."""
    key = json.dumps([str(prepared.include_dir), prepared.include_defaults, metadata], sort_keys=True, default=str)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(
            include_path=str(prepared.include_dir) if prepared.include_dir else None,
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
    - ``data_dir``: local data directory (``$NVFP4KV_DATA_DIR`` wins); unset means the hub.
    - ``loglikelihood_mode``: ``decode_faithful`` (default) | ``all_quantized`` | ``raw_prefill``.
    - ``bootstrap_iters`` (100000; only non-mean aggregations bootstrap), ``apply_chat_template``
      (False), ``fewshot_as_multiturn`` (False), ``system_instruction`` (None), ``batch_size`` (1).

    ``limit`` takes the first N documents of each (sub)task; ``seed`` seeds everything lm-eval
    seeds. ``lm`` reuses a :class:`~nvfp4kv.eval.lm.KVQuantLM` across cells (``set_kv`` is called).
    Metric keys are lm-eval's (``acc,none``, ``exact_match,strict-match``); samples have
    ``doc_id`` (``"<subtask>:<id>"`` for groups), ``subtask``, ``metrics``, ``target``,
    ``prediction`` (generated text, or the argmax choice index) and ``filtered`` (per filter).
    """
    cfg = LmEvalTaskConfig.from_dict(task_cfg)
    prepared = prepare_task(cfg, resolve_data_dir(cfg.data_dir) if needs_data_dir(cfg.lm_eval_task) else None)
    if prepared.hub_dataset and hub_is_offline() and not hub_dataset_cached(prepared.hub_dataset):
        raise offline_hub_error(prepared.hub_dataset)  # fail in ms, not after indexing lm-eval's tasks
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
        "data_source": prepared.data_source,
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
