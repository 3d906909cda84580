"""The model a sweep evaluates: loaded once per process, sized before loading, checked against formats.

One sweep loads its model once and runs every KV format on it (switching the cache never needs
a reload); Hydra multirun jobs in one process share the module-level cache, which keeps one
model at a time so a multirun over models does not accumulate them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError

log = logging.getLogger(__name__)

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
    from nvfp4kv.cache.cache import config_head_dim

    config = model.config
    return config_head_dim(getattr(config, "get_text_config", lambda: config)())


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
