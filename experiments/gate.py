"""CI accuracy regression gate: ``python -m experiments.gate [--quick] [--formats ...] [--update-baseline]``.

Runs the gate sweep (``configs/sweep/gate.yaml``; ``--quick``: ``gate_quick.yaml``: the suite, its
task settings and the five gated formats) through :func:`nvfp4kv.eval.sweep.run_sweep` into
``results/gate/<sweep>-<time>`` on CPU, deterministically (seeds fixed,
``torch.use_deterministic_algorithms``, ``--threads`` torch threads), then
:func:`nvfp4kv.analysis.gate.decide` compares its per-sample records unit by unit with the
committed baseline ``results/baselines/gate.json`` (``gate_quick.json``) by the paired rule of
:mod:`nvfp4kv.metrics.regression`. Exit 0 pass, 1 a format changed significantly (worse, or
better unless ``--allow-improvements``), 2 the baseline is missing or was made with a different
suite or KV config. ``--update-baseline`` rewrites the baseline deliberately and prints old vs new.
An unchanged tree reproduces the baseline bit for bit (every check "identical to baseline").
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvfp4kv.analysis import gate as g

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO_ROOT / "results" / "baselines" / "gate.json"
DEFAULT_OUT = REPO_ROOT / "results" / "gate" / "last.json"
#: the gated formats (KV labels of configs/sweep/gate.yaml; ~30 s of CPU each)
DEFAULT_FORMATS = ("bf16", "fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4")


def make_deterministic(threads: int) -> None:
    """Seeds, deterministic kernels and a fixed thread count, before any model work."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, threads))
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def gate_config(quick: bool, formats: Sequence[str], run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """The resolved gate sweep config for these formats (a format gate.yaml lacks: K and V in it)."""
    from hydra import compose, initialize_config_dir

    from nvfp4kv.eval.sweep import CONFIG_DIR, resolve_config

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=[f"+sweep={'gate_quick' if quick else 'gate'}",
                                                       f"run_dir={run_dir}", f"progress={progress}"])
    config = resolve_config(cfg)
    config["kvs"] = {f: config["kvs"].get(f, {"k_format": f, "v_format": f, "dequant_cache": True}) for f in formats}
    config["baseline"] = "bf16" if "bf16" in formats else formats[0]
    return config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated KV formats")
    p.add_argument("--quick", action="store_true", help="the small fidelity-only suite (tests, smoke checks)")
    p.add_argument("--baseline", type=Path, default=None, help="baseline JSON (default: results/baselines/"
                   "gate.json, or gate_quick.json with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where this run's gate JSON goes")
    p.add_argument("--run-dir", type=Path, default=None, help="the sweep's run dir (default: a new one beside "
                   "--out; an existing one is resumed: finished cells are not rerun)")
    p.add_argument("--update-baseline", action="store_true", help="rewrite the baseline with this run")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise false-alarm rate (default 0.05)")
    p.add_argument("--allow-improvements", action="store_true", help="do not fail on significant improvements")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 2 gives identical numbers)")
    p.add_argument("--progress", action="store_true", help="show per-task progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    baseline_path = args.baseline or DEFAULT_BASELINE.with_name("gate_quick.json" if args.quick else "gate.json")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    make_deterministic(args.threads)
    t0 = time.perf_counter()
    from nvfp4kv.errors import NVFP4KVError
    from nvfp4kv.eval.sweep import run_sweep

    stamp = f"{'gate_quick' if args.quick else 'gate'}-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    run_dir = (args.run_dir or args.out.parent / stamp).resolve()
    redo = f"`python -m experiments.gate{' --quick' if args.quick else ''} --update-baseline`"
    try:
        config = gate_config(args.quick, formats, run_dir, args.progress)
        baseline = g.load_json(baseline_path)
        problem = baseline and g.suite_mismatch(baseline, g.suite_of(config), g.kv_configs_of(config))
        if not args.update_baseline and (baseline is None or problem):
            print(f"gate: no baseline at {baseline_path}. Create it deliberately with {redo}." if baseline is None
                  else f"gate: {problem}. If the change is intended, regenerate the baseline with {redo} and commit it.")
            return 2
        print(f"gate: suite={g.suite_of(config)['name']} formats={','.join(formats)} threads={args.threads} "
              f"run_dir={run_dir}")
        run_sweep(config, overrides=[f"+sweep={config['sweep']['name']}", f"run_dir={run_dir}"])
    except NVFP4KVError as err:  # missing data, unknown format, ...: a setup problem, not a regression
        print(f"gate: cannot run the suite: {err}")
        return 2
    decision = g.decide(run_dir, None if problem else baseline, alpha=args.alpha,
                        allow_improvements=args.allow_improvements)
    doc = {**decision.document, "created": dt.datetime.now(dt.timezone.utc).isoformat(), "threads": args.threads,
           "run_dir": str(run_dir), "wall_s": round(time.perf_counter() - t0, 1)}
    comparable = not decision.problem
    if args.update_baseline:
        doc["status"] = "updated-baseline"
    print("\n== summary (this run" + (", '(was X)' = baseline)" if comparable else ")") + " ==")
    print(g.summary_table(doc, baseline if comparable else None))
    if decision.checks:
        print(f"\n== paired checks vs {baseline_path.name} (family-wise alpha={args.alpha}) ==")
        print(g.checks_table(decision.checks))
    g.write_json(args.out, doc)
    print(f"\nwrote {args.out}  (wall {doc['wall_s']} s)")
    if args.update_baseline:
        if baseline is not None and not comparable:
            print(f"baseline replaced ({problem or decision.problem}); old summary:\n{g.summary_table(baseline)}")
        keep = ("schema", "suite", "created", "versions", "threads", "formats", "timings", "run_s", "wall_s")
        g.write_json(baseline_path, {k: doc[k] for k in keep})
        print(f"baseline written: {baseline_path}. Review the diff above and commit it.")
        return 0
    if decision.problem:  # the run's own records disagree with the config it was checked against
        print(f"gate: {decision.problem}")
        return 2
    if decision.failed:
        print(f"\nGATE FAILED: {len(decision.failed)} check(s): "
              + ", ".join(f"{c.format}:{c.metric}={c.status}" for c in decision.failed))
        return 1
    print("\nGATE PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
