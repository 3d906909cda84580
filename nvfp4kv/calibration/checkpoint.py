"""Read K/V scales stored in a checkpoint (``scale_policy=checkpoint``), as serving engines do.

vLLM and SGLang read per-layer ``k_scale``/``v_scale`` tensors from FP8/NVFP4-KV checkpoints
(ModelOpt and llm-compressor write them); without them they fall back to 1.0 (our ``unit``
policy). The tensor names each loader accepts are listed, with their sources, in
docs/engines.md; :data:`SCALE_NAME_PATTERNS` is that list as regular expressions. Values are the
*decode* scale (``x ~= code * scale``): ``amax/448`` for FP8, which is what our formats take.

Only the scale tensors are read (``safetensors.safe_open`` reads one tensor at a time), so a
multi-GB checkpoint costs milliseconds here.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from nvfp4kv.errors import ConfigError

#: (regex over a tensor name -> layer index, "k" | "v"); docs/engines.md, "Checkpoint K/V scale tensor
#: names", lists who writes and who reads each (vLLM 0.33.0, SGLang 0.5.23, TensorRT-LLM, ModelOpt)
SCALE_NAME_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    # ModelOpt HF export: model.layers.3.self_attn.k_proj.k_scale (vLLM/SGLang remap it to .attn.k_scale)
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?P<which>[kv])_proj\.(?P=which)_scale$",
    # compressed-tensors (llm-compressor) and vLLM's own name: model.layers.3.self_attn[.attn].k_scale
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?:attn\.)?(?P<which>[kv])_scale$",
    # Quark and vLLM `quant_method: fp8` checkpoints: model.layers.3.self_attn.k_proj.output_scale
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?P<which>[kv])_proj\.output_scale$",
    # fused-QKV exports (vLLM only): model.layers.3.self_attn.qkv_proj.k_scale / qkqkv_proj
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.qk(?:qk)?v_proj\.(?P<which>[kv])_scale$",
    # NemotronH (ModelOpt): model.layers.3.mixer.k_proj.k_scale
    r"(?:^|\.)layers\.(?P<layer>\d+)\.mixer\.(?P<which>[kv])_proj\.(?P=which)_scale$",
    # HYV3 (vLLM only): model.layers.3.self_attn.k_cache.scale
    r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?P<which>[kv])_cache\.scale$",
))
#: the deprecated single ``kv_scale`` (one value for K and V, as vLLM/SGLang use it)
KV_SCALE_PATTERN = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\..*\.kv_scale$")


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.safetensors"))
    return []


def match_scale_name(name: str) -> tuple[int, str] | None:
    """``(layer, "k"|"v"|"kv")`` if ``name`` is a K/V scale tensor under a known name, else None
    (``"kv"``: the deprecated single ``kv_scale`` used for both)."""
    for pattern in SCALE_NAME_PATTERNS:
        m = pattern.search(name)
        if m:
            return int(m.group("layer")), m.group("which")
    m = KV_SCALE_PATTERN.search(name)
    return (int(m.group("layer")), "kv") if m else None


@lru_cache(maxsize=8)
def _read(path_str: str, mtimes: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    from safetensors import safe_open

    found: dict[int, dict[str, float]] = {}
    for file in _safetensors_files(Path(path_str)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                hit = match_scale_name(name)
                if hit is None:
                    continue
                value = f.get_tensor(name).float()
                if value.numel() != 1:
                    raise ConfigError(f"checkpoint scale {name} in {file} has {value.numel()} values (per-head scales, "
                                      f"compressed-tensors attn_head); only per-tensor K/V scales are read, as SGLang "
                                      f"and vLLM's default loaders do. Use scale_policy=static with a scales file.")
                for which in ("k", "v") if hit[1] == "kv" else (hit[1],):
                    found.setdefault(hit[0], {}).setdefault(which, float(value.reshape(())))
    incomplete = sorted(i for i, kv in found.items() if set(kv) != {"k", "v"})
    if incomplete:
        raise ConfigError(f"checkpoint {path_str} has a k_scale without a v_scale (or the reverse) in layers "
                          f"{incomplete}; fix the checkpoint or use scale_policy=static with a scales file.")
    return {i: (kv["k"], kv["v"]) for i, kv in sorted(found.items())}


def read_checkpoint_scales(path: str | os.PathLike[str]) -> dict[int, tuple[float, float]]:
    """``{layer: (k_scale, v_scale)}`` from the ``*.safetensors`` of ``path`` (a file or a directory).

    Raises :class:`ConfigError` naming the names looked for and the fix when there are none.
    """
    p = Path(os.path.expanduser(str(path)))
    files = _safetensors_files(p)
    if not files:
        raise ConfigError(f"scale_policy=checkpoint: {str(path)!r} has no *.safetensors files to read k_scale/v_scale "
                          f"from. Set checkpoint_scales=/path/to/checkpoint, or use scale_policy=static "
                          f"(python -m experiments.calibrate) or unit.")
    scales = _read(str(p.resolve()), tuple(f.stat().st_mtime_ns for f in files))
    if not scales:
        names = "; ".join(pat.pattern for pat in SCALE_NAME_PATTERNS)
        raise ConfigError(f"scale_policy=checkpoint: {str(path)!r} holds no K/V scale tensors (looked for names "
                          f"matching {names}). This checkpoint was not exported with KV scales: calibrate them "
                          f"(python -m experiments.calibrate, then scale_policy=static static_scales_file=...) or "
                          f"use scale_policy=unit (vLLM's default without scales).")
    return dict(scales)
