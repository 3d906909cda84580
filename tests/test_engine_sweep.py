"""`engine=<profile>` in a sweep (issue 11 item 3): the profile's overrides reach every KV setting,
formats it cannot store are refused before torch loads, and every result row names the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from test_sweep import _run_cli as run_cli_raising
from test_sweep import FAKE_TASK_OVERRIDES, fake_model  # noqa: F401  (fixture)

from nvfp4kv.eval.plan import plan_sweep

REPO = Path(__file__).resolve().parents[1]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import nvfp4kv.config  # noqa: F401  (schemas)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def test_an_engine_profile_overrides_every_kv_setting(tmp_path):
    plan = plan_sweep(compose("+sweep=smoke", "engine=vllm_v1", "engine.scale_policy=unit", f"run_dir={tmp_path}/r"))
    assert plan.engine["name"] == "vllm_v1"
    for label in ("fp8", "nvfp4"):
        assert (plan.kvs[label].read_mode, plan.kvs[label].scale_policy) == ("quantized", "unit")
        assert any("Q quantization not emulated" in note for note in plan.engine_notes[label])
    default = plan_sweep(compose("+sweep=smoke", f"run_dir={tmp_path}/s"))
    assert default.engine == {"name": "none"} and default.kvs["nvfp4"].read_mode == "serving"


def test_a_format_the_engine_cannot_store_is_refused_in_one_line_before_torch():
    probe = ("import runpy, sys; sys.argv = ['run', '+sweep=mmlu', 'engine=vllm_v1', '~kvs.k_fp8_v_nvfp4']\n"
             "try:\n    runpy.run_module('experiments.run', run_name='__main__')\n"
             "except SystemExit as e:\n    print('torch' in sys.modules, 'lm_eval' in sys.modules, e.code)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "engine=vllm_v1 does not support KV format 'fp4_mx_block16'" in lines[0] and "engine=none" in lines[0]
    assert proc.stdout.split() == ["False", "False", "2"]


def test_every_cell_and_result_row_names_the_engine(tmp_path, monkeypatch, fake_model):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    run_cli_raising(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "engine=trtllm", "engine.scale_policy=unit",
                    "run_dir=run")
    cells = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "cells").glob("*.json"))]
    assert cells and all(c["engine"] == "trtllm" and c["config"]["engine"]["name"] == "trtllm" for c in cells)
    nvfp4 = next(c for c in cells if c["kv"] == "nvfp4")
    assert nvfp4["kv_config"]["read_mode"] == "quantized" and nvfp4["engine_notes"]
    rows = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(rows["engine"]) == {"trtllm"}
