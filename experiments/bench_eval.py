"""Evaluation throughput benchmark (a measurement, not a test): stock lm-eval ``hf`` vs ``nvfp4kv``.

In one process, on the same model object, the same task slice and the same batch size, side by
side (repetitions interleaved: stock, ours bf16, ours nvfp4, then again):

- ``stock``: lm-eval's own ``HFLM`` (``--model hf``): single right-padded forwards for
  loglikelihood, ``model.generate`` with transformers' ``DynamicCache`` for generation;
- ``ours_<kv>``: :class:`~nvfp4kv.eval.lm.KVQuantLM` with that KV cache (default ``bf16`` and
  ``nvfp4``), ``decode_faithful`` loglikelihood (prefill + teacher-forced decode steps through the
  quantized cache), batched generation through the cache, batch-invariant (left padding announced
  to the cache, row-invariant attention). ``share_prefill`` is off, so every configuration pays
  for its own prefills (a sweep would reuse the first format's).

Tasks: MMLU (loglikelihood: ``--limit`` questions per subject of ``--subjects``) and GSM8K
(``generate_until``: ``--limit`` problems, ``--max-gen-toks`` new tokens, ``--num-fewshot`` shots),
from ``$NVFP4KV_DATA_DIR`` / ``../shared/data`` or the packaged sample. Each run goes through
lm-eval's ``simple_evaluate`` (requests built by lm-eval, as a real run builds them). Reported
per task and configuration: requests/s (wall) and CPU-s per request (``time.process_time``: every
thread of this process), the median over ``--repeats``, and each as a ratio to stock.

Run: ``python -m experiments.bench_eval`` (SmolLM2-135M fp32, CPU, batch 8) or
``python -m experiments.bench_eval --device cuda``; ``--tiny`` swaps in a 2-layer random Llama
(seconds; for tests). Writes ``results/bench/eval_<device>.json`` (or ``--out``) and prints a table.
On a shared CPU pass ``--threads 1``: with more OpenMP threads than free cores, threads spin while
they wait for each other, which inflates wall *and* CPU time by whatever the other load happens to
be (measured here: the same generation 4 s or 67 s); one thread measures the work itself.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nvfp4kv.results import atomic_write_json

DEFAULT_KVS = ("bf16", "nvfp4")
DEFAULT_SUBJECTS = ("anatomy", "astronomy")


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) for the benchmark."""
    from transformers import AutoTokenizer

    from nvfp4kv.models import load_model, resolve_path

    if args.tiny:
        from nvfp4kv.testing import tiny_llama

        tokenizer = AutoTokenizer.from_pretrained(resolve_path("embedded:smollm2-135m-instruct"))
        model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=2048).to(args.device)
        return model, tokenizer
    bundle = load_model({"name_or_path": args.model, "device": args.device, "dtype": args.dtype})
    return bundle.model, bundle.tokenizer


def task_objects(args: argparse.Namespace) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """name -> (lm-eval task object, its TaskManager, simple_evaluate keyword arguments)."""
    from nvfp4kv.eval.data import resolve_data_dir
    from nvfp4kv.eval.lmeval_tasks import LmEvalTaskConfig, _load_task, _task_manager, prepare_task

    configs = {
        "mmlu": {"lm_eval_task": "mmlu", "subjects": list(args.subjects), "num_fewshot": 0},
        "gsm8k": {"lm_eval_task": "gsm8k", "num_fewshot": args.num_fewshot,
                  "gen_kwargs": {"max_gen_toks": args.max_gen_toks}},
    }
    out = {}
    for name in args.tasks:
        cfg = LmEvalTaskConfig.from_dict(configs[name])
        prepared = prepare_task(cfg, resolve_data_dir(cfg.data_dir))
        tm = _task_manager(prepared, {})
        out[name] = (_load_task(tm, prepared), tm, {"num_fewshot": cfg.num_fewshot, "gen_kwargs": cfg.gen_kwargs})
    return out


