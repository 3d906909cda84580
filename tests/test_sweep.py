"""The sweep runner with fake task families and a fake model: layout, resume, interruption,
config mismatch on resume, failure modes, the model cache, and the Hydra entry point (run and
multirun). No real model is loaded here; the real smoke sweep is run by hand (see the README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from nvfp4kv import results
from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval import sweep as sweep_mod
from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind, task_kinds
from nvfp4kv.models import ModelSpec, load_model as REAL_LOAD_MODEL

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL = "smollm2-135m-instruct"
#: accuracy the fake task reports per K format: distinct, so the table's Δ can be checked
FAKE_ACC = {"bf16": 0.8, "fp8_e4m3": 0.75, "nvfp4": 0.6}
CALLS: list[tuple[str, str]] = []
FAIL_ON: set[str] = set()


def _fake_samples(kv, n: int) -> list[dict]:
    correct = round(FAKE_ACC[kv.k_format] * n)
    return [{"doc_id": i, "metrics": {"acc": float(i < correct)}, "target": "1", "prediction": "1" if i < correct else "0"}
            for i in range(n)]


def fake_acc(task_cfg, bundle, kv, *, limit, seed, lm=None, progress=True) -> CellResult:
    CALLS.append((task_cfg["name"], kv.k_format))
    if kv.k_format in FAIL_ON:
        raise RuntimeError(f"injected failure for {kv.k_format}")
    samples = _fake_samples(kv, limit or 10)
    acc = sum(s["metrics"]["acc"] for s in samples) / len(samples)
    return CellResult(metrics={"acc": MetricValue(acc, 0.05, len(samples))}, samples=samples,
                      extra={"grid": [{"context_len": 1024, "depth": 0.5, "acc": acc, "n": len(samples)}]})


if "fake_acc" not in task_kinds():
    register_task_kind("fake_acc")(fake_acc)


class FakeModel:
    """Just what the runner reads from a model: its config (head_dim) and device."""

    config = SimpleNamespace(head_dim=64, hidden_size=576, num_attention_heads=9)
    device = "cpu"


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    """Replace model loading by a fake bundle; count loads."""
    from nvfp4kv.models import ModelBundle

    loads = []

    def load(spec):
        loads.append(spec)
        return ModelBundle(model=FakeModel(), tokenizer=None, spec=spec)

    monkeypatch.setattr("nvfp4kv.models.load_model", load)
    monkeypatch.setattr("nvfp4kv.eval.loaded_model._MODEL_CACHE", {})
    CALLS.clear()
    FAIL_ON.clear()
    return loads


def make_config(run_dir: Path, **changes) -> dict:
    """The smoke sweep's config with its tasks replaced by two fake tasks (bf16, fp8, nvfp4)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=["+sweep=smoke", f"run_dir={run_dir}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["tasks"] = {"alpha": {"kind": "fake_acc", "limit": 4}, "beta": {"kind": "fake_acc", "limit": None}}
    config["limit"] = 6
    config.update(changes)
    return config


def cell_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "cells").glob("*"))


