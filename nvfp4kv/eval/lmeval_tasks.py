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

Sample selection (``sampling``): with ``first`` (the default), lm-eval's ``limit=N`` takes the
first N documents of each (sub)task in dataset order: deterministic, identical across KV formats
(so samples pair up), and independent of the seed. With ``seeded``, each leaf (sub)task draws
``min(N, its documents)`` document indices with ``random.Random("<seed>:<leaf>")`` (sorted;
:func:`seeded_indices`), handed to lm-eval as ``simple_evaluate(samples={leaf: indices},
limit=None)``: stratified over MMLU's subjects, identical across KV formats, reproducible from the
seed in any process. ``<leaf>`` is the subtask's name with this package's local-data infix
dropped (``mmlu_local_anatomy`` draws as ``mmlu_anatomy``, ``gsm8k_local`` as ``gsm8k``;
:func:`draw_name`), so the hub and a local copy draw the same documents. lm-eval records each
sample's ``doc_id`` as the document's index in the (sub)task's full eval split (it enumerates the
selected documents in dataset order and maps position ``i`` back to ``indices[i]``, which needs
the indices sorted); the run checks that the recorded ``doc_id`` values are the drawn indices. Without a
limit both modes evaluate every document. ``seed`` also seeds Python/NumPy/torch and lm-eval's
few-shot sampler (GSM8K draws its 5 shots at random from train; MMLU takes the first dev rows).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from typing import Any

from lm_eval.tasks import TaskManager

