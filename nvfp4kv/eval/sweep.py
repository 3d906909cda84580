"""Run a sweep: every (task x KV config) cell for one model, resumable, into one run directory.

``python -m experiments.run +sweep=<name>`` composes a Hydra config (configs/) and calls
:func:`run_sweep`. The order of work is chosen so that mistakes cost seconds, not hours:

1. **Plan and validate** everything that can be checked without the model: each ``kvs.<label>``
   becomes a :class:`~nvfp4kv.cache.KVCacheConfig` (unknown formats and bad fields fail here),
   each ``tasks.<name>`` is checked by its task family (unknown keys, missing local data, a hub
   dataset while the hub is offline). Each error names the config key and the fix.
2. **Load the model once** (module-level cache keyed by the model spec, so Hydra multirun jobs in
   one process reuse it) and check every KV format against its head_dim.
3. **Run the cells** task by task, KV config by KV config. A cell whose JSON already exists in the
   run directory is skipped (resume), after checking it was produced by the same model, task,
   KV config, limit and seed. Each finished cell is written atomically (samples, then the cell
   JSON as the commit marker), so an interrupted sweep keeps every finished cell.
4. **Rebuild the report** (results.csv, table.md, plots) from all cell files, also when a cell
   fails, so the run directory always shows what is done.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvfp4kv import results
from nvfp4kv.errors import ConfigError, DatasetNotFoundError, NVFP4KVError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

#: module that registers each built-in task kind; imported only when a sweep uses that kind
TASK_KIND_MODULES: dict[str, str] = {
    "lm_eval": "nvfp4kv.eval.lmeval_tasks",
    "passkey": "nvfp4kv.eval.passkey",
    "fidelity": "nvfp4kv.metrics",
}
#: task-config keys that belong to the runner and are not passed to the task family:
#: ``limit`` (documents, else the top-level ``limit``) and ``module`` (a module to import first,
#: so a task family of your own registers itself: ``+tasks.x={kind:my_kind,module:my_pkg.tasks}``)
RUNNER_TASK_KEYS = ("limit", "module")
#: fields that do not change what is computed, so a resumed cell may differ in them
_IDENTITY_IGNORED = {
    "model": ("device", "label"),
    "task_config": ("data_dir",),
    "kv_config": ("backend", "dequant_cache"),
}


# ---------------------------------------------------------------------------- resolvers
def _uid() -> str:
    """6 hex digits: with the timestamp's seconds, two runs started together get distinct dirs."""
    return secrets.token_hex(3)


