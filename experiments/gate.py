"""CI accuracy regression gate: ``python -m experiments.gate [--quick] [--formats ...] [--update-baseline]``.

Runs a fixed small suite on the embedded SmolLM2-135M for each KV format (default: bf16, fp8_e4m3,
nvfp4, fp4_mx_block16, mxfp4), on CPU, deterministically, and compares it with the committed
baseline ``results/baselines/gate.json``:

- ``fidelity`` (:mod:`nvfp4kv.metrics`): decode-faithful next-token KL / NLL / top-1 against an
  unquantized cache on 2 x 2 essay windows (256 and 512 tokens of context, 64 targets each),
  greedy agreement (reported, not gated: 2 prompts), per-layer/head K/V SQNR and attention error;
- ``mmlu``: 24 questions (3 subjects x 8, zero-shot) through the ``lm_eval`` task kind with
  decode-faithful loglikelihood (the question is prefilled into the quantized cache and the answer
  scored by a step reading it back). Gated: 0/1 accuracy and, per question, ``log p(gold | choices)``
  (continuous, so it can move significantly where 24 coin-flip-level answers cannot). Needs the
  local data directory (``$NVFP4KV_DATA_DIR``) or hub access;
- ``passkey``: 4 retrieval trials at 1K tokens (generation through the cache). 4 units can never
  reach significance, so this check always reports "underpowered": it is there to exercise the
  generation path and show the numbers in the log, not to decide.

GSM8K is not in the suite: one generation costs ~5 s on this CPU and the embedded model scores
~0 on it, so a few samples would cost a minute per format and carry no signal.

**The rule** (:mod:`nvfp4kv.metrics.regression`): every metric is compared unit by unit with the
baseline (per position, per layer/head/K|V, per question, per trial), i.e. paired. 0/1 units: exact
McNemar test per tail; continuous units: seeded paired bootstrap of the mean difference, and a
check fails when its one-sided ``1 - alpha/(2m)`` confidence bound excludes "no change" (``m`` =
number of checks; Bonferroni over checks and both tails keeps the family-wise false-alarm rate at
``--alpha``, default 0.05). No hand-picked epsilon: the tolerance is the paired uncertainty of the
run itself. Exit 1 when a format changed significantly (worse, or better unless
``--allow-improvements``: a format is an exact specification, so "better" means "different"),
exit 2 when the baseline is missing or was made with a different suite or KV config, 0 otherwise.
``--update-baseline`` rewrites the baseline deliberately and prints old vs new.

Determinism: seeds fixed, ``torch.use_deterministic_algorithms``, a fixed thread count
(``--threads``, default 1; the numbers were checked identical with 2), no sampling anywhere, and
an unchanged tree reproduces the baseline bit for bit (every check "identical to baseline").
Cost: ~2.6 min wall on 1 thread of a shared 2-core machine for the 5 formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO_ROOT / "results" / "baselines" / "gate.json"
DEFAULT_OUT = REPO_ROOT / "results" / "gate" / "last.json"
SCHEMA_VERSION = 1

#: formats the gate runs by default (~30 s of CPU each; the int formats are sweep baselines, not gated)
DEFAULT_FORMATS = ("bf16", "fp8_e4m3", "nvfp4", "fp4_mx_block16", "mxfp4")
FAMILIES = ("fidelity", "mmlu", "passkey")

MMLU_SUBJECTS = ("high_school_geography", "marketing", "high_school_psychology")


@dataclasses.dataclass(frozen=True)
class Suite:
    """What the gate runs. Stored in the baseline: a changed suite needs a new baseline."""

    name: str
    fidelity: dict[str, Any]
    mmlu: dict[str, Any] | None
    mmlu_limit: int
    passkey: dict[str, Any] | None
    model: str = "embedded:smollm2-135m-instruct"

    def families(self) -> list[str]:
        return [f for f in FAMILIES if f == "fidelity" or getattr(self, f) is not None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = Suite(
    name="full",
    fidelity=dict(kind="fidelity", name="fidelity", context_lens=[256, 512], n_score=64, n_windows=2,
                  score_chunk=16, greedy_prompts=2, greedy_prompt_len=64, greedy_tokens=16, capture_tokens=256),
    mmlu=dict(kind="lm_eval", name="mmlu", lm_eval_task="mmlu", subjects=list(MMLU_SUBJECTS), num_fewshot=0,
              loglikelihood_mode="decode_faithful", bootstrap_iters=0),
    mmlu_limit=8,
    passkey=dict(kind="passkey", name="passkey", context_lengths=[1024], depths=[0.25, 0.75], trials=2, digits=5),
)

QUICK = Suite(
    name="quick",
    fidelity=dict(kind="fidelity", name="fidelity", context_lens=[128], n_score=64, n_windows=2,
                  score_chunk=16, greedy_prompts=1, greedy_prompt_len=32, greedy_tokens=12, capture_tokens=128),
    mmlu=None,
    mmlu_limit=0,
    passkey=None,
)

SUITES = {"full": FULL, "quick": QUICK}

#: per-sample metrics the gate compares, by family: metric -> (series name, lower-is-better, 0/1)
_FIDELITY_SERIES = {"kl_mean": ("fidelity/kl", "lower", False), "nll_mean": ("fidelity/nll", "lower", False),
                    "top1_agree": ("fidelity/top1_agree", "higher", True)}
#: KV config fields that change no stored bit (a new field with its default value changes none either,
#: so only fields present in both the baseline and this run are compared)
_NO_BIT_CHANGE = {"backend", "dequant_cache"}
_LAYER_SERIES = {"sqnr_db": ("fidelity/sqnr_db", "higher"), "attn_rel_err": ("fidelity/attn_rel_err", "lower")}


# ---------------------------------------------------------------------------- environment
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def kv_config(fmt: str) -> Any:
    """The KV config a gate format runs with: that format for K and V, every other knob default.

    ``dequant_cache=True`` is the cache's CPU fast path (decode each packed token once instead of
    on every read); it changes no stored bit and no output, only the gate's run time.
    """
    from nvfp4kv.cache import KVCacheConfig

    return KVCacheConfig(k_format=fmt, v_format=fmt, dequant_cache=True)


def versions() -> dict[str, str]:
    import torch
    import transformers

    import nvfp4kv

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "nvfp4kv": nvfp4kv.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    return out


# ---------------------------------------------------------------------------- running
def _round(x: float) -> float:
    """Values are stored to 7 significant digits; current runs are rounded the same way."""
    return float(f"{x:.7g}")


def fidelity_series(result: Any) -> dict[str, dict[str, Any]]:
    """Gated per-unit series of a fidelity cell: per position (kl, nll, top1), per layer/head/kind."""
    from nvfp4kv.metrics.regression import SQNR_EXACT_DB

    series: dict[str, dict[str, Any]] = {}
    for metric, (name, direction, binary) in _FIDELITY_SERIES.items():
        values = {f"L{s['context_len']}/w{s['window']}/p{s['position']}": _round(s["metrics"][metric])
                  for s in result.samples if s.get("probe") == "next_token"}
        series[name] = {"direction": direction, "binary": binary, "values": values}
    rows = result.extra.get("per_layer", [])
    for key, (name, direction) in _LAYER_SERIES.items():
        values = {}
        for r in rows:
            value = r[key]
            if value is None:  # exact round trip (sqnr only)
                value = SQNR_EXACT_DB
            values[f"l{r['layer']}/h{r['head']}/{r['kind']}"] = _round(value)
        if values:
            series[name] = {"direction": direction, "binary": False, "values": values}
    return series


def accuracy_series(result: Any, family: str, metric: str) -> dict[str, dict[str, Any]]:
    """A 0/1 per-document series (MMLU question correct, passkey trial retrieved)."""
    values = {str(s["doc_id"]): _round(s["metrics"][metric]) for s in result.samples if metric in s.get("metrics", {})}
    return {f"{family}/{metric.split(',')[0]}": {"direction": "higher", "binary": True, "values": values}}


def choice_logprobs(sample: Mapping[str, Any]) -> list[float] | None:
    """Per-choice log-likelihoods of a multiple-choice sample record (lm_eval task kind)."""
    if sample.get("choice_logprobs"):
        return [float(x) for x in sample["choice_logprobs"]]
    filtered = (sample.get("filtered") or {}).get("none")
    if isinstance(filtered, list) and filtered and all(isinstance(r, list) and len(r) == 2 for r in filtered):
        return [float(r[0]) for r in filtered]
    return None


def gold_logprob_series(result: Any, family: str) -> dict[str, dict[str, Any]]:
    """Per question ``log p(gold | the choices)``: the answer's log-likelihood renormalized over the
    choices. Continuous, so a small consistent shift is detectable where 0/1 accuracy on a few dozen
    questions (and a model near chance) cannot show it."""
    values = {}
    for s in result.samples:
        logprobs, target = choice_logprobs(s), s.get("target")
        if logprobs is None or not isinstance(target, int) or not 0 <= target < len(logprobs):
            continue
        top = max(logprobs)
        log_norm = top + math.log(sum(math.exp(x - top) for x in logprobs))
        values[str(s["doc_id"])] = _round(logprobs[target] - log_norm)
    return {f"{family}/gold_logp": {"direction": "higher", "binary": False, "values": values}} if values else {}


def summary(family: str, result: Any) -> dict[str, float]:
    """Headline numbers of a cell for the printed table (not gated themselves)."""
    wanted = {
        "fidelity": None,  # all fidelity metrics
        "mmlu": ("acc,none",),
        "passkey": ("acc",),
    }[family]
    out = {}
    for name, mv in result.metrics.items():
        if wanted is None or name in wanted:
            out[name if family == "fidelity" else f"{family}_{name.split(',')[0]}"] = _round(mv.value)
    return out


def run_suite(bundle: Any, suite: Suite, formats: Sequence[str], *, progress: bool = False,
              log: Any = print) -> dict[str, Any]:
    """Run every family of ``suite`` for every format; returns the run document (see :func:`main`)."""
    import nvfp4kv.eval  # noqa: F401  (registers lm_eval, passkey)
    import nvfp4kv.metrics  # noqa: F401  (registers fidelity)
    from nvfp4kv.eval.api import get_task_runner

    started = time.perf_counter()
    lm = None
    doc: dict[str, Any] = {"formats": {}, "timings": {}}
    for fmt in formats:
        kv = kv_config(fmt)
        entry: dict[str, Any] = {"kv_config": kv.to_dict(), "summary": {}, "series": {}}
        for family in suite.families():
            t0 = time.perf_counter()
            if family == "fidelity":
                result = get_task_runner("fidelity")(suite.fidelity, bundle, kv, limit=None, seed=0, progress=progress)
                entry["series"].update(fidelity_series(result))
            elif family == "mmlu":
                if lm is None:
                    from nvfp4kv.eval.lm import KVQuantLM

                    lm = KVQuantLM.from_bundle(bundle, kv, loglikelihood_mode="decode_faithful", progress=progress)
                result = get_task_runner("lm_eval")(suite.mmlu, bundle, kv, limit=suite.mmlu_limit, seed=0, lm=lm,
                                                    progress=progress)
                entry["series"].update(accuracy_series(result, "mmlu", "acc,none"))
                gold = gold_logprob_series(result, "mmlu")
                entry["series"].update(gold)
                if gold:
                    values = list(gold["mmlu/gold_logp"]["values"].values())
                    entry["summary"]["mmlu_gold_logp"] = _round(sum(values) / len(values))
            else:
                result = get_task_runner("passkey")(suite.passkey, bundle, kv, limit=None, seed=0, progress=progress)
                entry["series"].update(accuracy_series(result, "passkey", "acc"))
            entry["summary"].update(summary(family, result))
            seconds = time.perf_counter() - t0
            doc["timings"][f"{fmt}/{family}"] = round(seconds, 2)
            log(f"  {fmt:<16} {family:<9} {seconds:6.1f} s")
        doc["formats"][fmt] = entry
    doc["run_s"] = round(time.perf_counter() - started, 2)
    return doc


# ---------------------------------------------------------------------------- comparing
def series_of(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{format: {metric: Series}}`` of a run or baseline document."""
    from nvfp4kv.metrics.regression import Series

    return {fmt: {name: Series.from_dict(name, data) for name, data in entry["series"].items()}
            for fmt, entry in doc["formats"].items()}


