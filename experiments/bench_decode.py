"""Decode benchmark (a measurement, not a test): greedy generation speed with each KV cache.

In one process, on the same prompt, side by side:

- ``dynamic``: transformers' ``DynamicCache`` (the yardstick, ratio 1.00);
- ``hf_fp8``: transformers' ``QuantizedCache(backend="fp8")`` when this transformers has it
  (skipped with a note otherwise);
- ours: ``fp8_e4m3`` and ``nvfp4`` for K and V, each with ``dequant_cache`` False and True.

Each configuration generates ``--new-tokens`` greedy tokens after a ``--prompt-len`` prompt;
repetitions are interleaved (config A, B, C, ..., then again) and the median of
``--repeats`` wall times is reported as a ratio to ``DynamicCache``'s median.

Per-step growth: for every configuration, a manual greedy loop times single decode steps after
prefilling ``--growth-contexts`` tokens (default 256 and the prompt length); a per-step cost
that grows faster than ``DynamicCache``'s (attention's own growth) means the cache re-copies its
history every step.

Checks: our greedy tokens must be identical with ``dequant_cache`` True and False (the fast path
changes no output bit); token agreement with ``DynamicCache`` is printed (quantization may change
tokens, that is not an error).

Writes ``results/bench/decode_cpu.json`` (or ``--out``) and prints a table.
Run: ``python -m experiments.bench_decode`` (SmolLM2-135M, FP32, CPU; a few minutes on 2 cores)
or ``python -m experiments.bench_decode --tiny --prompt-len 64 --new-tokens 8`` (seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache
from nvfp4kv.results import atomic_write_json

DEFAULT_OUT = Path("results/bench/decode_cpu.json")

#: our configurations: label -> KVCacheConfig keyword arguments
OURS: dict[str, dict[str, Any]] = {
    "ours_fp8": dict(k_format="fp8_e4m3", v_format="fp8_e4m3", dequant_cache=False),
    "ours_fp8_dequant_cache": dict(k_format="fp8_e4m3", v_format="fp8_e4m3", dequant_cache=True),
    "ours_nvfp4": dict(k_format="nvfp4", v_format="nvfp4", dequant_cache=False),
    "ours_nvfp4_dequant_cache": dict(k_format="nvfp4", v_format="nvfp4", dequant_cache=True),
}
#: pairs whose greedy outputs must be identical (dequant_cache changes no output bit)
SAME_OUTPUT_PAIRS = (("ours_fp8", "ours_fp8_dequant_cache"), ("ours_nvfp4", "ours_nvfp4_dequant_cache"))


def cache_factories(model: Any) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """label -> a function building a fresh cache for ``model``; plus notes on skipped configs."""
    from transformers import DynamicCache

    notes: list[str] = []
    factories: dict[str, Callable[[], Any]] = {"dynamic": lambda: DynamicCache(config=model.config)}
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="fp8", config=model.config)  # probe: older versions lack it
        factories["hf_fp8"] = lambda: QuantizedCache(backend="fp8", config=model.config)
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"
        notes.append(f"hf_fp8 skipped: transformers QuantizedCache(backend='fp8') unavailable ({type(err).__name__}: {err})")
    for label, kwargs in OURS.items():
        factories[label] = lambda kwargs=kwargs: make_cache(model, KVCacheConfig(**kwargs))
    return factories, notes


def make_prompt(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` random token ids (ids 0..2 avoided: pad/bos/eos of the tiny models)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=g)


def generate(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int) -> torch.Tensor:
    """Greedy ``new_tokens`` tokens (exactly that many: EOS does not stop), the new ids only."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **{cache_kwarg_name(model): cache},
    )
    return out[0, ids.shape[1]:]


@torch.inference_mode()
def time_generate(model: Any, factories: dict[str, Callable[[], Any]], ids: torch.Tensor, new_tokens: int,
                  repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Wall times of every config, repetitions interleaved, and each config's greedy tokens."""
    times: dict[str, list[float]] = {k: [] for k in factories}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for label, factory in factories.items():
            cache = factory()
            start = time.perf_counter()
            out = generate(model, ids, cache, new_tokens)
            times[label].append(time.perf_counter() - start)
            print(f"  {label}: {times[label][-1]:.2f} s", file=sys.stderr, flush=True)
            toks = out.tolist()
            if label in tokens and tokens[label] != toks:
                raise AssertionError(f"{label}: greedy tokens differ between repetitions")
            tokens[label] = toks
    return times, tokens


@torch.inference_mode()
def step_times(model: Any, factory: Callable[[], Any], ids: torch.Tensor, steps: int) -> list[float]:
    """Prefill ``ids`` then time ``steps`` single greedy decode steps (forward + argmax)."""
    cache = factory()
    kw = {cache_kwarg_name(model): cache}
    out = model(input_ids=ids, use_cache=True, **kw)
    nxt = out.logits[:, -1:].argmax(-1)
    pos = ids.shape[1]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, cache_position=torch.tensor([pos]), **kw)
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
        pos += 1
    return times


