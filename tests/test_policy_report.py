"""The scale-policy table (issue 11 item 2): every policy names the engine that runs it, and
``+sweep=policies`` runs on a tiny slice into a table with fidelity and MMLU per policy."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from experiments.policy_report import ENGINE_OF_POLICY, policy_markdown, policy_table
from nvfp4kv.config.choices import SCALE_POLICIES

REPO = Path(__file__).resolve().parents[1]


def test_every_scale_policy_says_which_engine_runs_it():
    assert set(ENGINE_OF_POLICY) == set(SCALE_POLICIES)


def test_policies_sweep_runs_on_a_tiny_slice_into_the_policy_table(tmp_path):
    run_dir = tmp_path / "policies"
    drop = [f"~kvs.{kv}" for kv in ("nvfp4_prefill", "nvfp4_first_batch", "nvfp4_dynamic", "fp8_prefill",
                                    "fp8_static", "fp8_unit", "fp8_first_batch", "fp8_dynamic")]
    cmd = [sys.executable, "-m", "experiments.run", "+sweep=policies", f"run_dir={run_dir}", "progress=false",
           "tasks.mmlu.subjects=[abstract_algebra]", "tasks.mmlu.limit=2", "tasks.fidelity.context_lens=[64]",
           "tasks.fidelity.n_score=8", "tasks.fidelity.n_windows=1", "tasks.fidelity.greedy_prompts=1",
           "tasks.fidelity.greedy_prompt_len=16", "tasks.fidelity.greedy_tokens=4",
           "tasks.fidelity.capture_tokens=64", *drop]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = policy_table([str(run_dir)]).set_index("kv")
    assert sorted(table.index) == ["bf16", "fp8_first_batch_vllm", "nvfp4_static", "nvfp4_unit"]
    assert table.loc["nvfp4_static", "policy"] == "static" and "TensorRT-LLM" in table.loc["nvfp4_static", "engine"]
    assert table.loc["nvfp4_unit", "engine"].startswith("vLLM V1 and SGLang")
    assert table.loc["fp8_first_batch_vllm", "policy"] == "first_batch (vLLM divisors)"
    for kv in ("nvfp4_static", "nvfp4_unit", "fp8_first_batch_vllm"):
        assert math.isfinite(table.loc[kv, "kl_mean"]) and table.loc[kv, "kl_mean"] > 0
        assert table.loc[kv, "n"] == 2 and 0 <= table.loc[kv, "same_answer"] <= 1
    text = policy_markdown(table.reset_index())
    assert "(baseline)" in text and "vLLM V1 and SGLang" in text and "MMLU acc %" in text
