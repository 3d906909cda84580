"""Tiny randomly initialised models for tests and examples (no download, CPU, < 1 s).

They are real transformers architectures (Llama, Qwen3 with q/k norms, Qwen3 with
sliding-window layers) so the cache meets the same attention code a real model runs; only
the sizes are small. head_dim is 32 so every block size (16, 32) divides it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(model_cls: type[PreTrainedModel], config, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    return model


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A 2-layer Llama (GQA 4:2, head_dim 32)."""
    return _build(LlamaForCausalLM, LlamaConfig(**{**_COMMON, **overrides}), seed, dtype)


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A 2-layer Qwen3 (q/k RMSNorm before RoPE, GQA 4:2, head_dim 32)."""
    return _build(Qwen3ForCausalLM, Qwen3Config(**{**_COMMON, **overrides}), seed, dtype)


def tiny_sliding(seed: int = 0, dtype: torch.dtype = torch.float32, window: int = 8) -> PreTrainedModel:
    """A 3-layer Qwen3 whose config declares sliding-window layers (a hybrid model)."""
    return tiny_qwen3(
        seed,
        dtype,
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )


#: every registered format with the options that change its arithmetic: the cases the format
#: contract and the finite-in/finite-out property run over (a new format joins both by being added here)
FORMAT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("bf16", {}),
    ("fp8_e4m3", {}),
    ("fp8_e4m3", {"scaling": "head"}),
    ("fp8_e4m3", {"scaling": "token"}),
    ("nvfp4", {}),
    ("nvfp4", {"tiny_scale": "modelopt"}),
    ("fp4_mx_block16", {}),
    ("mxfp4", {}),
    ("int4", {"axis": "token", "group_size": 32}),
    ("int4", {"axis": "channel", "group_size": 16}),
    ("int4", {"axis": "token", "group_size": 32, "scale_dtype": "float32"}),
    ("int2", {"axis": "token", "group_size": 16}),
    ("int2", {"axis": "channel", "group_size": 8}),
]


def format_case_id(name: str, options: dict[str, Any]) -> str:
    return name + "".join(f"-{v}" for v in options.values())