def run_bench(model: Any, *, prompt_len: int = 1024, new_tokens: int = 128, repeats: int = 3,
              growth_contexts: tuple[int, ...] = (256, 1024), growth_steps: int = 16,
              only: list[str] | None = None) -> dict[str, Any]:
    """The whole benchmark on ``model`` (CPU); returns the JSON-ready record."""
    factories, notes = cache_factories(model)
    if only:
        factories = {k: v for k, v in factories.items() if k == "dynamic" or k in only}
    vocab = model.config.vocab_size
    ids = make_prompt(vocab, prompt_len)
    model(input_ids=ids[:, :8])  # warm up kernels / allocator
    times, tokens = time_generate(model, factories, ids, new_tokens, repeats)
    base = statistics.median(times["dynamic"])
    configs: dict[str, Any] = {}
    for label, ts in times.items():
        agree = sum(a == b for a, b in zip(tokens[label], tokens["dynamic"]))
        configs[label] = {
            "median_s": statistics.median(ts), "times_s": ts, "ratio_to_dynamic": statistics.median(ts) / base,
            "tokens": tokens[label], "agreement_with_dynamic": agree / max(len(tokens["dynamic"]), 1),
        }
    identical = {}
    for a, b in SAME_OUTPUT_PAIRS:
        if a in tokens and b in tokens:
            identical[f"{a}=={b}"] = tokens[a] == tokens[b]
    growth: dict[str, Any] = {}
    for label, factory in factories.items():
        per_ctx = {}
        for ctx in growth_contexts:
            st = step_times(model, factory, make_prompt(vocab, ctx, seed=1), growth_steps)
            per_ctx[str(ctx)] = statistics.median(st) * 1e3
            print(f"  {label} step @ {ctx}: {per_ctx[str(ctx)]:.2f} ms", file=sys.stderr, flush=True)
        ctxs = [str(c) for c in growth_contexts]
        growth[label] = {"step_ms": per_ctx,
                         "growth_ms": per_ctx[ctxs[-1]] - per_ctx[ctxs[0]] if len(ctxs) > 1 else 0.0}
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.machine()},
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                     "growth_contexts": list(growth_contexts), "growth_steps": growth_steps,
                     "dtype": str(next(model.parameters()).dtype)},
        "notes": notes,
        "configs": configs,
        "outputs_identical_across_dequant_cache": identical,
        "per_step_growth": growth,
    }


def print_table(record: dict[str, Any]) -> None:
    s = record["settings"]
    print(f"prompt {s['prompt_len']}, {s['new_tokens']} new tokens, median of {s['repeats']}, {s['dtype']}, "
          f"{record['host']['threads']} threads")
    ctxs = [str(c) for c in s["growth_contexts"]]
    print(f"{'config':28s} {'median s':>9s} {'ratio':>6s} {'agree':>6s} " + " ".join(f"{'step@' + c + ' ms':>13s}" for c in ctxs))
    for label, c in record["configs"].items():
        g = record["per_step_growth"].get(label, {}).get("step_ms", {})
        print(f"{label:28s} {c['median_s']:9.3f} {c['ratio_to_dynamic']:6.2f} {c['agreement_with_dynamic']:6.2f} "
              + " ".join(f"{g.get(ctx, float('nan')):13.2f}" for ctx in ctxs))
    for note in record["notes"]:
        print("note:", note)
    for pair, same in record["outputs_identical_across_dequant_cache"].items():
        print(f"identical outputs {pair}: {same}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--growth-contexts", type=int, nargs="+", default=None,
                        help="contexts for the per-step timing (default: 256 and --prompt-len)")
    parser.add_argument("--growth-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="subset of configs (dynamic always runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from nvfp4kv.testing import tiny_llama

        model = tiny_llama(max_position_embeddings=max(4096, 2 * args.prompt_len + args.new_tokens))
    else:
        from nvfp4kv.models import ModelSpec, load_model

        model = load_model(ModelSpec(device="cpu", dtype="float32")).model
    growth = tuple(args.growth_contexts) if args.growth_contexts else tuple(sorted({min(256, args.prompt_len), args.prompt_len}))
    record = run_bench(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                       growth_contexts=growth, growth_steps=args.growth_steps, only=args.only)
    record["settings"]["model"] = "tiny_llama" if args.tiny else "embedded:smollm2-135m-instruct"
    print_table(record)
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    bad = [p for p, same in record["outputs_identical_across_dequant_cache"].items() if not same]
    if bad:
        raise SystemExit(f"outputs differ across dequant_cache: {bad}")
    return record


if __name__ == "__main__":
    main()
