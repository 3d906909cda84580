"""The provenance record of a fetched model: where it lives, how it is read back and summarised."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.json"
#: copy of the provenance inside the converted HF directory (read by ``nvfp4kv.models``)
HF_PROVENANCE_FILE = "nvfp4kv_provenance.json"


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance dict in a cache dir or converted HF dir, or None."""
    for candidate in (Path(path) / PROVENANCE_FILE, Path(path) / HF_PROVENANCE_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "gguf", "accelerate", "safetensors", "tokenizers", "pip", "nvfp4kv"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def source_summary(provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few provenance fields a result row should carry (source, hashes, weight types)."""
    if not provenance:
        return None
    gguf_info = provenance.get("gguf") or {}
    return {
        "offline_source": provenance.get("name"),
        "label": provenance.get("label"),
        "hub_equivalent": provenance.get("hub_equivalent"),
        "weight_quantization": provenance.get("weight_quantization"),
        "gguf_tensor_types": gguf_info.get("tensor_types"),
        "gguf_sha256": gguf_info.get("sha256"),
        "packages": (provenance.get("source") or {}).get("packages"),
        "usable": provenance.get("usable", True),
        "warning": provenance.get("warning"),
    }
