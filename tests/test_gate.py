"""The accuracy gate: its paired decision rule, its baseline file, and proof that it bites.

The bite tests plant realistic NVFP4 bugs in-process (monkeypatching the pure functions the
``nvfp4`` format calls, or the format class itself), run the gate's quick sweep
(configs/sweep/gate_quick.yaml, through ``run_sweep``) on the embedded SmolLM2 against a baseline
computed with the correct code in the same session, and require the decision
(:func:`nvfp4kv.analysis.gate.decide`) to FAIL for every bug and PASS for the correct code. One
model load serves all of them (the sweep's model cache).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import gate
from nvfp4kv.analysis import gate as ag
from nvfp4kv.metrics.regression import Series, compare_runs, compare_series, failed

# ---- the decision rule on synthetic series ----------------------------------------------------


def _series(values, direction="lower", binary=False, metric="m"):
    return Series(metric, direction, binary, {str(i): float(v) for i, v in enumerate(values)})


def test_identical_runs_pass():
    s = _series(np.random.default_rng(0).exponential(size=300))
    check = compare_series("f", s, s, alpha=0.001)
    assert check.status == "ok" and check.note == "identical to baseline"


def test_symmetric_noise_passes_and_a_consistent_shift_fails():
    rng = np.random.default_rng(1)
    base = rng.exponential(size=400)
    noisy = base + rng.normal(scale=0.01, size=400)  # platform-like noise, no shift
    assert compare_series("f", _series(base), _series(noisy), alpha=0.001).status == "ok"
    worse = base * 1.05 + rng.normal(scale=0.01, size=400)  # +5% KL everywhere
    check = compare_series("f", _series(base), _series(worse), alpha=0.001)
    assert check.status == "REGRESSED" and check.bound > 0
    better = base * 0.95
    assert compare_series("f", _series(base), _series(better), alpha=0.001).status == "IMPROVED"


def test_higher_is_better_direction():
    base = np.linspace(10, 30, 180)  # SQNR dB per (layer, head, kind)
    check = compare_series("f", _series(base, "higher"), _series(base - 0.3, "higher"), alpha=0.001)
    assert check.status == "REGRESSED" and check.bound < 0 and check.delta == pytest.approx(-0.3)


def test_a_few_changed_units_are_not_significant():
    base = np.full(300, 0.1)
    cur = base.copy()
    cur[:2] += 0.5  # two positions moved: within what a paired bootstrap calls noise
    assert compare_series("f", _series(base), _series(cur), alpha=0.001).status == "ok"


def test_binary_units_use_exact_mcnemar():
    base = [1] * 20
    cur = [0] * 6 + [1] * 14  # 6 worse, 0 better: one-sided p = 2^-6 = 0.0156
    strict = compare_series("f", _series(base, "higher", True), _series(cur, "higher", True), alpha=0.01)
    assert strict.test == "mcnemar" and strict.p_value == pytest.approx(1 / 64) and strict.status == "ok"
    loose = compare_series("f", _series(base, "higher", True), _series(cur, "higher", True), alpha=0.02)
    assert loose.status == "REGRESSED"


def test_binary_checks_say_when_they_cannot_fail():
    s = _series([1, 0, 1, 1], "higher", True)  # 4 units: smallest attainable p is 1/16
    assert "underpowered" in compare_series("f", s, s, alpha=0.01).note
    big = _series([1] * 12, "higher", True)
    assert "underpowered" not in compare_series("f", big, big, alpha=0.01).note


def test_gold_logprob_is_renormalized_over_choices():
    sample = {"doc_id": "x:0", "target": 1, "filtered": {"none": [[math.log(0.1), False], [math.log(0.3), False]]}}
    series = ag.gold_logprob_series("mmlu", [sample])
    assert series["mmlu/gold_logp"]["values"]["x:0"] == pytest.approx(math.log(0.75), rel=1e-6)


def test_missing_units_and_formats_fail():
    s = _series([0.1, 0.2, 0.3])
    fewer = Series("m", "lower", False, {"0": 0.1, "1": 0.2})
    assert compare_series("f", s, fewer, alpha=0.01).status == "MISSING"
    checks = compare_runs({"a": {"m": s}}, {"a": {"m": s}, "b": {"m": s}})
    assert [c.status for c in checks] == ["ok", "MISSING"]
    assert len(failed(checks)) == 1


def test_bonferroni_over_checks_and_tails():
    s = _series([0.1, 0.2])
    checks = compare_runs({f: {"m": s, "n": s} for f in "abc"}, {f: {"m": s, "n": s} for f in "abc"}, alpha=0.06)
    assert len(checks) == 6  # 3 formats x 2 metrics: 6 checks x 2 tails = the 12 of the Bonferroni divisor
    assert all(c.alpha == pytest.approx(0.06 / 12) for c in checks)


def test_improvements_fail_unless_allowed():
    base, cur = _series(np.full(50, 1.0)), _series(np.full(50, 0.5))
    checks = compare_runs({"a": {"m": base}}, {"a": {"m": cur}})
    assert checks[0].status == "IMPROVED"
    assert failed(checks) and not failed(checks, allow_improvements=True)


# ---- the committed baseline ---------------------------------------------------------------------


def _suite(quick: bool, formats=gate.DEFAULT_FORMATS) -> tuple[dict, dict]:
    config = gate.gate_config(quick, list(formats), Path("/tmp/unused"))
    return ag.suite_of(config), ag.kv_configs_of(config)


def test_committed_baseline_matches_the_suite():
    doc = json.loads(gate.DEFAULT_BASELINE.read_text())
    assert ag.suite_mismatch(doc, *_suite(quick=False)) is None  # configs/sweep/gate.yaml is the suite
    for fmt in gate.DEFAULT_FORMATS:
        series = doc["formats"][fmt]["series"]
        assert {"fidelity/kl", "fidelity/top1_agree", "fidelity/sqnr_db", "mmlu/acc", "mmlu/gold_logp",
                "passkey/acc"} <= set(series)
        assert len(series["fidelity/kl"]["values"]) == 2 * 2 * 64  # windows x context lengths x targets
        assert len(series["mmlu/acc"]["values"]) == 3 * 8  # subjects x questions
    # BF16 KV must reproduce the unquantized cache exactly; NVFP4 must not
    assert set(doc["formats"]["bf16"]["series"]["fidelity/kl"]["values"].values()) == {0.0}
    assert doc["formats"]["nvfp4"]["summary"]["kl_mean"] > doc["formats"]["fp8_e4m3"]["summary"]["kl_mean"] > 0


def test_committed_quick_baseline_matches_the_quick_suite():
    doc = json.loads(gate.DEFAULT_BASELINE.with_name("gate_quick.json").read_text())
    assert ag.suite_mismatch(doc, *_suite(quick=True)) is None  # configs/sweep/gate_quick.yaml


def test_suite_mismatch_names_the_problem():
    quick, kvs = _suite(quick=True, formats=["nvfp4"])
    full, _ = _suite(quick=False, formats=["nvfp4"])
    doc = {"schema": ag.SCHEMA_VERSION, "suite": quick, "formats": {}}
    assert "suite" in ag.suite_mismatch(doc, full, kvs)
    assert "nvfp4" in ag.suite_mismatch(doc, quick, kvs)
    changed = {**quick, "fidelity": {**quick["fidelity"], "n_score": 32}}
    assert "suite" in ag.suite_mismatch(doc, changed, kvs)
    kv = kvs["nvfp4"]
    doc["formats"]["nvfp4"] = {"kv_config": {**kv, "read_mode": "quantized"}}
    assert "read_mode" in ag.suite_mismatch(doc, quick, kvs)
    # fields that change no bit, and fields the baseline predates, do not invalidate it
    doc["formats"]["nvfp4"] = {"kv_config": {**{k: v for k, v in kv.items() if k != "sink_tokens"},
                                             "dequant_cache": False, "backend": "triton"}}
    assert ag.suite_mismatch(doc, quick, kvs) is None


# ---- planted NVFP4 bugs: the gate must bite -----------------------------------------------------


def _plant_unrounded_scale(monkeypatch) -> None:
    """Elements divided by the unrounded FP32 block scale; the rounded E4M3 one is stored and
    used to decode (the public-reference bug kv-formats.md warns about: up to ~6% gain error)."""
    import nvfp4kv.formats.nvfp4 as nv
    from nvfp4kv.formats.e2m1 import E2M1_MAX, pack_nibbles, rne_e2m1_codes
    from nvfp4kv.formats.e4m3 import E4M3_MAX, e4m3_bits_to_float

    def quantize(x, global_scale, tiny_scale="zero"):
        xf = x.float()
        blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // nv.NVFP4_BLOCK, nv.NVFP4_BLOCK)
        gs = nv._scale_for_blocks(global_scale, xf)
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
        bits = nv.nvfp4_block_scale_bits(block_amax, gs, tiny_scale)
        unrounded = torch.clamp(block_amax / (E2M1_MAX * gs), max=E4M3_MAX) * gs
        nonzero = (e4m3_bits_to_float(bits) * gs > 0) & (unrounded > 0)
        scaled = blocks / torch.where(nonzero, unrounded, torch.ones_like(unrounded))
        codes = torch.where(nonzero, rne_e2m1_codes(scaled), torch.zeros((), dtype=torch.uint8))
        return pack_nibbles(codes.flatten(-2)), bits.squeeze(-1)

    monkeypatch.setattr(nv, "quantize_nvfp4", quantize)


def _plant_swapped_nibbles(monkeypatch) -> None:
    """The packer puts element 2i in the high nibble; the reader expects it in the low one."""
    import nvfp4kv.formats.nvfp4 as nv

    original = nv.quantize_nvfp4

    def quantize(x, global_scale, tiny_scale="zero"):
        codes, scales = original(x, global_scale, tiny_scale)
        return ((codes & 0x0F) << 4) | (codes >> 4), scales

    monkeypatch.setattr(nv, "quantize_nvfp4", quantize)


def _plant_dropped_global_scale(monkeypatch) -> None:
    """The decoder forgets the FP32 global scale: ``x_hat = e2m1(q) * float(s)``."""
    import nvfp4kv.formats.nvfp4 as nv

    original = nv.dequantize_nvfp4

    def dequantize(codes, scales, global_scale, dtype=torch.float32):
        return original(codes, scales, 1.0, dtype)

    monkeypatch.setattr(nv, "dequantize_nvfp4", dequantize)


def _plant_token_axis_blocks(monkeypatch) -> None:
    """Blocks of 16 run along tokens (per channel) instead of along head_dim.

    Written as a consistent format (the cache groups 16 tokens before packing, like KIVI keys),
    so nothing crashes: only the numerics differ from NVFP4's.
    """
    import nvfp4kv.formats.nvfp4 as nv
    from nvfp4kv.formats.e2m1 import decode_e2m1, pack_nibbles, rne_e2m1_codes, unpack_nibbles
    from nvfp4kv.formats.e4m3 import e4m3_bits_to_float

    block = nv.NVFP4_BLOCK

    def token_blocks(x):  # [B, H, T, D] -> [B, H, T/16, 16, D]
        return x.reshape(*x.shape[:2], x.shape[2] // block, block, x.shape[3])

    def quantize(self, x, global_scale=None):
        self.check_input(x)
        gs = self.global_scale(x) if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32)
        gs = gs.reshape(-1)[0] if gs.numel() == 1 else gs  # the gate's default policy: one scale per tensor
        blocks = token_blocks(x.float())
        bits = nv.nvfp4_block_scale_bits(blocks.abs().amax(dim=3, keepdim=True), gs, self.tiny_scale)
        decode_scale = e4m3_bits_to_float(bits) * gs
        nonzero = decode_scale > 0
        codes = torch.where(nonzero, rne_e2m1_codes(blocks / torch.where(nonzero, decode_scale, torch.ones_like(decode_scale))),
                            torch.zeros((), dtype=torch.uint8))
        return {"codes": pack_nibbles(codes.flatten(2, 3)), "scales": bits.squeeze(3)}

    def dequantize(self, parts, global_scale, dtype):
        gs = torch.as_tensor(global_scale, dtype=torch.float32)
        gs = gs.reshape(-1)[0] if gs.numel() == 1 else gs
        values = token_blocks(decode_e2m1(unpack_nibbles(parts["codes"])))
        return (values * (e4m3_bits_to_float(parts["scales"]).unsqueeze(3) * gs)).flatten(2, 3).to(dtype)

    monkeypatch.setattr(nv.NVFP4Format, "token_group", property(lambda self: block))
    monkeypatch.setattr(nv.NVFP4Format, "quantize", quantize)
    monkeypatch.setattr(nv.NVFP4Format, "dequantize", dequantize)


PLANTED_BUGS: dict[str, Callable] = {
    "unrounded_block_scale": _plant_unrounded_scale,
    "swapped_nibbles": _plant_swapped_nibbles,
    "dropped_global_scale": _plant_dropped_global_scale,
    "token_axis_blocks": _plant_token_axis_blocks,
}


def _run_quick_sweep(run_dir: Path) -> Path:
    from nvfp4kv.eval.sweep import run_sweep

    return run_sweep(gate.gate_config(True, ["nvfp4"], run_dir), overrides=[])


@pytest.fixture(scope="module")
def quick_gate(tmp_path_factory):
    """A runner of the quick gate sweep (NVFP4 only) and a baseline document from the correct code."""
    from nvfp4kv.metrics.fidelity import REFERENCE

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    gate.make_deterministic(1)
    REFERENCE.clear()
    runs = iter(range(1000))
    run = lambda: _run_quick_sweep(tmp_path_factory.mktemp("gate") / f"run{next(runs)}")  # noqa: E731
    baseline = ag.run_document(run())
    yield run, baseline
    REFERENCE.clear()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _verdict(run, baseline):
    return ag.decide(run(), baseline, alpha=0.05).checks


@pytest.mark.slow
def test_gate_passes_on_the_correct_code(quick_gate):
    run, baseline = quick_gate
    checks = _verdict(run, baseline)
    assert checks and not failed(checks)
    assert all(c.note == "identical to baseline" for c in checks if c.test == "bootstrap")  # deterministic
    assert baseline["formats"]["nvfp4"]["summary"]["kl_mean"] > 0  # the format really acts on the numbers


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_gate_fails_on_a_planted_nvfp4_bug(quick_gate, monkeypatch, bug):
    run, baseline = quick_gate
    PLANTED_BUGS[bug](monkeypatch)
    checks = _verdict(run, baseline)
    print(f"\nplanted bug {bug}:\n{ag.checks_table(checks)}")  # which checks caught it (pytest -s)
    regressed = [c for c in failed(checks) if c.status == "REGRESSED"]
    assert regressed, "\n" + ag.checks_table(checks)


@pytest.mark.slow
def test_cli_update_then_pass_then_missing_baseline(tmp_path, quick_gate, capsys):
    """End to end through ``main``: write a baseline, pass against it, refuse a missing one."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    base, out = tmp_path / "b.json", tmp_path / "out" / "last.json"
    common = ["--quick", "--formats", "bf16", "--threads", "1", "--out", str(out), "--baseline"]
    try:
        assert gate.main([*common, str(base), "--update-baseline"]) == 0
        assert gate.main([*common, str(base)]) == 0
        assert gate.main([*common, str(tmp_path / "none.json")]) == 2
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    text = capsys.readouterr().out
    assert "GATE PASSED" in text and "no baseline" in text
    doc = json.loads(out.read_text())
    assert doc["status"] == "pass" and all(c["status"] == "ok" for c in doc["checks"])
    assert math.isfinite(doc["wall_s"]) and (Path(doc["run_dir"]) / "cells").is_dir()  # the sweep's records
