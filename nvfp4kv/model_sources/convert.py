"""Step 3: a GGUF dequantized with transformers and saved as a plain HF directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from nvfp4kv.model_sources.common import _say


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16",
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Dequantize a GGUF with transformers and save a plain HF directory (model + tokenizer).

    The SmolLM2 route of ``nvfp4kv.models``: transformers cannot always ``save_pretrained`` a
    GGUF-loaded model, so the config is rebuilt without ``quantization_config``, a fresh model
    is made from it, the dequantized weights are loaded strictly (every key must match), and
    that model is saved. ``out_dir`` must not exist; the caller renames it into place.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    out_dir.mkdir(parents=True)
    tic = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.x may keep GGUF blocks packed when a kernel exists: ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype,
                                                  **kwargs)
    _say(log, f"  loaded GGUF with transformers in {time.perf_counter() - tic:.0f} s ({type(loaded).__name__})")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("dtype", None)
    config_dict["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(out_dir)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    n_params = sum(p.numel() for p in fresh.parameters())
    model_class = type(fresh).__name__
    del loaded
    fresh.save_pretrained(out_dir)
    del fresh
    tokenizer.save_pretrained(out_dir)
    cfg = config.to_dict()
    return {
        "method": "transformers from_pretrained(gguf_file=...) -> fresh model from config (no quantization_config) "
                  "-> load_state_dict(strict=True) -> save_pretrained",
        "dtype": dtype, "model_class": model_class, "num_parameters": n_params,
        "config": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "hidden_size", "vocab_size",
                                           "max_position_embeddings", "tie_word_embeddings", "rope_theta")
                   if k in cfg},
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


Converter = Callable[[Path, Path], dict[str, Any]]