def test_run_writes_the_results_layout(tmp_path):
    run_dir = sweep_mod.run_sweep(make_config(tmp_path / "run"))
    assert run_dir == (tmp_path / "run").resolve()
    assert cell_files(run_dir) == sorted(f"{MODEL}__{t}__{kv}.json" for t in ("alpha", "beta") for kv in ("bf16", "fp8", "nvfp4"))
    cell = json.loads((run_dir / "cells" / f"{MODEL}__alpha__nvfp4.json").read_text())
    for key in ("cell_id", "run_id", "model", "task", "kv", "kv_config", "bits_per_element", "task_config", "config",
                "versions", "git", "started", "wall_s", "metrics", "extra"):
        assert key in cell, key
    assert cell["model"] == MODEL and cell["task"] == "alpha" and cell["kv"] == "nvfp4"
    assert cell["bits_per_element"] == 4.5 and cell["kv_config"]["k_format"] == "nvfp4"
    assert cell["metrics"]["acc"] == {"value": 0.5, "stderr": 0.05, "n": 4}  # limit 4: round(0.6*4)=2 of 4
    assert cell["config"]["run_dir"] == str(tmp_path / "run")
    assert set(cell["versions"]) >= {"torch", "transformers", "lm_eval", "nvfp4kv"}
    assert cell["limit"] == 4 and cell["task_config"] == {"kind": "fake_acc", "name": "alpha"}
    beta = json.loads((run_dir / "cells" / f"{MODEL}__beta__bf16.json").read_text())
    assert beta["limit"] == 6 and beta["metrics"]["acc"]["n"] == 6  # the top-level limit applies
    bits = {kv: json.loads((run_dir / "cells" / f"{MODEL}__alpha__{kv}.json").read_text())["bits_per_element"]
            for kv in ("bf16", "fp8")}
    assert bits == {"bf16": 16.0, "fp8": 8.0}

    lines = (run_dir / "samples" / f"{MODEL}__alpha__nvfp4.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 4 and {"doc_id", "task", "kv", "model", "metrics"} <= set(first)
    assert (first["task"], first["kv"], first["model"]) == ("alpha", "nvfp4", MODEL)

    csv = (run_dir / "results.csv").read_text().splitlines()
    from nvfp4kv.analysis.report import CSV_COLUMNS

    assert csv[0] == ",".join(CSV_COLUMNS) and len(csv) == 1 + 6
    table = (run_dir / "table.md").read_text()
    assert "Δ vs bf16" in table and "(baseline)" in table
    assert "| alpha | acc | nvfp4 | 4.5 | prefill/serving | 50.0 ± 5.0 | -25.0 |" in table  # 0.50 vs 0.75
    assert (run_dir / "plots" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "plots" / "retrieval_heatmaps.png").is_file()
    assert "run_dir: " in (run_dir / "sweep.yaml").read_text()


def test_resume_recomputes_only_missing_cells(tmp_path):
    config = make_config(tmp_path / "run")
    run_dir = sweep_mod.run_sweep(config)
    kept = run_dir / "cells" / f"{MODEL}__alpha__bf16.json"
    kept_mtime = kept.stat().st_mtime_ns
    (run_dir / "cells" / f"{MODEL}__beta__fp8.json").unlink()
    CALLS.clear()
    sweep_mod.run_sweep(config)
    assert CALLS == [("beta", "fp8_e4m3")]
    assert kept.stat().st_mtime_ns == kept_mtime
    assert len(cell_files(run_dir)) == 6


def test_interrupted_run_keeps_finished_cells_and_resumes(tmp_path):
    config = make_config(tmp_path / "run")
    FAIL_ON.add("fp8_e4m3")  # the 2nd cell of the first task raises
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep_mod.run_sweep(config)
    run_dir = tmp_path / "run"
    assert cell_files(run_dir) == [f"{MODEL}__alpha__bf16.json"]
    assert not [p for p in run_dir.rglob("*.tmp")], "no temporary files may be left behind"
    assert len((run_dir / "results.csv").read_text().splitlines()) == 2  # report rebuilt from the finished cell
    FAIL_ON.clear()
    CALLS.clear()
    sweep_mod.run_sweep(config)
    assert ("alpha", "bf16") not in CALLS and len(CALLS) == 5


def test_fail_fast_false_runs_the_other_cells_then_fails(tmp_path):
    FAIL_ON.add("fp8_e4m3")
    with pytest.raises(RuntimeError, match=r"2 cell\(s\) failed.*run_dir="):
        sweep_mod.run_sweep(make_config(tmp_path / "run", fail_fast=False))
    assert len(cell_files(tmp_path / "run")) == 4


def test_resume_refuses_a_changed_configuration_before_any_work(tmp_path, fake_model):
    config = make_config(tmp_path / "run")
    sweep_mod.run_sweep(config)
    (tmp_path / "run" / "cells" / f"{MODEL}__alpha__bf16.json").unlink()  # a cell that *would* be computed
    CALLS.clear()
    loads = len(fake_model)
    changed = make_config(tmp_path / "run", seed=99)
    with pytest.raises(ConfigError, match=r"differs in 1 field\(s\) \(seed: run has 1234, this invocation 99\).*new run_dir"):
        sweep_mod.run_sweep(changed)
    changed = make_config(tmp_path / "run")
    changed["kvs"]["nvfp4"]["residual_length"] = 64
    with pytest.raises(ConfigError, match=r"alpha__nvfp4 in .* different kv_config"):
        sweep_mod.run_sweep(changed)
    assert CALLS == [] and len(fake_model) == loads, "nothing may run (or load) before the mismatch is reported"


def test_a_kind_whose_module_fails_to_import_errors_only_when_used(tmp_path, monkeypatch, fake_model):
    monkeypatch.setitem(sweep_mod.TASK_KIND_MODULES, "ghost", "nvfp4kv._no_such_module")
    config = make_config(tmp_path / "run")
    sweep_mod.plan_sweep(config)  # not used: fine
    config["tasks"]["haunted"] = {"kind": "ghost"}
    with pytest.raises(ConfigError, match=r"tasks\.haunted: Task kind 'ghost' is provided by nvfp4kv\._no_such_module"):
        sweep_mod.run_sweep(config)
    assert not fake_model, "validation must fail before the model is loaded"


def test_block_size_mismatch_names_the_kv_config(tmp_path, monkeypatch):
    monkeypatch.setattr(FakeModel, "config", SimpleNamespace(head_dim=40, hidden_size=360, num_attention_heads=9))
    with pytest.raises(ConfigError, match=r"kvs\.nvfp4: .*blocks of 16.*head_dim is 40"):
        sweep_mod.run_sweep(make_config(tmp_path / "run"))


def test_model_is_loaded_once_per_spec(fake_model):
    spec = ModelSpec(device="cpu")
    assert sweep_mod.get_model(spec) is sweep_mod.get_model(ModelSpec(device="cpu"))
    assert len(fake_model) == 1
    sweep_mod.get_model(ModelSpec(device="cpu", dtype="float32"))
    assert len(fake_model) == 2


def test_local_model_too_big_for_memory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr("nvfp4kv.eval.loaded_model._available_bytes", lambda device: 1024)
    with pytest.raises(ConfigError, match=r"needs ~.*GiB.*only .*GiB is free"):
        sweep_mod.get_model(ModelSpec(name_or_path=str(tmp_path), device="cpu"))


# ---------------------------------------------------------------------------- Hydra entry point
def _run_cli(monkeypatch, *args: str) -> None:
    """``python -m experiments.run <args>`` in this process (Hydra reads sys.argv)."""
    from experiments import run as run_mod

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["experiments/run.py", *args])
    try:
        run_mod.main()
    finally:
        GlobalHydra.instance().clear()


