"""Pre-flight checks of where things are, before anything loads: the model's location (a local
directory, or a hub id while the hub is offline), the run directory's writability. (The shard is a
value, checked with the others in ``nvfp4kv.config.check``.)

Why separate from validation of values: these look at the file system and the environment,
cost milliseconds, and each replaces a long traceback minutes later with one line naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nvfp4kv.config.check import check_shard as _check_shard  # noqa: F401  (re-exported)
from nvfp4kv.errors import ConfigError


_PATH_PREFIXES = ("/", "./", "../", "~")


def check_model_location(spec: Any) -> None:
    """Refuse, before loading, a model that cannot be found: a missing local directory, or a hub
    id while the hub is offline and the id is not in the local HuggingFace cache.

    Why here: loading a model takes from seconds to minutes, and the failure it ends in is a long
    transformers traceback; this check costs milliseconds and names the fix.
    """
    name = str(spec.name_or_path)
    if name.startswith(("embedded:", "offline:")):
        return  # resolved (and checked) by nvfp4kv.models / nvfp4kv.model_sources
    path = Path(name).expanduser()
    if name.startswith(_PATH_PREFIXES) or path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.name_or_path={name!r}: no such directory. Point it at a HuggingFace model "
                              f"directory (with config.json), or use the embedded model (model=smollm2).")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name!r} has no config.json: it is not a HuggingFace model "
                              f"directory. Point it at the directory save_pretrained wrote.")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(name, spec.revision):
        raise ConfigError(
            f"model.name_or_path={name!r} is a hub id, HF_HUB_OFFLINE=1 is set and the id is not in the local "
            f"HuggingFace cache: unset HF_HUB_OFFLINE, or use a local HF directory (model=local "
            f"model.name_or_path=/path) or the embedded model (model=smollm2)."
        )


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return True
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id: let the loader say what is wrong with it
        return False
    return isinstance(found, str)


def check_writable(run_dir: Path) -> None:
    """The run directory (or its nearest existing parent) must be writable: found now, not after an hour."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={run_dir}: {probe} is not a writable directory. Set run_dir= to a directory "
                          f"you can write to.")