def _job_suffix() -> str:
    """``-<job number>`` inside a Hydra multirun job (each job gets its own run dir), else ``""``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return ""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"-{HydraConfig.get().job.num}"
    return ""


def _sweep_name(*, _root_: DictConfig) -> str:
    if "sweep" not in _root_ or not OmegaConf.select(_root_, "sweep.name"):
        raise ConfigError(missing_sweep_message())
    return str(_root_.sweep.name)


def _default_data_dir() -> str | None:
    """``$NVFP4KV_DATA_DIR``, else a ``shared/data`` directory beside this checkout, else None (the hub).

    Why: an offline machine set up like this project's CI keeps the benchmark data at
    ``../shared/data``; finding it there lets the README's quick start run with no extra setup,
    while a user with neither gets the hub, the normal path.
    """
    env = os.environ.get("NVFP4KV_DATA_DIR")
    if env:
        return env
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return str(beside) if beside.is_dir() else None


def register_resolvers() -> None:
    """Resolvers the configs use. ``nvfp4kv.uid`` is cached per config object, like Hydra's
    ``now``: Hydra's run dir and the runner resolve ``run_dir`` to the same directory."""
    OmegaConf.register_new_resolver("nvfp4kv.uid", _uid, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.job_suffix", _job_suffix, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.sweep_name", _sweep_name, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.default_data_dir", _default_data_dir, replace=True)


register_resolvers()


def available_sweeps(config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """Sweep names in ``configs/sweep/`` with their ``sweep.description``."""
    import yaml

    sweeps: dict[str, str] = {}
    for path in sorted((config_dir / "sweep").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            data = {}
        sweeps[path.stem] = str((data.get("sweep") or {}).get("description", ""))
    return sweeps


def missing_sweep_message(config_dir: Path = CONFIG_DIR) -> str:
    listing = "\n".join(f"  {name:<14} {desc}" for name, desc in available_sweeps(config_dir).items())
    return (
        "No sweep selected. Run `python -m experiments.run +sweep=<name>` (note the `+`: a sweep is "
        f"appended to the config) with one of:\n{listing}"
    )


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class TaskPlan:
    """One task of the sweep: its family (``kind``), the config passed to it, and its limit."""

    name: str
    kind: str
    config: dict[str, Any]
    limit: int | None


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


def _validate_lm_eval(task_cfg: dict[str, Any]) -> None:
    """Config keys, loglikelihood mode, local data files, and hub reachability for hub datasets."""
    from nvfp4kv.eval.data import hub_is_offline, offline_hub_error, resolve_data_dir
    from nvfp4kv.eval.lmeval_tasks import LmEvalTaskConfig, prepare_task

    from nvfp4kv.eval.lm import LOGLIKELIHOOD_MODES

    cfg = LmEvalTaskConfig.from_dict(task_cfg)
    if cfg.loglikelihood_mode not in LOGLIKELIHOOD_MODES:
        raise ConfigError(f"loglikelihood_mode={cfg.loglikelihood_mode!r}; use one of {', '.join(LOGLIKELIHOOD_MODES)}.")
    prepared = prepare_task(cfg, resolve_data_dir(cfg.data_dir))
    if prepared.data_source == "hub" and prepared.hub_dataset and hub_is_offline():
        raise offline_hub_error(prepared.hub_dataset)


def _validate_passkey(task_cfg: dict[str, Any]) -> None:
    from nvfp4kv.eval.passkey import PasskeyConfig, haystack_dir

    haystack_dir(PasskeyConfig.from_dict(task_cfg).haystack_dir)


def _validate_fidelity(task_cfg: dict[str, Any]) -> None:
    from nvfp4kv.metrics.task import FidelitySettings
    from nvfp4kv.metrics.text import essay_dir

    FidelitySettings.from_task(task_cfg)
    essay_dir()


#: model-free checks per built-in task kind (other kinds are checked when they run)
TASK_VALIDATORS: dict[str, Callable[[dict[str, Any]], None]] = {
    "lm_eval": _validate_lm_eval,
    "passkey": _validate_passkey,
    "fidelity": _validate_fidelity,
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
            if validator is not None:
                validator(task_cfg)
        except NVFP4KVError as err:
            raise type(err)(f"tasks.{name}: {err}") from err
        plans.append(TaskPlan(str(name), kind, task_cfg, limit if limit is not None else default_limit))
    return plans


def _model_spec(model_cfg: Any) -> Any:
    from nvfp4kv.models import ModelSpec

    if not isinstance(model_cfg, Mapping):
        raise ConfigError("`model` must be a mapping (pick one with model=smollm2|llama31_8b_instruct|qwen3_8b|local).")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(model_cfg) - known)
    if unknown:
        raise ConfigError(f"Unknown model key(s) {unknown}; valid: {sorted(known)}.")
    return ModelSpec(**{k: (dict(v) if k == "extra" and v is not None else v) for k, v in model_cfg.items()})


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
    )


# ---------------------------------------------------------------------------- model
_MODEL_CACHE: dict[str, Any] = {}


def _spec_key(spec: Any) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)


def _available_bytes(device: str) -> int | None:
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            return int(torch.cuda.mem_get_info(index)[0])
        if device == "cpu":
            try:
                import psutil

                return int(psutil.virtual_memory().available)
            except ImportError:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def check_model_fits(spec: Any) -> None:
    """Refuse a local model whose weight files exceed the free memory of its device.

    Only local directories can be sized before loading (hub ids are checked by catching the
    out-of-memory error at load time instead).
    """
    from nvfp4kv.models import resolve_device

    path = Path(spec.name_or_path).expanduser()
    if spec.name_or_path.startswith("embedded:") or not path.is_dir():
        return
    weights = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for p in path.glob(pattern))
    bytes_per_param = {"float32": 4, "fp32": 4}.get(spec.dtype, 2)
    # files are usually BF16/FP16; FP32 weights loaded as BF16 halve, BF16 loaded as FP32 double
    needed = weights * bytes_per_param / 2
    device = resolve_device(spec.device)
    free = _available_bytes(device)
    if free is not None and needed > 0.95 * free:
        raise ConfigError(
            f"Model {spec.name_or_path} needs ~{needed / 2**30:.1f} GiB for its weights on {device}, but only "
            f"{free / 2**30:.1f} GiB is free. Use a smaller model, a GPU with more memory (model.device=cuda:N), "
            f"or free memory."
        )