FAKE_TASK_OVERRIDES = ("~tasks.gsm8k", "~tasks.mmlu", "~tasks.passkey", "~tasks.fidelity",
                       "+tasks.alpha={kind:fake_acc,limit:3}", "~kvs.fp8")


def test_cli_run_uses_one_directory_for_hydra_and_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES)
    (run_dir,) = (tmp_path / "results" / "runs" / "smoke").iterdir()
    assert cell_files(run_dir) == [f"{MODEL}__alpha__bf16.json", f"{MODEL}__alpha__nvfp4.json"]
    assert not (run_dir / ".hydra").exists(), "Hydra writes nothing into the run dir (the runner records the command)"
    assert "# command: python -m experiments.run +sweep=smoke" in (run_dir / "sweep.yaml").read_text()
    identity = json.loads((run_dir / "identity.json").read_text())
    assert identity["command"][0] == "+sweep=smoke" and identity["run_id"] == run_dir.name
    log_text = (run_dir / "run.log").read_text()
    assert "start smollm2-135m-instruct__alpha__bf16" in log_text and "stop: finished" in log_text


def test_cli_multirun_gives_each_job_its_own_run_dir_and_reuses_the_model(tmp_path, monkeypatch, fake_model):
    monkeypatch.chdir(tmp_path)
    _run_cli(monkeypatch, "-m", "+sweep=smoke", *FAKE_TASK_OVERRIDES, "seed=1,2")
    run_dirs = sorted((tmp_path / "results" / "runs" / "smoke").iterdir())
    assert len(run_dirs) == 2 and run_dirs[0].name.endswith("-0") and run_dirs[1].name.endswith("-1")
    assert all(len(cell_files(d)) == 2 for d in run_dirs)
    seeds = {json.loads(next((d / "cells").iterdir()).read_text())["seed"] for d in run_dirs}
    assert seeds == {1, 2}
    assert len(fake_model) == 1, "the module-level model cache must survive across multirun jobs"