def compare(baseline: Mapping[str, Any], current: Mapping[str, Any], *, alpha: float, seed: int = 0) -> list[Any]:
    from nvfp4kv.metrics.regression import compare_runs

    return compare_runs(series_of(baseline), series_of(current), alpha=alpha, seed=seed)


def suite_mismatch(baseline: Mapping[str, Any], suite: Suite, formats: Sequence[str]) -> str | None:
    """Why this baseline cannot judge this run (``None`` if it can)."""
    if baseline.get("schema") != SCHEMA_VERSION:
        return f"baseline schema {baseline.get('schema')} != {SCHEMA_VERSION}"
    if baseline.get("suite") != suite.to_dict():
        return f"the baseline was made with suite {baseline.get('suite', {}).get('name')!r} and different settings"
    missing = [f for f in formats if f not in baseline.get("formats", {})]
    if missing:
        return f"no baseline for format(s) {missing}"
    for fmt in formats:
        old, new = baseline["formats"][fmt].get("kv_config", {}), kv_config(fmt).to_dict()
        changed = sorted(k for k in set(old) & set(new) if k not in _NO_BIT_CHANGE and old[k] != new[k])
        if changed:
            return f"the KV config of {fmt!r} changed since the baseline ({', '.join(changed)})"
    return None


# ---------------------------------------------------------------------------- printing
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def summary_table(doc: Mapping[str, Any], other: Mapping[str, Any] | None = None) -> str:
    """One row per format, headline metrics as columns; ``other`` adds ``(was X)`` where it differs."""
    import pandas as pd

    rows = []
    for fmt, entry in doc["formats"].items():
        row = {"format": fmt}
        for key, value in entry["summary"].items():
            text = _fmt(value)
            if other is not None:
                old = other.get("formats", {}).get(fmt, {}).get("summary", {}).get(key)
                if old is not None and old != value:
                    text += f" (was {_fmt(old)})"
            row[key] = text
        rows.append(row)
    columns = ["format", "kl_mean", "kl_p99", "top1_agree", "nll_mean"]
    frame = pd.DataFrame(rows)
    ordered = [c for c in columns if c in frame] + sorted(c for c in frame if c.startswith("ppl@")) + \
        [c for c in ("greedy_agree_tokens", "sqnr_db_k", "sqnr_db_v", "attn_rel_err_k", "attn_rel_err_v",
                     "mmlu_acc", "mmlu_gold_logp", "passkey_acc") if c in frame]
    return frame[ordered].fillna("-").to_string(index=False)


