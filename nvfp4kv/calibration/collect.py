"""Run a model over calibration windows and record the amax of K and V per layer (and per head).

The K/V recorded are exactly what a cache stores: keys *after* RoPE, values as projected, in the
model's dtype, read back from a plain ``DynamicCache`` after each forward. The largest finite
magnitude is kept (a NaN/Inf in a calibration forward is a model problem, reported, not a scale).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from nvfp4kv.cache.cache import attention_shape
from nvfp4kv.calibration.scales_file import LayerAmax, ScalesFile
from nvfp4kv.calibration.texts import pack_windows
from nvfp4kv.errors import NVFP4KVError


def _finite_amax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = x.detach().float().abs()
    if not torch.isfinite(x).all():
        raise NVFP4KVError("calibration forward produced NaN/Inf K/V: the model or its dtype is broken "
                           "(try model.dtype=float32); no scales were written.")
    return x.amax(dim=dims)


@torch.no_grad()
def collect_kv_amax(model: Any, windows: list[list[int]], progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: ``k``/``v`` amax per KV head (``[H]``, FP32) over every window."""
    from transformers import DynamicCache

    from nvfp4kv.cache import cache_kwarg_name

    device = next(model.parameters()).device
    stats: dict[int, dict[str, torch.Tensor]] = {}
    for window in tqdm(windows, desc="calibration", disable=not progress):
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([window], device=device), use_cache=True, **{cache_kwarg_name(model): cache})
        for idx, layer in enumerate(cache.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None or keys.numel() == 0:
                continue
            entry = stats.setdefault(idx, {})
            for name, t in (("k", keys), ("v", values)):
                per_head = _finite_amax(t, (0, 2, 3)).cpu()
                entry[name] = per_head if name not in entry else torch.maximum(entry[name], per_head)
    return stats


def calibrate(bundle: Any, texts: list[str], *, max_length: int, data: dict[str, Any],
              progress: bool = True) -> ScalesFile:
    """Tokenize ``texts``, pack them into windows, collect amax, and return the :class:`ScalesFile`."""
    from nvfp4kv.eval.identity import git_state, package_versions

    tok = bundle.tokenizer
    windows = pack_windows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], max_length)
    start = time.time()
    stats = collect_kv_amax(bundle.model, windows, progress=progress)
    text_config = bundle.model.config.get_text_config(decoder=True)
    kv_heads, head_dim = attention_shape(text_config)
    layers = {
        idx: LayerAmax(k_amax=float(e["k"].max()), v_amax=float(e["v"].max()),
                       k_amax_per_head=[float(x) for x in e["k"]], v_amax_per_head=[float(x) for x in e["v"]])
        for idx, e in sorted(stats.items())
    }
    commit, dirty = git_state()
    return ScalesFile(
        model=bundle.name, model_source=dict(bundle.source_info or {"name_or_path": bundle.spec.name_or_path}),
        num_layers=int(text_config.num_hidden_layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
        data={**data, "windows": len(windows), "tokens": sum(len(w) for w in windows), "max_length": max_length},
        layers=layers,
        created_by={"versions": package_versions(), "git_commit": commit, "git_dirty": dirty,
                    "seconds": round(time.time() - start, 1), "dtype": str(next(bundle.model.parameters()).dtype)},
    )