def test_cli_reports_config_errors_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "kvs.nvfp4.k_format=nvfp5")
    assert info.value.code == 2
    assert "error: kvs.nvfp4: Unknown KV format 'nvfp5'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists(), "a typo must not leave an empty run dir"


def test_cli_config_error_keeps_an_existing_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=kept")
    with pytest.raises(SystemExit):
        _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=kept", "kvs.nvfp4.k_format=nvfp5")
    assert len(cell_files(tmp_path / "kept")) == 2


# ---------------------------------------------------------------------------- clear errors
def test_offline_hub_without_local_data_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NVFP4KV_DATA_DIR", raising=False)
    monkeypatch.setattr("nvfp4kv.eval.data.shared_data_dir", lambda: None)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=["+sweep=gsm8k", "run_dir=/tmp/unused", "data_dir=null"])
    with pytest.raises(DatasetNotFoundError, match=r"tasks\.gsm8k: .*openai/gsm8k.*offline.*NVFP4KV_DATA_DIR"):
        sweep_mod.plan_sweep(cfg)


def test_default_data_dir_prefers_env_then_shared_data_beside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFP4KV_DATA_DIR", str(tmp_path))
    assert sweep_mod._default_data_dir() == str(tmp_path)
    monkeypatch.delenv("NVFP4KV_DATA_DIR")
    beside = Path(sweep_mod.__file__).resolve().parents[2].parent / "shared" / "data"
    assert sweep_mod._default_data_dir() == (str(beside) if beside.is_dir() else None)
    monkeypatch.setattr("nvfp4kv.eval.data.shared_data_dir", lambda: None)
    assert sweep_mod._default_data_dir() is None


def test_missing_local_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFP4KV_DATA_DIR", str(tmp_path / "nowhere"))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=["+sweep=mmlu", "run_dir=/tmp/unused"])
    with pytest.raises(DatasetNotFoundError, match=r"tasks\.mmlu: Local data directory .*nowhere.* does not exist"):
        sweep_mod.plan_sweep(cfg)


def test_hub_model_while_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("nvfp4kv.models.load_model", REAL_LOAD_MODEL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = make_config(tmp_path / "run")
    config["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE=1 is set.*local HF directory"):
        sweep_mod.run_sweep(config)


def test_a_task_family_from_another_module_is_imported_by_its_module_key(tmp_path):
    config = make_config(tmp_path / "run")
    config["tasks"] = {"ext": {"kind": "external_constant", "module": "fake_task_kind", "value": 0.25}}
    run_dir = sweep_mod.run_sweep(config)
    cell = json.loads((run_dir / "cells" / f"{MODEL}__ext__nvfp4.json").read_text())
    assert cell["metrics"]["score"]["value"] == 0.25
    assert cell["task_config"] == {"kind": "external_constant", "value": 0.25, "name": "ext"}  # runner keys stripped
    config["tasks"]["ext"]["module"] = "no_such_module_anywhere"
    with pytest.raises(ConfigError, match=r"tasks\.ext: module='no_such_module_anywhere'"):
        sweep_mod.plan_sweep(config)