def checks_table(checks: Sequence[Any]) -> str:
    import pandas as pd

    rows = [{
        "format": c.format, "metric": c.metric, "n": c.n, "test": c.test,
        "baseline": _fmt(c.baseline_mean), "current": _fmt(c.current_mean), "delta": _fmt(c.delta, 3),
        "bound": _fmt(c.bound, 3), "p(worse)": _fmt(c.p_value, 3), "status": c.status, "note": c.note,
    } for c in checks]
    return pd.DataFrame(rows).to_string(index=False) if rows else "(no checks)"


# ---------------------------------------------------------------------------- files
def dumps(doc: Mapping[str, Any]) -> str:
    """Indented JSON with each series' per-unit ``values`` on one line: a reviewable git diff
    (one line per changed series) at half the size of fully indented JSON."""
    compact: dict[str, str] = {}

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key == "values" and isinstance(value, Mapping):
                    token = f"@@values-{len(compact)}@@"
                    compact[token] = json.dumps(value, separators=(",", ":"))
                    out[key] = token
                else:
                    out[key] = strip(value)
            return out
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    text = json.dumps(strip(doc), indent=1)
    for token, value in compact.items():
        text = text.replace(json.dumps(token), value, 1)
    return text + "\n"


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomic write (tmp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.gate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated KV formats (default: {','.join(DEFAULT_FORMATS)})")
    parser.add_argument("--quick", action="store_true", help="the small fidelity-only suite (tests, smoke checks)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help=f"baseline JSON (default: {DEFAULT_BASELINE.relative_to(REPO_ROOT)}, "
                             f"or gate_quick.json with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where this run's JSON goes")
    parser.add_argument("--update-baseline", action="store_true",
                        help="rewrite the baseline with this run (deliberately) and print what changed")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="family-wise false-alarm rate over all checks and both tails (default 0.05)")
    parser.add_argument("--allow-improvements", action="store_true",
                        help="do not fail on significant improvements (they still print as IMPROVED)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: results are identical for 1 and 2 threads, and "
                             "2 OpenMP threads slow down badly whenever anything else shares the cores)")
    parser.add_argument("--progress", action="store_true", help="show per-task progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    suite = QUICK if args.quick else FULL
    baseline_path = args.baseline or DEFAULT_BASELINE.with_name("gate_quick.json" if args.quick else "gate.json")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    make_deterministic(args.threads)
    t0 = time.perf_counter()

    from nvfp4kv.cache import KVCacheConfig  # noqa: F401  (fail early if the package is broken)
    from nvfp4kv.errors import NVFP4KVError
    from nvfp4kv.metrics.regression import failed
    from nvfp4kv.models import ModelSpec, load_model

    baseline = load_json(baseline_path)
    problem = None if baseline is None else suite_mismatch(baseline, suite, formats)
    if not args.update_baseline:
        if baseline is None:
            print(f"gate: no baseline at {baseline_path}. Create it deliberately with "
                  f"`python -m experiments.gate{' --quick' if args.quick else ''} --update-baseline`.")
            return 2
        if problem:
            print(f"gate: {problem}. If the change is intended, regenerate the baseline with "
                  f"`python -m experiments.gate{' --quick' if args.quick else ''} --update-baseline` and commit it.")
            return 2

    print(f"gate: suite={suite.name} formats={','.join(formats)} threads={args.threads}")
    bundle = load_model(ModelSpec(name_or_path=suite.model, dtype="bfloat16", device="cpu"))
    print(f"  model loaded in {time.perf_counter() - t0:.1f} s")
    try:
        run = run_suite(bundle, suite, formats, progress=args.progress)
    except NVFP4KVError as err:  # missing data, unknown format, ...: a setup problem, not a regression
        print(f"gate: cannot run the suite: {err}")
        return 2
    doc = {"schema": SCHEMA_VERSION, "suite": suite.to_dict(), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
           "versions": versions(), "threads": args.threads, **run}

    comparable = baseline is not None and problem is None
    checks = compare(baseline, doc, alpha=args.alpha) if comparable else []
    doc["checks"] = [c.to_dict() for c in checks]
    bad = failed(checks, allow_improvements=args.allow_improvements)
    doc["status"] = "updated-baseline" if args.update_baseline else ("fail" if bad else "pass")
    doc["wall_s"] = round(time.perf_counter() - t0, 1)

    print("\n== summary (this run" + (", '(was X)' = baseline)" if comparable else ")") + " ==")
    print(summary_table(doc, baseline if comparable else None))
    if checks:
        print(f"\n== paired checks vs {baseline_path.name} (family-wise alpha={args.alpha}) ==")
        print(checks_table(checks))
    write_json(args.out, doc)
    print(f"\nwrote {args.out}  (wall {doc['wall_s']} s)")

    if args.update_baseline:
        if baseline is not None and problem:
            print(f"baseline replaced ({problem}); old summary:")
            print(summary_table(baseline))
        keep = {k: v for k, v in doc.items() if k not in ("checks", "status")}
        write_json(baseline_path, keep)
        print(f"baseline written: {baseline_path}. Review the diff above and commit it.")
        return 0
    if bad:
        print(f"\nGATE FAILED: {len(bad)} check(s): " + ", ".join(f"{c.format}:{c.metric}={c.status}" for c in bad))
        return 1
    print("\nGATE PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
