"""The calibrated-scales file: per-layer K and V amax plus where they came from.

The file stores **amax**, not scales, because a scale is a property of the format that reads it:
ModelOpt's convention is ``amax / (6*448)`` for NVFP4 (E2M1 max times E4M3 max) and ``amax / 448``
for FP8, and a K-FP8/V-NVFP4 config needs one of each from the same calibration. For a reader's
convenience the file also lists those two derived scales per layer (``scales``); what the cache
uses is recomputed from amax by each format (:func:`nvfp4kv.cache.config.decode_scale_from_amax`).

Torch-free on purpose: a KV config naming a scales file is validated before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError

SCALES_FILE_VERSION = 1
#: ModelOpt's divisors: amax -> decode scale (NVFP4_KV_CFG / FP8_KV_CFG export conventions)
MODELOPT_DIVISORS = {"nvfp4": 6.0 * 448.0, "fp8_e4m3": 448.0}


@dataclass(frozen=True)
class LayerAmax:
    """Largest finite |K| and |V| of one attention layer over the calibration set."""

    k_amax: float
    v_amax: float
    k_amax_per_head: list[float] = field(default_factory=list)
    v_amax_per_head: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ScalesFile:
    """A calibration result: what model, what data, how much, and the amax of every layer."""

    model: str
    model_source: dict[str, Any]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    data: dict[str, Any]  # dataset, split, n_samples, max_length, seed, tokens
    layers: dict[int, LayerAmax]
    created_by: dict[str, Any] = field(default_factory=dict)  # nvfp4kv version, git commit, time
    version: int = SCALES_FILE_VERSION

    def amax_pairs(self) -> dict[int, tuple[float, float]]:
        return {i: (layer.k_amax, layer.v_amax) for i, layer in self.layers.items()}

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int, path: str = "") -> None:
        """Refuse scales calibrated on another model shape, naming both shapes and the fix."""
        ours = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (num_layers, num_kv_heads, head_dim)
        if ours != theirs:
            raise ConfigError(
                f"static_scales_file {path or '(given)'} was calibrated on {self.model!r} with (layers, kv heads, "
                f"head_dim) = {ours}, but this model has {theirs}: the scales belong to another model. "
                f"Calibrate this model: python -m experiments.calibrate model=<this model>."
            )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["layers"] = {str(i): asdict(layer) for i, layer in sorted(self.layers.items())}
        doc["scales"] = {
            fmt: {str(i): [layer.k_amax / div, layer.v_amax / div] for i, layer in sorted(self.layers.items())}
            for fmt, div in MODELOPT_DIVISORS.items()
        }
        doc["scales_note"] = ("derived for reading convenience: amax/(6*448) for nvfp4, amax/448 for fp8_e4m3 "
                              "(ModelOpt); the cache recomputes each format's scale from the amax")
        return doc


def write_scales_file(path: str | os.PathLike[str], scales: ScalesFile) -> Path:
    """Write atomically (a crash never leaves half a file a later run would read)."""
    from nvfp4kv.results import atomic_write_text

    return atomic_write_text(path, json.dumps(scales.to_json(), indent=1, sort_keys=True) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_scales_file(path: str | os.PathLike[str]) -> ScalesFile:
    """Read and check a scales file; every problem is one :class:`ConfigError` naming the fix."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(
            f"static_scales_file {str(path)!r} does not exist. Write one with "
            f"`python -m experiments.calibrate model=<model>` (it prints the path), or use scale_policy=prefill."
        )
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"static_scales_file {str(path)!r} is not readable JSON ({err}); recalibrate with "
                          f"`python -m experiments.calibrate`.") from None
    if not isinstance(doc, dict) or doc.get("version") != SCALES_FILE_VERSION or "layers" not in doc:
        raise ConfigError(f"static_scales_file {str(path)!r} is not an nvfp4kv scales file (version "
                          f"{SCALES_FILE_VERSION} with 'layers'); recalibrate with `python -m experiments.calibrate`.")
    try:
        layers = {int(i): LayerAmax(**{k: v for k, v in entry.items()}) for i, entry in doc["layers"].items()}
        scales = ScalesFile(
            model=str(doc["model"]), model_source=dict(doc.get("model_source") or {}),
            num_layers=int(doc["num_layers"]), num_kv_heads=int(doc["num_kv_heads"]), head_dim=int(doc["head_dim"]),
            data=dict(doc.get("data") or {}), layers=layers, created_by=dict(doc.get("created_by") or {}),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"static_scales_file {str(path)!r} is malformed ({err!r}); recalibrate with "
                          f"`python -m experiments.calibrate`.") from None
    for i, layer in layers.items():
        for name in ("k_amax", "v_amax"):
            value = getattr(layer, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"static_scales_file {str(path)!r}: layer {i} {name}={value!r} is not a finite "
                                  f"positive number (a layer the calibration never saw?); recalibrate with more data.")
    return scales