from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval.api import CellResult, register_task_kind
from nvfp4kv.eval.data import hub_is_offline, offline_hub_error, resolve_data_dir
from nvfp4kv.eval.lmeval_config import TASK_CONFIG_KEYS, LmEvalTaskConfig, to_plain
from nvfp4kv.eval.lmeval_prepare import (
    PreparedTask,
    check_lm_eval_task,
    check_rows,
    prepare_task,
    task_data_identity,
)
from nvfp4kv.eval.lmeval_records import _jsonable, _leaf_tasks, _metrics, _samples
from nvfp4kv.eval.local_task_yaml import (
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

#: the names of this module (the runner, and re-exported: config in :mod:`.lmeval_config`,
#: preparation and checks in :mod:`.lmeval_prepare`, record conversion in :mod:`.lmeval_records`,
#: YAML generation in :mod:`.local_task_yaml`)
__all__ = [
    "TASK_CONFIG_KEYS", "LmEvalTaskConfig", "to_plain",
    "PreparedTask", "check_lm_eval_task", "check_rows", "prepare_task", "task_data_identity",
    "_metrics", "_samples",
    "BUILTIN_TASKS_DIR", "GSM8K_HUB", "MMLU_CSV_COLUMNS", "MMLU_HUB", "MMLU_TEMPLATE", "OWN_TASKS_DIR",
    "builtin_task_config", "gsm8k_builtin_tasks", "gsm8k_local_yaml", "group_yaml", "hub_dataset_for",
    "is_mmlu_task", "mmlu_local_yaml", "mmlu_subject_descriptions", "needs_data_dir",
    "process_mmlu_local_docs", "task_yaml_root", "write_include_dir",
    "run_lm_eval_task", "seeded_indices", "draw_name", "draw_samples", "samples_sha256", "leaf_doc_counts",
]

# ---------------------------------------------------------------------------- seeded sampling
def draw_name(leaf: str) -> str:
    """The name a leaf task draws its documents under: lm-eval's name, without the ``_local`` this
    package's generated local-data tasks add (``mmlu_local_<subject>`` -> ``mmlu_<subject>``,
    ``<gsm8k task>_local`` -> ``<gsm8k task>``), so the hub and local routes draw alike."""
    if leaf.startswith("mmlu_local_"):
        return "mmlu_" + leaf[len("mmlu_local_"):]
    if leaf.endswith("_local") and leaf[: -len("_local")] in gsm8k_builtin_tasks():
        return leaf[: -len("_local")]
    return leaf


def seeded_indices(seed: int, leaf: str, n_docs: int, limit: int | None) -> list[int]:
    """``min(limit, n_docs)`` distinct document indices of ``range(n_docs)``, sorted, drawn with
    ``random.Random(f"{seed}:{draw_name(leaf)}")`` (a string seed is hashed with SHA-512: the same
    draw in every process and on every platform); ``limit=None`` takes every document."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    rng = random.Random(f"{seed}:{draw_name(leaf)}")
    return sorted(rng.sample(range(n_docs), limit))


def draw_samples(seed: int, n_docs: Mapping[str, int], limit: int | None) -> dict[str, list[int]]:
    """:func:`seeded_indices` for every leaf task (``{leaf: number of eval documents}``)."""
    return {leaf: seeded_indices(seed, leaf, n, limit) for leaf, n in n_docs.items()}


def samples_sha256(samples: Mapping[str, list[int]]) -> str:
    """SHA-256 of ``{draw_name(leaf): sorted indices}`` as canonical JSON: equal iff the same documents."""
    canonical = {draw_name(leaf): sorted(int(i) for i in idx) for leaf, idx in samples.items()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def leaf_doc_counts(tm: TaskManager, task_obj: Any) -> dict[str, int]:
    """``{leaf task name: len(eval_docs)}``, keyed as ``simple_evaluate`` keys its ``samples``."""
    return {name: len(task.eval_docs) for name, task in tm.load([task_obj])["tasks"].items()}


def _check_drawn(output: dict[str, Any], samples: Mapping[str, list[int]]) -> None:
    """The ``doc_id`` values lm-eval recorded are the drawn indices (it maps positions back to them)."""
    for leaf, indices in samples.items():
        recorded = sorted({int(s["doc_id"]) for s in output.get("samples", {}).get(leaf, [])})
        if recorded != sorted(indices):
            raise RuntimeError(f"lm-eval evaluated documents {recorded[:10]}... of {leaf!r}, not the "
                               f"{len(indices)} drawn ({sorted(indices)[:10]}...); sampling: seeded cannot pair them.")


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

    - ``sampling``: ``first`` (default) | ``seeded``: which documents ``limit`` takes (module docstring).

    ``limit`` takes N documents of each (sub)task (the first N, or a seeded draw); ``seed`` seeds
    everything lm-eval seeds, and the draw. ``lm`` reuses a :class:`~nvfp4kv.eval.lm.KVQuantLM`
    across cells (``set_kv`` is called).
    Metric keys are lm-eval's (``acc,none``, ``exact_match,strict-match``); samples have
    ``doc_id`` (``"<subtask>:<id>"`` for groups), ``subtask``, ``metrics``, ``target``,
    ``prediction`` (generated text, or the argmax choice index) and ``filtered`` (per filter).
    ``extra`` records ``data_source`` (``hub`` / ``local:<dir>`` / ``embedded-sample`` / ``lm_eval``)
    and ``data_sha256`` (:meth:`PreparedTask.data_identity`); with ``sampling: seeded`` also
    ``sampling``: ``{"mode": "seeded", "seed", "limit", "per_task": {leaf: documents drawn},
    "indices_sha256"}`` (:func:`samples_sha256`), so cells that drew different documents differ.
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
    drawn: dict[str, list[int]] | None = None  # seeded: {leaf: sorted indices} (every index without a limit)
    samples: dict[str, list[int]] | None = None  # what lm-eval gets: leaves it evaluates only in part
    if cfg.sampling == "seeded":
        n_docs = leaf_doc_counts(tm, task_obj)
        drawn = draw_samples(seed, n_docs, limit)
        if limit is not None:  # a leaf left out is evaluated whole (lm-eval's membership test is O(n*k))
            samples = {leaf: idx for leaf, idx in drawn.items() if len(idx) < n_docs[leaf]}
    stats_before = dict(lm.stats)
    output = simple_evaluate(
        model=lm,
        tasks=[task_obj],
        num_fewshot=cfg.num_fewshot,
        limit=limit if drawn is None else None,
        samples=samples,
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
    if drawn is not None and limit is not None:
        _check_drawn(output, drawn)
    leaves = _leaf_tasks(output, prepared.task_name)
    metrics = _metrics(output, prepared.task_name, leaves, cfg.metrics)
    records = _samples(output, leaves)
    extra = {
        "lm_eval_task": prepared.task_name,
        **prepared.data_identity(),
        "loglikelihood_mode": lm.loglikelihood_mode,
        "num_fewshot": {t: output.get("n-shot", {}).get(t) for t in leaves},
        "limit": limit,
        "seed": seed,
        "lm_stats": {k: v - stats_before.get(k, 0) for k, v in lm.stats.items() if v != stats_before.get(k, 0)},
    }
    if drawn is not None:
        extra["sampling"] = {"mode": "seeded", "seed": seed, "limit": limit,
                             "per_task": {t: len(i) for t, i in drawn.items()},
                             "indices_sha256": samples_sha256(drawn)}
    if len(leaves) > 1 or leaves != [prepared.task_name]:
        extra["subtasks"] = {t: {k: vars(v) for k, v in _metrics(output, t, [t], cfg.metrics).items()} for t in leaves}
    return CellResult(metrics=metrics, samples=records, extra=_jsonable(extra))
