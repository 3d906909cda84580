"""GGUF facts (tensor types, header) and the independent-decode check of a converted directory."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from nvfp4kv.model_sources.common import FetchError


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        value = f.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None
    return value


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """GGUF tensor type counts and the header facts a reader needs to judge the source."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    arch = _field(reader, "general.architecture")
    info: dict[str, Any] = {
        "tensor_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "n_tensors": len(reader.tensors),
        "architecture": arch,
        "general_name": _field(reader, "general.name"),
    }
    file_type = _field(reader, "general.file_type")
    if file_type is not None:
        try:
            info["file_type"] = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            info["file_type"] = int(file_type)
    if arch:
        for key, out in [("block_count", "layers"), ("attention.head_count", "q_heads"),
                         ("attention.head_count_kv", "kv_heads"), ("embedding_length", "hidden_size"),
                         ("context_length", "context_length"), ("attention.key_length", "head_dim")]:
            value = _field(reader, f"{arch}.{key}")
            if value is not None:
                info[out] = value
        if "head_dim" not in info and info.get("hidden_size") and info.get("q_heads"):
            info["head_dim"] = int(info["hidden_size"]) // int(info["q_heads"])
    info["has_chat_template"] = "tokenizer.chat_template" in reader.fields
    return info


#: GGUF tensor -> HF parameter (llama/qwen2 naming), for the independent-decode check;
#: Q/K are left out (llama GGUFs permute them) and so is the tied output head.
_CHECK_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
}


def check_against_gguf(gguf_path: Path, hf_dir: Path) -> dict[str, str]:
    """Decode a few GGUF tensors with the ``gguf`` package and compare to the saved BF16 weights."""
    import gguf
    import torch
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    saved: dict[str, Path] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                saved[key] = shard
    result: dict[str, str] = {}
    for g_name, hf_name in _CHECK_TENSORS.items():
        if g_name not in by_name or hf_name not in saved:
            continue
        t = by_name[g_name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        with safe_open(str(saved[hf_name]), framework="pt") as fh:
            got = fh.get_tensor(hf_name)
        ref = ref.reshape(got.shape).to(got.dtype)
        ok = torch.equal(ref, got)
        result[f"{g_name} ({t.tensor_type.name}) -> {hf_name}"] = "exact" if ok else "MISMATCH"
        if not ok:
            raise FetchError(
                f"converted {hf_name} differs from an independent decode of {g_name}: the transformers GGUF "
                f"loader changed; delete {hf_dir} and report it."
            )
    return result
