"""Plan a sweep: turn the composed config into a validated :class:`SweepPlan`, loading no model.

Everything a user can get wrong is checked here, in seconds, before the model loads (the
slow, expensive step). First the cheap, torch-free checks of values (:mod:`nvfp4kv.config.check`,
which the CLI has run already, right after Hydra composed the config through the schemas of
:mod:`nvfp4kv.config.schema`), then what needs the code or the disk: each KV setting built as a
``KVCacheConfig`` (its format's options, checks across fields), task names and their data, the
model's location, the output directory. Each problem is one :class:`~nvfp4kv.errors.NVFP4KVError`
whose message names the config key and the fix; ``experiments/run.py`` prints it as one line (exit 2).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nvfp4kv.config.check import (  # noqa: F401  (resolve_config re-exported: sweep.py, gate, tests)
    check_config,
    check_limit,
    check_model,
    check_shard,
    check_tasks,
    resolve_config,
)
from nvfp4kv.config.choices import import_format_modules
from nvfp4kv.config.kv import kv_values
from nvfp4kv.config.resolvers import (  # noqa: F401  (re-exported: sweep.py, tests)
    CONFIG_DIR,
    _default_data_dir,
    available_kv_configs,
    available_sweeps,
    missing_sweep_message,
    register_resolvers,
)
from nvfp4kv.config.schema import RUNNER_TASK_KEYS  # noqa: F401  (re-exported)
from nvfp4kv.errors import ConfigError, NVFP4KVError
from nvfp4kv.eval.preflight import check_model_location, check_writable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: module that registers each built-in task kind; imported only when a sweep uses that kind
TASK_KIND_MODULES: dict[str, str] = {
    "lm_eval": "nvfp4kv.eval.lmeval_tasks",
    "passkey": "nvfp4kv.eval.passkey",
    "fidelity": "nvfp4kv.metrics",
    "ruler": "nvfp4kv.eval.ruler",
}
#: task-config keys that belong to the runner and are not passed to the task family
#: (nvfp4kv.config.schema.RUNNER_TASK_KEYS): ``limit`` (documents, else the top-level ``limit``) and
#: ``module`` (a module to import first, so a task family of your own registers itself:
#: ``+tasks.x={kind:my_kind,module:my_pkg.tasks}``)


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TaskPlan:
    """One task of the sweep: its family (``kind``), the config passed to it, and its limit."""

    name: str
    kind: str
    config: dict[str, Any]
    limit: int | None
    #: where the task's data comes from and a hash of it (part of the run identity), if known
    data: dict[str, Any] | None = None


@dataclass
class SweepPlan:
    """Everything :func:`run_sweep` needs, validated, from plain (resolved) config values."""

    run_dir: Path
    run_id: str
    sweep_name: str
    model_spec: Any  # nvfp4kv.models.ModelSpec
    tasks: list[TaskPlan]
    kvs: dict[str, Any]  # label -> KVCacheConfig (engine overrides applied)
    seed: int
    baseline: str
    progress: bool
    fail_fast: bool
    config: dict[str, Any] = field(repr=False)
    #: identity fields a resume may change, on purpose and recorded (``allow_identity_change=[...]``)
    allow_identity_change: tuple[str, ...] = ()
    #: the engine profile applied to every KV setting (``{"name": "none"}``: KV configs as written)
    engine: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    #: per KV label, what the harness cannot reproduce for that engine (docs/engines.md)
    engine_notes: dict[str, list[str]] = field(default_factory=dict)
    #: run only cells ``i`` with ``i % num_shards == shard`` (one cluster job per shard, one run dir)
    shard: int = 0
    num_shards: int = 1


_check_limit = check_limit  # the one limit check (nvfp4kv.config.check)


def _engine_profile(engine: Any) -> Any:
    """The engine profile the config names (None for ``none``/absent: KV configs run as written)."""
    from nvfp4kv.engines import load_engine_profile

    if engine is None:
        return None
    try:
        profile = load_engine_profile(engine)
    except ConfigError as err:
        raise ConfigError(f"engine: {err}") from None
    return None if profile.name == "none" else profile


def _kv_configs(kvs: Any, engine: Any = None) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Each KV setting through the one parser (:func:`nvfp4kv.config.kv.kv_values`), with the engine
    profile's overrides applied (:func:`nvfp4kv.engines.apply_engine`), then built; and per label the
    notes saying what the harness cannot reproduce for that engine."""
    from nvfp4kv.engines import apply_engine
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.errors import UnknownFormatError

    if not isinstance(kvs, Mapping) or not kvs:
        raise ConfigError("The sweep selects no KV configs (`kvs:` is empty); add one, e.g. +kv@kvs.bf16=bf16.")
    import_format_modules()  # formats of the user's own ($NVFP4KV_FORMAT_MODULES) register now
    out: dict[str, Any] = {}
    notes: dict[str, list[str]] = {}
    for label, values in kvs.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"kvs.{label} must be a mapping of KVCacheConfig fields (see configs/kv/); got {values!r}.")
        fields = kv_values(values, where=f"kvs.{label}")
        if engine is not None:
            try:
                fields, notes[str(label)] = apply_engine(engine, fields)
            except ConfigError as err:
                raise ConfigError(f"kvs.{label}: {err}") from None
        try:
            out[str(label)] = KVCacheConfig(**fields)
        except (ConfigError, UnknownFormatError) as err:
            raise ConfigError(
                f"kvs.{label}: {err} Fix the override (e.g. kvs.{label}.k_format=nvfp4) or pick a KV config "
                f"from configs/kv/ ({', '.join(available_kv_configs())})."
            ) from None
    return out, notes


