"""SQNR and storage of every KV format on synthetic K/V, the first sanity number per format.

Two inputs shaped ``[1, 8, 4096, 128]`` (batch, kv heads, tokens, head_dim), seeded, cast to
BF16 as a BF16 model's K/V would be (that BF16 tensor is the reference, so ``bf16`` is exact):

- ``gaussian``: i.i.d. N(0, 1);
- ``outlier_channels``: the same tensor with a few fixed channels per head scaled by 20, the
  per-channel outliers real keys show (KIVI's motivation for per-channel key scales).

Per format: SQNR in dB (``10 log10(sum x^2 / sum (x - x_hat)^2)``), storage bits per element of
the token-wise parts, bytes per token per kv head at head_dim 128, and the ratio to BF16
(global scales, 32 bits per tensor or head, are not counted). Prints a Markdown table and
writes ``results/bench/sqnr.json`` atomically (temporary file + ``os.replace``).

Run: ``python -m experiments.measure_sqnr`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nvfp4kv.formats import get_format
from nvfp4kv.formats.sqnr import sqnr_db
from nvfp4kv.results import atomic_write_text

SHAPE = (1, 8, 4096, 128)
OUTLIER_CHANNELS_PER_HEAD = 4
OUTLIER_GAIN = 20.0
DEFAULT_OUTPUT = Path("results/bench/sqnr.json")

#: (label, registry name, options); KIVI rows show both axes (keys: channel, values: token)
FORMATS: list[tuple[str, str, dict[str, Any]]] = [
    ("bf16", "bf16", {}),
    ("fp8_e4m3 (tensor scale)", "fp8_e4m3", {"scaling": "tensor"}),
    ("fp8_e4m3 (head scale)", "fp8_e4m3", {"scaling": "head"}),
    ("fp8_e4m3 (token scale)", "fp8_e4m3", {"scaling": "token"}),
    ("nvfp4", "nvfp4", {}),
    ("nvfp4 (modelopt tiny scales)", "nvfp4", {"tiny_scale": "modelopt"}),
    ("fp4_mx_block16 (SGLang)", "fp4_mx_block16", {}),
    ("mxfp4", "mxfp4", {}),
    ("int4 token g32", "int4", {"axis": "token", "group_size": 32}),
    ("int4 channel g32", "int4", {"axis": "channel", "group_size": 32}),
    ("int2 token g32", "int2", {"axis": "token", "group_size": 32}),
    ("int2 channel g32", "int2", {"axis": "channel", "group_size": 32}),
]


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    """The two BF16 test tensors; outlier channels are drawn per head from the same seed."""
    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(SHAPE, generator=gen)
    gains = torch.ones(1, SHAPE[1], 1, SHAPE[3])
    for head in range(SHAPE[1]):
        channels = torch.randperm(SHAPE[3], generator=gen)[:OUTLIER_CHANNELS_PER_HEAD]
        gains[0, head, 0, channels] = OUTLIER_GAIN
    return {
        "gaussian": gaussian.to(torch.bfloat16),
        "outlier_channels": (gaussian * gains).to(torch.bfloat16),
    }


def measure(inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    head_dim = SHAPE[-1]
    rows = []
    for label, name, options in FORMATS:
        fmt = get_format(name, **options)
        row: dict[str, Any] = {"label": label, "format": name, "options": options}
        for input_name, x in inputs.items():
            gs = fmt.global_scale(x) if fmt.uses_global_scale else None
            x_hat = fmt.dequantize(fmt.quantize(x, gs), gs, torch.float32)
            row[f"sqnr_db_{input_name}"] = sqnr_db(x, x_hat)
        bits = fmt.bits_per_element(head_dim)
        row["bits_per_element"] = bits
        row["bytes_per_token_per_head"] = bits * head_dim / 8
        row["ratio_vs_bf16"] = bits / 16.0
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def db(value: float) -> str:
        return "exact" if math.isinf(value) else f"{value:.2f}"

    lines = [
        "| format | SQNR N(0,1) dB | SQNR outlier channels dB | bits/elem "
        "| bytes/token/head (D=128) | vs BF16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {db(r['sqnr_db_gaussian'])} | {db(r['sqnr_db_outlier_channels'])} "
            f"| {r['bits_per_element']:g} | {r['bytes_per_token_per_head']:g} "
            f"| {r['ratio_vs_bf16']:.4f}x |"
        )
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one (:func:`nvfp4kv.results.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = measure(make_inputs(args.seed))
    elapsed = time.perf_counter() - start
    print(markdown_table(rows))
    for row in rows:  # JSON has no Infinity: an exact copy is recorded as null
        for key in ("sqnr_db_gaussian", "sqnr_db_outlier_channels"):
            row[key] = None if math.isinf(row[key]) else row[key]
    payload = {
        "command": "python -m experiments.measure_sqnr"
        + (f" --seed {args.seed}" if args.seed else ""),
        "shape": list(SHAPE),
        "seed": args.seed,
        "reference_dtype": "bfloat16",
        "outliers": {"channels_per_head": OUTLIER_CHANNELS_PER_HEAD, "gain": OUTLIER_GAIN},
        "note": "sqnr null = exact copy; bits exclude per-tensor/per-head global scales",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "elapsed_s": round(elapsed, 1),
        "rows": rows,
    }
    write_json_atomically(args.output, payload)
    print(f"\nwrote {args.output} ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
