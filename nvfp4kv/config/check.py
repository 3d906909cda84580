"""The cheap checks of a composed config: what the schemas cannot say, torch-free, in milliseconds.

``experiments/run.py`` calls :func:`resolve_config` and :func:`check_config` right after Hydra
composes the config and before it imports torch or lm-eval, so a bad value fails in about a second,
as one line naming the key and what is allowed. ``nvfp4kv.eval.plan.plan_sweep`` calls them too
(for configs built in Python), then does the deeper checks: data files, task names, the model's
location, what a format accepts.

Composition already refused (through the schemas) unknown keys, values of the wrong type and values
outside a closed choice in every node that comes from a config file. This module checks the rest:
ranges (limits, shards, batch size), KV format names (:func:`nvfp4kv.config.kv.kv_values`), and
nodes the schemas do not type at compose time: plain mappings built in Python, and inline tasks
(``+tasks.x={kind:passkey,trials:2}``), which are checked against their kind's schema here. A task
of a kind this package does not ship stays an open mapping: its family checks its keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from nvfp4kv.config.choices import LOGLIKELIHOOD_MODES, MODEL_DTYPES
from nvfp4kv.config.kv import check_values, kv_values, omegaconf_message, plain
from nvfp4kv.config.resolvers import available_kv_configs, missing_sweep_message
from nvfp4kv.config.schema import TASK_SCHEMAS, ModelSchema, RunConfig
from nvfp4kv.errors import ConfigError, NVFP4KVError

MODEL_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelSchema))
RUN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))


# ---------------------------------------------------------------------------- resolve
def _unset_task_keys(cfg: Any) -> list[tuple[str, str]]:
    """(task, key) of every task field a schema left MISSING ("not given")."""
    from omegaconf import DictConfig, OmegaConf

    tasks = cfg._get_node("tasks") if isinstance(cfg, DictConfig) else None
    if not isinstance(tasks, DictConfig) or OmegaConf.is_missing(cfg, "tasks"):
        return []
    out = []
    for name in tasks:
        node = tasks._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out.extend((str(name), str(key)) for key in node if OmegaConf.is_missing(node, key))
    return out


def _missing_paths(value: Any, path: str = "") -> list[str]:
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _missing_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _missing_paths(v, f"{path}[{i}]")]
    return [path] if value == "???" else []


def resolve_config(cfg: Any) -> dict[str, Any]:
    """A plain, fully resolved copy of the config (``run_id``/``run_dir`` are fixed here, once).

    Closed choices become plain strings; task fields a schema left unset are dropped (the task
    family's default applies, and the task's record holds only what the config set)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        config = json.loads(json.dumps(plain(cfg)))  # a deep, plain copy
        tasks = config.get("tasks") if isinstance(config, dict) else None
        for task in (tasks.values() if isinstance(tasks, dict) else ()):
            if isinstance(task, dict):  # OmegaConf.to_container(cfg) writes an unset field as "???"
                for key in [k for k, v in task.items() if v == "???"]:
                    del task[key]
        return config
    model = cfg.get("model")
    if isinstance(model, DictConfig) and OmegaConf.is_missing(model, "name_or_path"):
        raise ConfigError("model.name_or_path is not set: model=local needs model.name_or_path=/path/to/hf_dir.")
    if "tasks" not in cfg and "kvs" not in cfg and "sweep" not in cfg:
        raise ConfigError(missing_sweep_message())
    unset = _unset_task_keys(cfg)
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    except Exception as err:  # omegaconf wraps resolver errors; surface ours unwrapped
        cause = err.__cause__ or err.__context__
        if isinstance(cause, NVFP4KVError):
            raise cause from None
        raise ConfigError(f"Could not resolve the config: {describe_error(err)}") from err
    assert isinstance(config, dict)
    for task, key in unset:
        config["tasks"][task].pop(key, None)
    for key in ("tasks", "kvs", "sweep"):
        if config.get(key) == "???":
            del config[key]
    missing = _missing_paths(config)
    if missing:
        raise ConfigError(f"Could not resolve the config: {', '.join(missing)} not set (???); set "
                          f"{missing[0]}=<value>.")
    return config


# ---------------------------------------------------------------------------- check
def check_limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r}: a limit is a number of documents >= 1; set {where}=<n>, or null for all.")
    return value


def check_shard(shard: Any, num_shards: Any) -> tuple[int, int]:
    if (isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
            or isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards):
        raise ConfigError(f"shard={shard!r} num_shards={num_shards!r}: need integers with 0 <= shard < num_shards "
                          f"(e.g. -m shard=0,1,2 num_shards=3).")
    return shard, num_shards


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_keys(config: Mapping[str, Any]) -> None:
    """The run-wide keys: no unknown one (Hydra's ``+key=...`` adds any), types the schema cannot hold
    for a plain dict, and ranges."""
    unknown = sorted(set(config) - set(RUN_KEYS), key=str)
    if unknown:
        raise ConfigError(f"Unknown run key(s) {unknown}; valid keys: {', '.join(RUN_KEYS)}. Fix the key's spelling "
                          f"(nvfp4kv/config/schema.py, RunConfig).")
    check_limit(config.get("limit"), "limit")
    seed = config.get("seed", 0)
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r} must be an integer; set seed=<int>.")
    mode = config.get("loglikelihood_mode", LOGLIKELIHOOD_MODES[0])
    if mode not in LOGLIKELIHOOD_MODES:
        raise ConfigError(f"loglikelihood_mode={mode!r} is not allowed; use one of {', '.join(LOGLIKELIHOOD_MODES)}.")
    batch = config.get("batch_size", 1)
    if batch != "auto" and not (_is_int(batch) and batch >= 1):
        raise ConfigError(f"batch_size={batch!r} is not allowed; use an integer >= 1 or auto.")
    check_shard(config.get("shard", 0), config.get("num_shards", 1))
    allowed = config.get("allow_identity_change") or []
    if isinstance(allowed, str) or not isinstance(allowed, list):
        raise ConfigError(f"allow_identity_change={allowed!r} must be a list of identity fields, "
                          f"e.g. 'allow_identity_change=[nvfp4kv.git_commit]'.")
    if "run_dir" in config and not config.get("run_dir"):
        raise ConfigError("run_dir is empty; leave it at its default or set run_dir=results/runs/<name>/<id>.")