def get_model(spec: Any) -> Any:
    """Load (once per process) the model a sweep evaluates; a :class:`~nvfp4kv.models.ModelBundle`."""
    from nvfp4kv.models import load_model

    key = _spec_key(spec)
    if key not in _MODEL_CACHE:
        check_model_fits(spec)
        started = time.perf_counter()
        try:
            bundle = load_model(spec)
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
                raise ConfigError(
                    f"Ran out of memory loading {spec.name_or_path} on {spec.device} ({err}). Use a smaller model "
                    f"or a device with more memory (model.device=...)."
                ) from err
            raise
        log.info("Loaded %s in %.1f s on %s", bundle.name, time.perf_counter() - started, bundle.model.device)
        _MODEL_CACHE.clear()  # keep one model: a multirun over models must not accumulate them
        _MODEL_CACHE[key] = bundle
    return _MODEL_CACHE[key]


def head_dim(model: Any) -> int:
    config = model.config
    text_config = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text_config, "head_dim", None)
    return int(value or text_config.hidden_size // text_config.num_attention_heads)


def bits_per_element(kv: Any, model: Any) -> float:
    """Mean storage bits per K/V element of the quantized store (codes + block scales).

    Excludes per-layer global scales and the full-precision sink/residual windows, whose share
    depends on the sequence length (the cache's ``memory_report`` has the exact bytes).
    """
    dim = head_dim(model)
    return (kv.build_format("k").bits_per_element(dim) + kv.build_format("v").bits_per_element(dim)) / 2.0


def check_block_sizes(kvs: Mapping[str, Any], model: Any) -> None:
    dim = head_dim(model)
    for label, kv in kvs.items():
        for which in ("k", "v"):
            fmt = kv.build_format(which)
            if dim % fmt.block_size:
                raise ConfigError(
                    f"kvs.{label}: {which.upper()} format {fmt.name!r} quantizes blocks of {fmt.block_size} along "
                    f"head_dim, but this model's head_dim is {dim}. Drop it (~kvs.{label}) or pick a format "
                    f"whose block divides {dim}."
                )


# ---------------------------------------------------------------------------- provenance
def package_versions() -> dict[str, str | None]:
    import nvfp4kv

    versions: dict[str, str | None] = {"python": sys.version.split()[0], "nvfp4kv": nvfp4kv.__version__}
    for dist in ("torch", "transformers", "lm_eval", "hydra-core", "datasets", "triton"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return versions


def git_state(repo: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, working tree has uncommitted changes), or (None, None) outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


# ---------------------------------------------------------------------------- cells
def _strip(d: Mapping[str, Any], ignored: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ignored}


def cell_identity(spec: Any, task: TaskPlan, kv: Any, seed: int) -> dict[str, Any]:
    """What decides a cell's numbers; a resumed cell must match it (minus :data:`_IDENTITY_IGNORED`)."""
    return results.jsonable({
        "model": _strip(dataclasses.asdict(spec), _IDENTITY_IGNORED["model"]),
        "task_kind": task.kind,
        "task_config": _strip(task.config, _IDENTITY_IGNORED["task_config"]),
        "kv_config": _strip(kv.to_dict(), _IDENTITY_IGNORED["kv_config"]),
        "limit": task.limit,
        "seed": seed,
    })


def _check_resumed(existing: Mapping[str, Any], identity: Mapping[str, Any], cid: str, run_dir: Path) -> None:
    stored = existing.get("identity")
    if stored == identity:
        return
    if stored is None:  # written by another tool (or an older runner): nothing to compare against
        log.warning("cell %s has no recorded identity; resuming without checking its configuration", cid)
        return
    differing = sorted(k for k in set(identity) | set(stored) if stored.get(k) != identity.get(k))
    raise ConfigError(
        f"Cell {cid} in {run_dir} was computed with a different {', '.join(differing) or 'configuration'} than "
        f"this run asks for. Resume with the original overrides, start a new run (drop run_dir=...), or delete "
        f"{results.cell_path(run_dir, cid)} to recompute it."
    )


def check_resumable(plan: SweepPlan) -> None:
    """Before any work: every finished cell in the run dir must match what this run would compute."""
    model = plan.model_spec.display_name
    for task in plan.tasks:
        for label, kv in plan.kvs.items():
            cid = results.cell_id(model, task.name, label)
            existing = results.read_cell(plan.run_dir, cid)
            if existing is not None:
                _check_resumed(existing, cell_identity(plan.model_spec, task, kv, plan.seed), cid, plan.run_dir)


def _metric_dict(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in metrics.items():
        value = getattr(m, "value", m)
        out[str(name)] = {
            "value": None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value),
            "stderr": None if getattr(m, "stderr", None) is None else float(m.stderr),
            "n": None if getattr(m, "n", None) is None else int(m.n),
        }
    return out


def _decorate_samples(samples: list[dict[str, Any]], task: str, kv: str, model: str) -> list[dict[str, Any]]:
    """Add the identity keys RESULTS_LAYOUT promises (paired statistics match on task + doc_id)."""
    out = []
    for index, sample in enumerate(samples):
        record = {"doc_id": sample.get("doc_id", index), "task": task, "kv": kv, "model": model}
        record.update({k: v for k, v in sample.items() if k not in ("doc_id", "task", "kv", "model")})
        record.setdefault("metrics", {})
        out.append(record)
    return out


@dataclass
class CellOutcome:
    cell_id: str
    status: str  # "done" | "skipped" | "failed"
    wall_s: float = 0.0
    error: str | None = None


def run_cell(plan: SweepPlan, bundle: Any, task: TaskPlan, label: str, provenance: Mapping[str, Any]) -> CellOutcome:
    """Run one cell (or skip it when its JSON exists) and write its files atomically."""
    kv = plan.kvs[label]
    cid = results.cell_id(bundle.name, task.name, label)
    identity = cell_identity(plan.model_spec, task, kv, plan.seed)
    existing = results.read_cell(plan.run_dir, cid)
    if existing is not None:
        _check_resumed(existing, identity, cid, plan.run_dir)
        log.info("skip %s (done in a previous run)", cid)
        return CellOutcome(cid, "skipped")
    runner = resolve_runner(task.kind)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tic = time.perf_counter()
    outcome = runner(dict(task.config), bundle, kv, limit=task.limit, seed=plan.seed, progress=plan.progress)
    wall = time.perf_counter() - tic
    cell = {
        "cell_id": cid, "run_id": plan.run_id, "sweep": plan.sweep_name,
        "model": bundle.name, "task": task.name, "task_kind": task.kind, "kv": label,
        "kv_label": kv.label, "kv_config": kv.to_dict(), "bits_per_element": bits_per_element(kv, bundle.model),
        "task_config": task.config, "limit": task.limit, "seed": plan.seed,
        "model_spec": dataclasses.asdict(plan.model_spec), "device": str(getattr(bundle.model, "device", "")),
        "config": plan.config, **provenance, "started": started, "wall_s": round(wall, 3),
        "metrics": _metric_dict(outcome.metrics), "n_samples": len(outcome.samples),
        "extra": outcome.extra, "identity": identity,
    }
    results.write_cell(plan.run_dir, cell, _decorate_samples(list(outcome.samples), task.name, label, bundle.name))
    summary = ", ".join(f"{k}={v['value']:.4g}" for k, v in list(cell["metrics"].items())[:3] if v["value"] is not None)
    log.info("done %s in %.1f s: %s", cid, wall, summary)
    return CellOutcome(cid, "done", wall)


def _write_sweep_yaml(plan: SweepPlan, overrides: list[str] | None) -> None:
    header = "# Resolved sweep config (the latest invocation into this run dir; each cell keeps its own).\n"
    if overrides is not None:
        header += "# command: python -m experiments.run " + " ".join(overrides) + "\n"
    text = header + OmegaConf.to_yaml(OmegaConf.create(results.jsonable(plan.config)))
    results.atomic_write_text(plan.run_dir / "sweep.yaml", text)


def _report(plan: SweepPlan) -> None:
    title = f"{plan.sweep_name}: {plan.run_id}"
    paths = results.write_report(plan.run_dir, baseline=plan.baseline, title=title)
    log.info("report: %s", ", ".join(str(p.relative_to(plan.run_dir)) for p in paths.values()))


def run_sweep(cfg: DictConfig | Mapping[str, Any], overrides: list[str] | None = None) -> Path:
    """Run (or resume) a sweep; returns its run directory. See the module docstring for the steps."""
    from tqdm.auto import tqdm

    plan = plan_sweep(cfg)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    _write_sweep_yaml(plan, overrides if overrides is not None else _hydra_overrides())
    log.info("run dir: %s", plan.run_dir)
    check_resumable(plan)
    bundle = get_model(plan.model_spec)
    check_block_sizes(plan.kvs, bundle.model)
    commit, dirty = git_state()
    provenance = {"versions": package_versions(), "git": commit, "git_dirty": dirty}

    cells = [(task, label) for task in plan.tasks for label in plan.kvs]
    outcomes: list[CellOutcome] = []
    bar = tqdm(cells, desc=f"sweep {plan.sweep_name}", unit="cell")
    try:
        for task, label in bar:
            bar.set_postfix_str(f"{task.name} / {label}")
            try:
                outcomes.append(run_cell(plan, bundle, task, label, provenance))
            except (ConfigError, DatasetNotFoundError):  # a config problem hits every cell: stop
                raise
            except Exception as err:
                cid = results.cell_id(bundle.name, task.name, label)
                if plan.fail_fast:
                    raise
                log.exception("cell %s failed; continuing (fail_fast=false)", cid)
                outcomes.append(CellOutcome(cid, "failed", error=f"{type(err).__name__}: {err}"))
    finally:
        bar.close()
        try:
            _report(plan)
        except Exception:  # never mask the cell's own error with a report error
            log.exception("could not rebuild the report in %s", plan.run_dir)
    failed = [o for o in outcomes if o.status == "failed"]
    done = sum(o.status == "done" for o in outcomes)
    log.info("sweep %s: %d cells computed, %d resumed, %d failed -> %s", plan.sweep_name, done,
             sum(o.status == "skipped" for o in outcomes), len(failed), plan.run_dir)
    if failed:
        raise RuntimeError(
            f"{len(failed)} cell(s) failed: " + "; ".join(f"{o.cell_id}: {o.error}" for o in failed)
            + f". Finished cells are kept; fix the cause and rerun with run_dir={plan.run_dir} to compute only these."
        )
    return plan.run_dir
