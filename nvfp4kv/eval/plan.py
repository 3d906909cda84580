"""Plan a sweep: turn the composed config into a validated :class:`SweepPlan`, loading no model.

Everything a user can get wrong is checked here, in seconds, before the model loads (the
slow, expensive step): KV configs, task names and their data, the model's location, the
output directory. Each problem is one :class:`~nvfp4kv.errors.NVFP4KVError` whose message
names the config key and the fix; ``experiments/run.py`` prints it as one line (exit 2).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvfp4kv.errors import ConfigError, NVFP4KVError
from nvfp4kv.eval.config_resolvers import (  # noqa: F401  (re-exported: sweep.py, tests)
    CONFIG_DIR,
    _default_data_dir,
    available_sweeps,
    missing_sweep_message,
    register_resolvers,
)
from nvfp4kv.eval.preflight import _check_shard, check_model_location, check_writable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: module that registers each built-in task kind; imported only when a sweep uses that kind
TASK_KIND_MODULES: dict[str, str] = {
    "lm_eval": "nvfp4kv.eval.lmeval_tasks",
    "passkey": "nvfp4kv.eval.passkey",
    "fidelity": "nvfp4kv.metrics",
    "ruler": "nvfp4kv.eval.ruler",
}
#: task-config keys that belong to the runner and are not passed to the task family:
#: ``limit`` (documents, else the top-level ``limit``) and ``module`` (a module to import first,
#: so a task family of your own registers itself: ``+tasks.x={kind:my_kind,module:my_pkg.tasks}``)
RUNNER_TASK_KEYS = ("limit", "module")


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
    kvs: dict[str, Any]  # label -> KVCacheConfig
    seed: int
    baseline: str
    progress: bool
    fail_fast: bool
    config: dict[str, Any] = field(repr=False)
    #: identity fields a resume may change, on purpose and recorded (``allow_identity_change=[...]``)
    allow_identity_change: tuple[str, ...] = ()
    #: run only cells ``i`` with ``i % num_shards == shard`` (one cluster job per shard, one run dir)
    shard: int = 0
    num_shards: int = 1


def _check_limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r}: a limit is a number of documents >= 1, or null for all.")
    return value


def _kv_configs(kvs: Any) -> dict[str, Any]:
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.errors import UnknownFormatError

    if not isinstance(kvs, Mapping) or not kvs:
        raise ConfigError("The sweep selects no KV configs (`kvs:` is empty); add one, e.g. +kv@kvs.bf16=bf16.")
    out: dict[str, Any] = {}
    for label, values in kvs.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"kvs.{label} must be a mapping of KVCacheConfig fields (see configs/kv/); got {values!r}.")
        try:
            out[str(label)] = KVCacheConfig.from_dict(dict(values))
        except (ConfigError, UnknownFormatError) as err:
            raise ConfigError(
                f"kvs.{label}: {err} Fix the override (e.g. kvs.{label}.k_format=nvfp4) or pick a KV config "
                f"from configs/kv/ ({', '.join(available_kv_configs())})."
            ) from None
    return out


def available_kv_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / "kv").glob("*.yaml") if not p.stem.startswith("_"))


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
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError("The sweep selects no tasks (`tasks:` is empty); add one, e.g. +task@tasks.gsm8k=gsm8k.")
    plans = []
    for name, values in tasks.items():
        if not isinstance(values, Mapping) or "kind" not in values:
            keys = sorted(values) if isinstance(values, Mapping) else values
            raise ConfigError(
                f"tasks.{name} has no `kind:` (it holds {keys!r}). Start it from a task config "
                f"(+task@tasks.{name}=<one of configs/task/>), or drop the task with ~tasks.{name} "
                f"(~task@tasks.{name} removes only its defaults entry and leaves the sweep's overrides behind)."
            )
        values = dict(values)
        kind = str(values["kind"])
        limit = _check_limit(values.get("limit", None), f"tasks.{name}.limit")
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
    from nvfp4kv.models import ModelSpec

    if not isinstance(model_cfg, Mapping):
        raise ConfigError("`model` must be a mapping (pick one with model=smollm2|llama31_8b_instruct|qwen3_8b|local).")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(model_cfg) - known)
    if unknown:
        raise ConfigError(f"Unknown model key(s) {unknown}; valid: {sorted(known)}.")
    spec = ModelSpec(**{k: (dict(v) if k == "extra" and v is not None else v) for k, v in model_cfg.items()})
    check_model_location(spec)
    return spec


def resolve_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A plain, fully resolved copy of the config (``run_id``/``run_dir`` are fixed here, once)."""
    if isinstance(cfg, DictConfig):
        model = cfg.get("model")
        if isinstance(model, DictConfig) and OmegaConf.is_missing(model, "name_or_path"):
            raise ConfigError("model.name_or_path is not set: model=local needs model.name_or_path=/path/to/hf_dir.")
        if "tasks" not in cfg and "kvs" not in cfg and "sweep" not in cfg:
            raise ConfigError(missing_sweep_message())
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
        except Exception as err:  # omegaconf wraps resolver errors; surface ours unwrapped
            cause = err.__cause__ or err.__context__
            if isinstance(cause, NVFP4KVError):
                raise cause from None
            raise ConfigError(f"Could not resolve the config: {err}") from err
    return json.loads(json.dumps(cfg))  # a deep, plain copy


def plan_sweep(cfg: DictConfig | Mapping[str, Any]) -> SweepPlan:
    """Validate the config without loading the model (step 1 of the module docstring)."""
    config = resolve_config(cfg)
    if "tasks" not in config or "kvs" not in config:
        raise ConfigError(missing_sweep_message())
    default_limit = _check_limit(config.get("limit"), "limit")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer.")
    kvs = _kv_configs(config["kvs"])
    baseline = str(config.get("baseline") or "bf16")
    if baseline not in kvs:
        log.warning("Baseline KV %r is not in this sweep (%s): the table will have no Δ column values.",
                    baseline, ", ".join(kvs))
    run_dir = config.get("run_dir")
    if not run_dir:
        raise ConfigError("run_dir is empty; leave it at its default or set run_dir=results/runs/<name>/<id>.")
    run_dir_path = Path(str(run_dir)).expanduser().resolve()
    check_writable(run_dir_path)
    shard, num_shards = _check_shard(config.get("shard", 0), config.get("num_shards", 1))
    allowed = config.get("allow_identity_change") or []
    if isinstance(allowed, str) or not isinstance(allowed, list):
        raise ConfigError(f"allow_identity_change={allowed!r} must be a list of identity fields, "
                          f"e.g. 'allow_identity_change=[nvfp4kv.git_commit]'.")
    return SweepPlan(
        run_dir=run_dir_path,
        run_id=str(config.get("run_id") or run_dir_path.name),
        sweep_name=str((config.get("sweep") or {}).get("name") or config.get("sweep_name") or "sweep"),
        model_spec=_model_spec(config.get("model")),
        tasks=_task_plans(config["tasks"], default_limit),
        kvs=kvs,
        seed=seed,
        baseline=baseline,
        progress=bool(config.get("progress", True)),
        fail_fast=bool(config.get("fail_fast", True)),
        config=config,
        allow_identity_change=tuple(str(a) for a in allowed),
        shard=shard,
        num_shards=num_shards,
    )