def check_model(model: Any) -> dict[str, Any]:
    if not isinstance(model, Mapping):
        raise ConfigError("`model` must be a mapping (pick one with model=smollm2|llama31_8b_instruct|qwen3_8b|local).")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"Unknown model key(s) {unknown}; valid: {sorted(MODEL_KEYS)}. Fix the key's spelling.")
    dtype = model.get("dtype", "bfloat16")
    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not allowed; use one of {', '.join(MODEL_DTYPES)}.")
    check_values(ModelSchema, {k: v for k, v in model.items() if k != "dtype"}, "model")
    return dict(model)


def check_kvs(kvs: Any) -> dict[str, dict[str, Any]]:
    """Every KV setting through :func:`~nvfp4kv.config.kv.kv_values`; label -> its values."""
    if not isinstance(kvs, Mapping) or not kvs:
        raise ConfigError("The sweep selects no KV configs (`kvs:` is empty); add one, e.g. +kv@kvs.bf16=bf16.")
    out = {}
    for label, values in kvs.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"kvs.{label} must be a mapping of KVCacheConfig fields; got {values!r}. Pick a KV "
                              f"config from configs/kv/ ({', '.join(available_kv_configs())}): +kv@kvs.{label}=<name>.")
        out[str(label)] = kv_values(values, where=f"kvs.{label}")
    return out


def check_task(name: str, values: Any) -> None:
    """A task's ``kind``, its runner keys, and (built-in kinds) its keys and types against its schema."""
    if not isinstance(values, Mapping) or "kind" not in values:
        keys = sorted(values) if isinstance(values, Mapping) else values
        raise ConfigError(
            f"tasks.{name} has no `kind:` (it holds {keys!r}). Start it from a task config "
            f"(+task@tasks.{name}=<one of configs/task/>), or drop the task with ~tasks.{name} "
            f"(~task@tasks.{name} removes only its defaults entry and leaves the sweep's overrides behind)."
        )
    check_limit(values.get("limit"), f"tasks.{name}.limit")
    module = values.get("module")
    if module is not None and not isinstance(module, str):
        raise ConfigError(f"tasks.{name}.module={module!r} must be a module path, e.g. my_pkg.tasks.")
    schema = TASK_SCHEMAS.get(str(values["kind"]))
    if schema is None:
        return  # a kind of the user's own: an open mapping, checked by its family
    allowed = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(values) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"tasks.{name}: Unknown key(s) {unknown} in {values['kind']} task config; allowed: "
                          f"{allowed}. Fix the key's spelling or drop it.")
    check_values(schema, values, f"tasks.{name}")


def check_tasks(tasks: Any) -> None:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError("The sweep selects no tasks (`tasks:` is empty); add one, e.g. +task@tasks.gsm8k=gsm8k.")
    for name, values in tasks.items():
        check_task(str(name), values)


def check_config(config: Mapping[str, Any]) -> None:
    """Every cheap check of a resolved run config (:func:`resolve_config`); raises one-line
    :class:`~nvfp4kv.errors.ConfigError` naming the key and the fix. Imports no torch."""
    if "tasks" not in config or "kvs" not in config:
        raise ConfigError(missing_sweep_message())
    check_run_keys(config)
    check_kvs(config["kvs"])
    if "model" in config:
        check_model(config["model"])
    check_tasks(config["tasks"])
    check_engine(config)


def check_engine(config: Mapping[str, Any]) -> None:
    """The engine profile, and every KV setting under it (unsupported formats), before torch loads."""
    from nvfp4kv.engines import apply_engine, load_engine_profile

    engine = config.get("engine")
    if engine is None:
        return
    try:
        profile = load_engine_profile(engine)
    except ConfigError as err:
        raise ConfigError(f"engine: {err}") from None
    for label, values in (config.get("kvs") or {}).items():
        try:
            apply_engine(profile, kv_values(values, where=f"kvs.{label}"))
        except ConfigError as err:
            raise ConfigError(f"kvs.{label}: {err}") from None


# ---------------------------------------------------------------------------- errors
def describe_error(err: BaseException) -> str:
    """A Hydra or OmegaConf error (a bad override, a missing config) as one line: the key, the value
    and what is allowed, from the innermost OmegaConf error when there is one."""
    from omegaconf.errors import OmegaConfBaseException

    chain, seen = [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    override = None
    for item in chain:
        first = str(item).strip().splitlines()[0] if str(item).strip() else ""
        if first.startswith("Error merging override "):
            override = first[len("Error merging override "):]
    for item in chain:
        if isinstance(item, OmegaConfBaseException) and getattr(item, "full_key", None):
            key = str(item.full_key)
            msg = str(getattr(item, "msg", "") or item).strip().splitlines()[0]
            if "not in" in msg and "Key" in msg:  # an unknown key of a typed node
                parent = getattr(item, "object_type", None)
                fields = [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []
                valid = f"; valid keys: {', '.join(fields)}" if fields else ""
                return f"{key}: no such key{valid}. Fix the key's spelling."
            value = override.split("=", 1)[1] if override and "=" in override else getattr(item, "value", None)
            return omegaconf_message(item, key, value)
    text = str(err).split("Config search path:")[0]  # a missing config: keep the available options
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__
