"""Kernel benchmark (a measurement, not a test): throughput, decode latency, memory.

GPU (``--device cuda``):

- device copy bandwidth (``y.copy_(x)``, bytes read + written), the yardstick;
- Triton quantize / dequantize throughput per format in GB/s (bytes read + written) and as a
  fraction of the copy bandwidth (goal >= 0.8), with a bit-exactness check against the torch
  reference run on the same GPU tensor;
- fused packed-KV decode attention latency vs BF16 SDPA decode at 1K, 8K, 32K and 128K tokens
  (Llama-3-8B attention shape: 32 query heads, 8 KV heads, head_dim 128; goal <= 0.6x at 32K),
  eager (``triton.testing.do_bench``) and replayed as a CUDA graph (launch overhead removed;
  L2 flushed before each run in both), plus the
  dequantize-then-SDPA path, a small tuning sweep at 32K, peak extra memory, and the fused
  output's error against dequantize + SDPA.

CPU (``--device cpu``): the torch reference quantizers (``nvfp4``, ``fp4_mx_block16``) vs a
straightforward eager port of SGLang's ``KVFP4QuantizeUtil.batched_quantize`` on the same
tensors, as ``sglang_ms / ours_ms`` measured in one run (goal >= 1.0).

Writes ``results/bench/kernels_<device>.json`` atomically and prints a table.
Run: ``python -m experiments.bench_kernels --device cuda`` (a few minutes on an H100) or
``python -m experiments.bench_kernels --device cpu [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nvfp4kv.formats import get_format
from nvfp4kv.results import atomic_write_json

DEFAULT_OUT = Path("results/bench")
CONTEXTS = (1024, 8192, 32768, 131072)
QUICK_CONTEXTS = (1024, 8192)
DECODE_SHAPE = {"batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128}


# ---------------------------------------------------------------------------------------------
# SGLang's quantizer, ported for the CPU comparison
# ---------------------------------------------------------------------------------------------
#
# A straightforward port of SGLang's ``KVFP4QuantizeUtil.batched_quantize`` (standard path,
# sgl-project/sglang, Apache-2.0), run eagerly (SGLang wraps it in ``torch.compile``). It
# computes in the input's dtype, as SGLang does eagerly. Only used to time against our
# references; nvfp4kv's own ``fp4_mx_block16`` is the spec'd reimplementation.

_SGLANG_E2M1_MAX = 6.0
_SGLANG_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5], dtype=torch.float32)


def sglang_batched_quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, M, N]`` -> packed codes ``[B, M, N/2]`` and exponent bytes ``[B, M*N/16]``."""
    b, m, n = tensor.shape
    reshaped = tensor.view(b, m * n // 16, 16)
    block_max = reshaped.abs().max(dim=-1, keepdim=True).values
    scale_exp = torch.ceil(torch.log2(torch.clamp(block_max / _SGLANG_E2M1_MAX, min=1e-10)))
    scale_factors = (scale_exp + 127).squeeze(-1).to(torch.uint8)
    scaled = reshaped / torch.exp2(scale_exp)
    sign_bits = (scaled < 0).to(torch.uint8) << 3
    abs_vals = scaled.abs()
    magnitude_bits = torch.sum(abs_vals.unsqueeze(-1) >= _SGLANG_E2M1_BOUNDS.to(tensor.device), dim=-1)
    fp4_vals = sign_bits + magnitude_bits.to(torch.uint8)
    fp4_reshaped = fp4_vals.view(b, m, n)
    packed = (fp4_reshaped[..., 1::2] << 4) + fp4_reshaped[..., 0::2]
    return packed, scale_factors


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------


def cpu_time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def gpu_time_ms(fn: Callable[[], Any]) -> float:
    """Median GPU time in ms (``triton.testing.do_bench``: CUDA events, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def gpu_graph_time_ms(fn: Callable[[], Any], reps: int = 50) -> float | None:
    """Median time of ``fn`` replayed as a CUDA graph (no launch overhead), L2 flushed before
    every replay like ``do_bench`` does (an NVFP4 cache of 32K tokens would otherwise sit in
    the 50 MB L2 and look faster than it is). None if the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    except Exception as err:  # noqa: BLE001 - report, don't die: a measurement may be missing
        print(f"  (CUDA graph timing failed: {type(err).__name__}: {err})", file=sys.stderr)
        return None


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Bytes the call allocates on top of what is already live (its transient peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _record(rows: list[dict[str, Any]], section: str, name: str, value: float | None, unit: str, **extra: Any) -> None:
    rows.append({"section": section, "name": name, "value": value, "unit": unit, **extra})
    shown = "n/a" if value is None else f"{value:.4g}"
    print(f"  {section:<10} {name:<48} {shown:>12} {unit}", flush=True)


def _guard(rows: list[dict[str, Any]], section: str, name: str, fn: Callable[[], None]) -> None:
    """Run one measurement; a failure is recorded (with its error) instead of ending the run."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        rows.append({"section": section, "name": name, "value": None, "unit": "error",
                     "error": f"{type(err).__name__}: {err}"})


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def _quant_cases() -> list[tuple[str, Callable, Callable, bool]]:
    """(format, quantize(x, gs) -> parts tuple, dequantize(parts, gs, dtype), uses gs).

    Dequantize saturates (``satfinite=True``) like the formats' ``dequantize``: the path the
    cache's Triton backend runs.
    """
    from nvfp4kv.kernels import triton_fp8, triton_mx, triton_nvfp4

    return [
        ("nvfp4", lambda x, gs: triton_nvfp4.quantize_nvfp4(x, gs),
         lambda p, gs, dt: triton_nvfp4.dequantize_nvfp4(p[0], p[1], gs, dt, satfinite=True), True),
        ("fp4_mx_block16", lambda x, gs: triton_mx.quantize_fp4_mx_block16(x),
         lambda p, gs, dt: triton_mx.dequantize_fp4_mx_block16(p[0], p[1], dt, satfinite=True), False),
        ("mxfp4", lambda x, gs: triton_mx.quantize_mxfp4(x),
         lambda p, gs, dt: triton_mx.dequantize_mxfp4(p[0], p[1], dt, satfinite=True), False),
        ("fp8_e4m3", lambda x, gs: (triton_fp8.quantize_fp8_e4m3(x, gs)[0],),
         lambda p, gs, dt: triton_fp8.dequantize_fp8_e4m3(p[0], gs, dt, satfinite=True), True),
    ]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_throughput(rows: list[dict[str, Any]], dev: torch.device, shape: tuple[int, ...], copy_bytes: int) -> None:
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = gpu_time_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    _record(rows, "copy", "device copy (read + write)", copy_gbs, "GB/s", bytes=2 * src.numel(), ms=copy_ms)
    src = dst = torch.empty(0, device=dev)  # free the copy buffers before the next measurement

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16)
    for name, quantize, dequantize, uses_gs in _quant_cases():
        fmt = get_format(name)
        gs = fmt.global_scale(x) if uses_gs else None

        def one_format(name=name, quantize=quantize, dequantize=dequantize, fmt=fmt, gs=gs) -> None:
            parts = quantize(x, gs)
            q_ms = gpu_time_ms(lambda: quantize(x, gs))
            q_bytes = _nbytes(x, *parts)
            _record(rows, "quantize", f"{name} triton", q_bytes / q_ms / 1e6, "GB/s", ms=q_ms, bytes=q_bytes,
                    fraction_of_copy=q_bytes / q_ms / 1e6 / copy_gbs, shape=list(shape), dtype="bfloat16")
            out = dequantize(parts, gs, torch.bfloat16)
            d_ms = gpu_time_ms(lambda: dequantize(parts, gs, torch.bfloat16))
            d_bytes = _nbytes(*parts, out)
            _record(rows, "dequantize", f"{name} triton -> bf16", d_bytes / d_ms / 1e6, "GB/s", ms=d_ms,
                    bytes=d_bytes, fraction_of_copy=d_bytes / d_ms / 1e6 / copy_gbs, shape=list(shape))
            # bit-exactness on this large tensor against the reference run on the same GPU
            ref_parts = fmt.quantize(x, gs)
            names = list(ref_parts)
            same = all(torch.equal(a, ref_parts[k]) for a, k in zip(parts, names))
            ref_out = fmt.dequantize(ref_parts, gs, torch.bfloat16)
            same = same and torch.equal(out.view(torch.int16), ref_out.view(torch.int16))
            _record(rows, "exactness", f"{name} triton == torch (cuda), {x.numel()} elems", float(same), "bool")
            if name == "nvfp4":
                r_ms = gpu_time_ms(lambda: fmt.quantize(x, gs))
                _record(rows, "quantize", "nvfp4 torch reference (cuda)", q_bytes / r_ms / 1e6, "GB/s", ms=r_ms)
                rd_ms = gpu_time_ms(lambda: fmt.dequantize(ref_parts, gs, torch.bfloat16))
                _record(rows, "dequantize", "nvfp4 torch reference (cuda) -> bf16", d_bytes / rd_ms / 1e6, "GB/s", ms=rd_ms)

        _guard(rows, "quantize", name, one_format)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def bench_decode(rows: list[dict[str, Any]], dev: torch.device, contexts: tuple[int, ...], sweep: bool) -> None:
    from nvfp4kv.kernels import triton_fp8, triton_nvfp4
    from nvfp4kv.kernels.decode_attention import decode_attention
    from nvfp4kv.kernels.packed_operand import packed_operand

    b, hq, hkv, d = (DECODE_SHAPE[k] for k in ("batch", "q_heads", "kv_heads", "head_dim"))
    nvfp4, fp8 = get_format("nvfp4"), get_format("fp8_e4m3")
    for ctx in contexts:
        def one_context(ctx: int = ctx) -> None:
            g = torch.Generator(device=dev).manual_seed(ctx)
            q = torch.randn(b, hq, 1, d, generator=g, device=dev).to(torch.bfloat16)
            k = (torch.randn(b, hkv, ctx, d, generator=g, device=dev) * 2).to(torch.bfloat16)
            v = torch.randn(b, hkv, ctx, d, generator=g, device=dev).to(torch.bfloat16)
            k_gs, v_gs = nvfp4.global_scale(k), nvfp4.global_scale(v)
            kc, ks = triton_nvfp4.quantize_nvfp4(k, k_gs)
            vc, vs = triton_nvfp4.quantize_nvfp4(v, v_gs)
            k_op = packed_operand(nvfp4, {"codes": kc, "scales": ks}, k_gs)
            v_op = packed_operand(nvfp4, {"codes": vc, "scales": vs}, v_gs)
            f8k, f8v = fp8.global_scale(k), fp8.global_scale(v)
            k8 = packed_operand(fp8, {"codes": triton_fp8.quantize_fp8_e4m3(k, f8k)[0]}, f8k)
            v8 = packed_operand(fp8, {"codes": triton_fp8.quantize_fp8_e4m3(v, f8v)[0]}, f8v)
            scale = d**-0.5
            q_packed = q.reshape(b, hkv, hq // hkv, d)

            fns: dict[str, Callable[[], Any]] = {
                "bf16 sdpa (enable_gqa)": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
                "bf16 sdpa (gqa packed as q_len)": lambda: F.scaled_dot_product_attention(q_packed, k, v, scale=scale),
                "nvfp4 fused triton": lambda: decode_attention(q, k_op, v_op, scale=scale),
                "nvfp4 fused triton, no prefetch": lambda: decode_attention(q, k_op, v_op, scale=scale, prefetch=False),
                "fp8 fused triton": lambda: decode_attention(q, k8, v8, scale=scale),
                "nvfp4 dequant(triton) + bf16 sdpa": lambda: F.scaled_dot_product_attention(
                    q, triton_nvfp4.dequantize_nvfp4(kc, ks, k_gs, torch.bfloat16, satfinite=True),
                    triton_nvfp4.dequantize_nvfp4(vc, vs, v_gs, torch.bfloat16, satfinite=True), scale=scale,
                    enable_gqa=True),
            }
            eager, graph = {}, {}
            for label, fn in fns.items():
                fn()  # compile / warm up outside any graph
                eager[label] = gpu_time_ms(fn)
                graph[label] = gpu_graph_time_ms(fn)
                _record(rows, "decode", f"{ctx:>6} tok {label} (eager)", eager[label] * 1e3, "us", context=ctx)
                _record(rows, "decode", f"{ctx:>6} tok {label} (cuda graph)", None if graph[label] is None else graph[label] * 1e3,
                        "us", context=ctx)
            for mode, times in (("eager", eager), ("cuda graph", graph)):
                base = [times[x] for x in ("bf16 sdpa (enable_gqa)", "bf16 sdpa (gqa packed as q_len)") if times[x]]
                for variant in ("nvfp4 fused triton", "nvfp4 fused triton, no prefetch"):
                    if base and times[variant]:
                        _record(rows, "decode", f"{ctx:>6} tok {variant} / best bf16 sdpa ({mode})",
                                times[variant] / min(base), "x", context=ctx, mode=mode)
                if base and times["fp8 fused triton"]:
                    _record(rows, "decode", f"{ctx:>6} tok fp8 fused / best bf16 sdpa ({mode})",
                            times["fp8 fused triton"] / min(base), "x", context=ctx, mode=mode)

            # memory: KV storage and each path's transient peak
            bf16_bytes = _nbytes(k, v)
            nvfp4_bytes = _nbytes(kc, ks, vc, vs)
            _record(rows, "memory", f"{ctx:>6} tok KV storage bf16", bf16_bytes / 2**20, "MiB", context=ctx)
            _record(rows, "memory", f"{ctx:>6} tok KV storage nvfp4", nvfp4_bytes / 2**20, "MiB", context=ctx)
            for label in ("bf16 sdpa (enable_gqa)", "nvfp4 fused triton", "nvfp4 dequant(triton) + bf16 sdpa"):
                _record(rows, "memory", f"{ctx:>6} tok transient peak {label}", peak_extra_bytes(fns[label]) / 2**20,
                        "MiB", context=ctx)

            # accuracy of the fused kernel vs dequantize + SDPA in FP32 math
            kd = nvfp4.dequantize({"codes": kc, "scales": ks}, k_gs, torch.bfloat16).float()
            vd = nvfp4.dequantize({"codes": vc, "scales": vs}, v_gs, torch.bfloat16).float()
            ref = F.scaled_dot_product_attention(q.float(), kd, vd, scale=scale, enable_gqa=True)
            err = (fns["nvfp4 fused triton"]().float() - ref).abs().max().item()
            _record(rows, "accuracy", f"{ctx:>6} tok nvfp4 fused vs dequant+sdpa max|err|", err, "abs", context=ctx)

            if ctx == 32768 and sweep:
                configs = [  # (block_n, num_warps, num_stages, prefetch, num_splits)
                    (64, 4, 2, True, None), (64, 4, 2, False, None), (64, 4, 1, True, None),
                    (32, 4, 2, True, None), (128, 4, 2, True, None), (64, 8, 2, True, None),
                    (64, 2, 2, True, None), (64, 4, 2, True, 16), (64, 4, 2, True, 32),
                    (64, 4, 2, True, 128), (64, 4, 2, False, 128), (64, 4, 2, True, 256),
                ]
                for block_n, warps, stages, prefetch, splits in configs:
                    def run(block_n=block_n, warps=warps, stages=stages, prefetch=prefetch, splits=splits):
                        return decode_attention(q, k_op, v_op, scale=scale, block_n=block_n, num_warps=warps,
                                                num_stages=stages, prefetch=prefetch, num_splits=splits)
                    t = gpu_graph_time_ms(run)
                    _record(rows, "tuning", f"32768 tok nvfp4 fused block_n={block_n} warps={warps} stages={stages} "
                            f"prefetch={prefetch} splits={splits or 'auto'} (cuda graph)",
                            None if t is None else t * 1e3, "us", block_n=block_n, num_warps=warps,
                            num_stages=stages, prefetch=prefetch, num_splits=splits)

        _guard(rows, "decode", f"context {ctx}", one_context)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def run_gpu(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu here")
    import triton

    rows: list[dict[str, Any]] = []
    props = torch.cuda.get_device_properties(0)
    meta = {"gpu": props.name, "sm": f"{props.major}{props.minor}", "sms": props.multi_processor_count,
            "triton": triton.__version__, "decode_shape": DECODE_SHAPE}
    print(f"GPU: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, triton {triton.__version__}")
    dev = torch.device("cuda")
    shape = (4, 8, 2048, 128) if quick else (16, 8, 8192, 128)
    bench_throughput(rows, dev, shape, copy_bytes=(64 if quick else 512) * 2**20)
    bench_decode(rows, dev, QUICK_CONTEXTS if quick else CONTEXTS, sweep=not quick)
    return rows, meta


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------


def run_cpu(quick: bool, threads: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.set_num_threads(threads)
    shape = (1, 8, 1024, 128) if quick else (1, 8, 4096, 128)
    repeats = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    flat = x.reshape(shape[0] * shape[1], shape[2], shape[3])  # SGLang's [B, M, N] view
    mx16, nvfp4 = get_format("fp4_mx_block16"), get_format("nvfp4")
    gs = nvfp4.global_scale(x)

    sglang_ms = cpu_time_ms(lambda: sglang_batched_quantize(flat), repeats)
    mx16_ms = cpu_time_ms(lambda: mx16.quantize(x), repeats)
    nvfp4_ms = cpu_time_ms(lambda: nvfp4.quantize(x, gs), repeats)
    _record(rows, "cpu", "sglang batched_quantize port (eager, bf16 math)", sglang_ms, "ms", shape=list(shape))
    _record(rows, "cpu", "nvfp4kv fp4_mx_block16 reference (fp32 math)", mx16_ms, "ms", shape=list(shape))
    _record(rows, "cpu", "nvfp4kv nvfp4 reference (fp32 math)", nvfp4_ms, "ms", shape=list(shape))
    _record(rows, "cpu", "speed ratio sglang / fp4_mx_block16 ref", sglang_ms / mx16_ms, "x", goal=">= 1.0")
    _record(rows, "cpu", "speed ratio sglang / nvfp4 ref", sglang_ms / nvfp4_ms, "x", goal=">= 1.0")

    # how often SGLang's eager BF16 arithmetic lands on the same bytes as the FP32 reference
    codes, scales = sglang_batched_quantize(flat)
    ref = mx16.quantize(x)
    same_scales = (scales.reshape(ref["scales"].shape) == ref["scales"]).float().mean().item()
    same_codes = (codes.reshape(ref["codes"].shape) == ref["codes"]).float().mean().item()
    _record(rows, "cpu", "sglang eager vs fp4_mx_block16 ref: equal scale bytes", same_scales, "fraction")
    _record(rows, "cpu", "sglang eager vs fp4_mx_block16 ref: equal code bytes", same_codes, "fraction")
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "repeats": repeats}
    return rows, meta


# ---------------------------------------------------------------------------------------------


def _print_table(rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)[["section", "name", "value", "unit"]]
    with pd.option_context("display.max_rows", None, "display.width", 160, "display.max_colwidth", 70):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer contexts (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for --device cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for kernels_<device>.json")
    args = parser.parse_args(argv)
    started = time.time()
    if args.device == "cuda":
        rows, meta = run_gpu(args.quick)
    else:
        rows, meta = run_cpu(args.quick, args.threads)
    record = {
        "benchmark": "kernels",
        "device": args.device,
        "quick": args.quick,
        "command": "python -m experiments.bench_kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **meta,
        "rows": rows,
    }
    suffix = "_quick" if args.quick else ""
    path = atomic_write_json(args.out / f"kernels_{args.device}{suffix}.json", record)
    print()
    _print_table(rows)
    print(f"\nwrote {path} ({record['seconds']} s)")
    return path


if __name__ == "__main__":
    main()