def make_lm(label: str, model: Any, tokenizer: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    from nvfp4kv.eval.lm import KVQuantLM

    if label == "stock":
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return KVQuantLM(pretrained=model, tokenizer=tokenizer, kv=label.removeprefix("ours_"), batch_size=batch_size,
                     progress=False, share_prefill=False)


def run_once(lm: Any, task: Any, tm: Any, kwargs: dict[str, Any], limit: int) -> tuple[float, float, int, Any]:
    """(wall s, CPU s, requests, per-sample responses) of one simple_evaluate over the slice."""
    from lm_eval.evaluator import simple_evaluate

    counted = {"n": 0}
    for method in ("loglikelihood", "generate_until", "loglikelihood_rolling"):
        inner = getattr(lm, method)

        def counting(requests, *a, _inner=inner, **kw):
            counted["n"] += len(requests)
            return _inner(requests, *a, **kw)

        setattr(lm, method, counting)
    task = copy.deepcopy(task)  # lm-eval stores the instances on the task object
    wall, cpu = time.perf_counter(), time.process_time()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=True, task_manager=tm,
                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    responses = {name: [s["resps"] for s in samples] for name, samples in sorted(out["samples"].items())}
    return wall, cpu, counted["n"], responses


def run_bench(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    labels = ["stock", *(f"ours_{kv}" for kv in args.kv)]
    tasks = task_objects(args)
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "machine": platform.machine(), "device": str(next(model.parameters()).device)},
        "settings": {"model": "tiny" if args.tiny else args.model, "dtype": str(next(model.parameters()).dtype),
                     "batch_size": args.batch_size, "limit": args.limit, "subjects": list(args.subjects),
                     "num_fewshot_gsm8k": args.num_fewshot, "max_gen_toks": args.max_gen_toks,
                     "repeats": args.repeats, "kv": list(args.kv)},
        "tasks": {},
    }
    for name, (task, tm, kwargs) in tasks.items():
        run_once(make_lm("stock", model, tokenizer, args.batch_size), task, tm, kwargs, 1)  # warm-up
        runs: dict[str, list[tuple[float, float, int]]] = {label: [] for label in labels}
        responses: dict[str, Any] = {}
        for _ in range(args.repeats):
            for label in labels:
                wall, cpu, n, resp = run_once(make_lm(label, model, tokenizer, args.batch_size), task, tm, kwargs,
                                              args.limit)
                runs[label].append((wall, cpu, n))
                responses[label] = resp
                print(f"  {name} {label}: {n} requests, {wall:.2f} s wall, {cpu:.2f} CPU-s", file=sys.stderr, flush=True)
        rows = {}
        for label, rs in runs.items():
            wall = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            n = rs[0][2]
            rows[label] = {"requests": n, "wall_s": wall, "cpu_s": cpu, "requests_per_s": n / wall,
                           "cpu_s_per_request": cpu / n, "times_s": [r[0] for r in rs]}
        for label, row in rows.items():
            row["throughput_vs_stock"] = row["requests_per_s"] / rows["stock"]["requests_per_s"]
            row["cpu_per_request_vs_stock"] = row["cpu_s_per_request"] / rows["stock"]["cpu_s_per_request"]
        # same requests in every configuration (the slice, batching aside)
        assert len({row["requests"] for row in rows.values()}) == 1, rows
        record["tasks"][name] = {
            "configs": rows,
            "same_responses_as_stock": {label: responses[label] == responses["stock"] for label in labels[1:]},
            "max_abs_loglikelihood_diff_vs_stock": {label: _max_float_diff(responses[label], responses["stock"])
                                                    for label in labels[1:]},
        }
    return record


def _max_float_diff(a: Any, b: Any) -> float | None:
    """Largest |a - b| over the floats of two equally nested responses (None: no floats)."""
    if isinstance(a, (list, tuple, dict)):
        items = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
        diffs = [d for x, y in items if (d := _max_float_diff(x, y)) is not None]
        return max(diffs) if diffs else None
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    return None


def print_table(record: dict[str, Any]) -> None:
    s = record["settings"]
    print(f"{s['model']} {s['dtype']} on {record['host']['device']}, batch {s['batch_size']}, "
          f"{record['host']['threads']} threads, median of {s['repeats']}")
    print(f"{'task':8} {'config':14} {'requests':>8} {'req/s':>8} {'x stock':>8} {'CPU-s/req':>10} {'x stock':>8} same")
    for name, task in record["tasks"].items():
        for label, row in task["configs"].items():
            same = "" if label == "stock" else str(task["same_responses_as_stock"][label])
            print(f"{name:8} {label:14} {row['requests']:>8} {row['requests_per_s']:>8.2f} "
                  f"{row['throughput_vs_stock']:>8.2f} {row['cpu_s_per_request']:>10.3f} "
                  f"{row['cpu_per_request_vs_stock']:>8.2f} {same}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (tests)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k"], choices=["mmlu", "gsm8k"])
    parser.add_argument("--subjects", nargs="+", default=list(DEFAULT_SUBJECTS))
    parser.add_argument("--limit", type=int, default=8, help="documents per (sub)task")
    parser.add_argument("--num-fewshot", type=int, default=0, help="GSM8K shots")
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--kv", nargs="+", default=list(DEFAULT_KVS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    record = run_bench(model, tokenizer, args)
    out = args.out or Path(f"results/bench/eval_{'tiny_' if args.tiny else ''}{args.device.split(':')[0]}.json")
    atomic_write_json(out, record)
    print_table(record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
