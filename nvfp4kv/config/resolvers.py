"""Config resolvers and the sweep listing: what ``configs/config.yaml`` interpolates, and what a
user sees when no sweep is selected. Torch-free (the CLI resolves the config before torch loads).

``nvfp4kv.uid`` and ``now`` are cached per config object, so Hydra and the runner resolve
``run_id``/``run_dir`` to one value; the data-dir resolver finds local benchmark data.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nvfp4kv.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


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


def _shared_data_dir() -> Path | None:
    """``nvfp4kv.eval.data.shared_data_dir()`` when that module is loaded (tests replace it), else the
    same path computed here, so resolving the config never imports ``nvfp4kv.eval`` (and torch)."""
    data = sys.modules.get("nvfp4kv.eval.data")
    if data is not None:
        return data.shared_data_dir()
    beside = REPO_ROOT.parent / "shared" / "data"
    return beside if beside.is_dir() else None


def _default_data_dir() -> str | None:
    """``$NVFP4KV_DATA_DIR``, else a ``shared/data`` directory beside this checkout, else None (the hub).

    Why: an offline machine set up like this project's CI keeps the benchmark data at
    ``../shared/data``; finding it there lets the README's quick start run with no extra setup,
    while a user with neither gets the hub, the normal path.
    """
    env = os.environ.get("NVFP4KV_DATA_DIR")
    if env:
        return env
    beside = _shared_data_dir()
    return str(beside) if beside is not None else None


def register_resolvers() -> None:
    """Resolvers the configs use. ``nvfp4kv.uid`` is cached per config object, like Hydra's
    ``now``: Hydra's run dir and the runner resolve ``run_dir`` to the same directory."""
    OmegaConf.register_new_resolver("nvfp4kv.uid", _uid, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.job_suffix", _job_suffix, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.sweep_name", _sweep_name, replace=True)
    OmegaConf.register_new_resolver("nvfp4kv.default_data_dir", _default_data_dir, replace=True)


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


def available_kv_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """KV config names in ``configs/kv/``."""
    return sorted(p.stem for p in (config_dir / "kv").glob("*.yaml") if not p.stem.startswith("_"))


def missing_sweep_message(config_dir: Path = CONFIG_DIR) -> str:
    listing = "\n".join(f"  {name:<14} {desc}" for name, desc in available_sweeps(config_dir).items())
    return (
        "No sweep selected. Run `python -m experiments.run +sweep=<name>` (note the `+`: a sweep is "
        f"appended to the config) with one of:\n{listing}"
    )