def resolve_runner(kind: str) -> Callable[..., Any]:
    """The task family registered as ``kind``, importing its module on first use.

    Built-in families live in optional modules (:data:`TASK_KIND_MODULES`); a module that fails
    to import only matters to sweeps that use its kind, and then the error says which.
    """
    from nvfp4kv.eval.api import get_task_runner, task_kinds

    if kind not in task_kinds() and kind in TASK_KIND_MODULES:
        module = TASK_KIND_MODULES[kind]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                f"Task kind {kind!r} is provided by {module}, which could not be imported ({err}). "
                f"Install the missing package, or drop the tasks of kind {kind!r} from the sweep (~tasks.<name>)."
            ) from err
    return get_task_runner(kind)


def _import_task_module(module: str, kind: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"module={module!r} (for task kind {kind!r}) could not be imported ({err}); "
                          f"check the module path and that it is on PYTHONPATH.") from err


def _validate_lm_eval(task_cfg: dict[str, Any], limit: int | None = None) -> dict[str, Any] | None:
    """Task name (lm-eval's registry), subjects, keys, loglikelihood mode and the data the limit needs."""
    from nvfp4kv.eval.lmeval_tasks import check_lm_eval_task

    data = check_lm_eval_task(task_cfg, limit=limit).data_identity()
    return {"source": data.get("data_source"), "sha256": data.get("data_sha256")}


def _validate_passkey(task_cfg: dict[str, Any], limit: int | None = None) -> None:
    from nvfp4kv.eval.passkey import PasskeyConfig, haystack_dir

    haystack_dir(PasskeyConfig.from_dict(task_cfg).haystack_dir)


def _validate_fidelity(task_cfg: dict[str, Any], limit: int | None = None) -> None:
    from nvfp4kv.metrics.task import FidelitySettings
    from nvfp4kv.metrics.text import essay_dir

    FidelitySettings.from_task(task_cfg)
    essay_dir()


#: model-free checks per built-in task kind (other kinds are checked when they run)
#: each takes (task config, effective limit) and may return the task's data identity (source, sha256)
TASK_VALIDATORS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "lm_eval": _validate_lm_eval,
    "passkey": _validate_passkey,
    "fidelity": _validate_fidelity,
    "ruler": lambda task_cfg, limit=None: importlib.import_module("nvfp4kv.eval.ruler").validate(task_cfg),
}


def _task_plans(tasks: Any, default_limit: int | None) -> list[TaskPlan]:
    check_tasks(tasks)  # kinds, limits, modules, and each built-in kind's keys and types
    plans = []
    for name, values in tasks.items():
        values = dict(values)
        kind = str(values["kind"])
        limit = check_limit(values.get("limit", None), f"tasks.{name}.limit")
        task_cfg = {k: v for k, v in values.items() if k not in RUNNER_TASK_KEYS}
        task_cfg["name"] = str(name)
        try:
            if values.get("module"):
                _import_task_module(str(values["module"]), kind)
            resolve_runner(kind)
            validator = TASK_VALIDATORS.get(kind)
            effective_limit = limit if limit is not None else default_limit
            data = validator(task_cfg, effective_limit) if validator is not None else None
        except NVFP4KVError as err:
            raise type(err)(f"tasks.{name}: {err}") from err
        plans.append(TaskPlan(str(name), kind, task_cfg, limit if limit is not None else default_limit,
                              data if isinstance(data, dict) else None))
    return plans


def _model_spec(model_cfg: Any) -> Any:
    """The model's keys and values (:func:`nvfp4kv.config.check.check_model`), then its location."""
    from nvfp4kv.models import ModelSpec

    model = check_model(model_cfg)
    spec = ModelSpec(**{k: (dict(v) if k == "extra" and v is not None else v) for k, v in model.items()})
    check_model_location(spec)
    return spec


def plan_sweep(cfg: DictConfig | Mapping[str, Any]) -> SweepPlan:
    """Validate the config without loading the model (step 1 of the module docstring)."""
    config = resolve_config(cfg)
    check_config(config)  # the cheap checks the CLI ran already (a config built in Python has not)
    default_limit = config.get("limit")
    seed = config.get("seed", 0)
    engine = _engine_profile(config.get("engine"))
    kvs, engine_notes = _kv_configs(config["kvs"], engine)
    for label, notes in engine_notes.items():
        for note in notes:
            log.warning("engine=%s, kvs.%s: %s", engine.name, label, note)
    baseline = str(config.get("baseline") or "bf16")
    if baseline not in kvs:
        log.warning("Baseline KV %r is not in this sweep (%s): the table will have no Δ column values.",
                    baseline, ", ".join(kvs))
    run_dir = config.get("run_dir")
    if not run_dir:
        raise ConfigError("run_dir is empty; leave it at its default or set run_dir=results/runs/<name>/<id>.")
    run_dir_path = Path(str(run_dir)).expanduser().resolve()
    check_writable(run_dir_path)
    shard, num_shards = check_shard(config.get("shard", 0), config.get("num_shards", 1))
    allowed = config.get("allow_identity_change") or []
    return SweepPlan(
        run_dir=run_dir_path,
        run_id=str(config.get("run_id") or run_dir_path.name),
        sweep_name=str((config.get("sweep") or {}).get("name") or config.get("sweep_name") or "sweep"),
        model_spec=_model_spec(config.get("model")),
        tasks=_task_plans(config["tasks"], default_limit),
        kvs=kvs,
        engine=engine.to_dict() if engine is not None else {"name": "none"},
        engine_notes=engine_notes,
        seed=seed,
        baseline=baseline,
        progress=bool(config.get("progress", True)),
        fail_fast=bool(config.get("fail_fast", True)),
        config=config,
        allow_identity_change=tuple(str(a) for a in allowed),
        shard=shard,
        num_shards=num_shards,
    )


