"""Sweeps that cannot lie (issue 10): one run identity, refusals that leave no trace, checks before
the model loads, exit codes and run.log, shards into one run directory.

Uses the fake task family and fake model of tests/test_sweep.py: no real model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from nvfp4kv import results
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval import identity as ident
from nvfp4kv.eval import sweep as sweep_mod
from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind, task_kinds
from test_sweep import _run_cli as run_cli_raising
from test_sweep import CALLS, FAIL_ON, FAKE_TASK_OVERRIDES, MODEL, cell_files, fake_model, make_config  # noqa: F401


def dir_digest(path: Path) -> str:
    """A hash of every file's relative path, bytes and mode below ``path`` (and of the empty dirs)."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        digest.update(str(item.relative_to(path)).encode())
        if item.is_file():
            digest.update(item.read_bytes())
            digest.update(str(item.stat().st_mode).encode())
    return digest.hexdigest()


def _interrupting(task_cfg, bundle, kv, *, limit, seed, lm=None, progress=True) -> CellResult:
    if kv.k_format == "nvfp4":
        raise KeyboardInterrupt
    return CellResult(metrics={"acc": MetricValue(1.0, 0.0, 1)}, samples=[{"doc_id": 0, "metrics": {"acc": 1.0}}])


if "interrupting" not in task_kinds():
    register_task_kind("interrupting")(_interrupting)


def _run_cli(monkeypatch, *args: str) -> int:
    """test_sweep's CLI runner, returning the exit code instead of raising SystemExit."""
    try:
        run_cli_raising(monkeypatch, *args)
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)


# ---------------------------------------------------------------------------- F1: one run id
def test_f1_a_resumed_run_keeps_one_run_id_in_every_record(tmp_path):
    first = make_config(tmp_path / "run")
    first["run_id"] = "first-invocation"
    run_dir = sweep_mod.run_sweep(first)
    (run_dir / "cells" / f"{MODEL}__beta__fp8.json").unlink()
    second = make_config(tmp_path / "run")
    second["run_id"] = "second-invocation"  # what the config resolver gives a new invocation
    sweep_mod.run_sweep(second)
    cells = results.read_cells(run_dir)
    assert {c["run_id"] for c in cells} == {"first-invocation"}
    assert {s["run_id"] for c in cells for s in results.read_samples(run_dir, c["cell_id"])} == {"first-invocation"}
    assert set(pd.read_csv(run_dir / "results.csv")["run_id"]) == {"first-invocation"}
    assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 1


def test_f1_analysis_refuses_to_pair_a_format_with_another_runs_baseline(tmp_path):
    from nvfp4kv.analysis import compare, load_results, load_samples
    from nvfp4kv.errors import MixedRunsError

    config_a = make_config(tmp_path / "a")
    sweep_mod.run_sweep(config_a)
    config_b = make_config(tmp_path / "b")
    config_b["kvs"].pop("bf16")  # run b has no baseline of its own
    sweep_mod.run_sweep(config_b)
    frame = load_results([tmp_path / "a", tmp_path / "b"])
    samples = load_samples([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(MixedRunsError, match="allow_mixed_runs=True"):
        compare(frame, samples=samples)
    mixed = compare(frame, samples=samples, allow_mixed_runs=True)
    assert mixed["delta"].notna().all()


# ---------------------------------------------------------------------------- F2: identity fields
@pytest.mark.parametrize("change, field", [
    ({"seed": 99}, "seed"),
    ({"limit": 2}, "limit"),
    ({"model.dtype": "float32"}, "model.dtype"),
    ({"loglikelihood_mode": "raw_prefill"}, "loglikelihood_mode"),
])
def test_f2_a_resume_that_changes_a_number_changing_field_is_refused(tmp_path, change, field):
    sweep_mod.run_sweep(make_config(tmp_path / "run"))
    changed = make_config(tmp_path / "run")
    for key, value in change.items():
        target = changed
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    changed["tasks"]["gamma"] = {"kind": "fake_acc", "name": "gamma"}  # a new cell must not slip in either
    before = dir_digest(tmp_path / "run")
    CALLS.clear()
    with pytest.raises(ident.IdentityMismatchError, match=rf"{field}: run has .*Fix: .*new run_dir"):
        sweep_mod.run_sweep(changed)
    assert CALLS == [] and dir_digest(tmp_path / "run") == before


def test_f2_the_identity_records_versions_commit_device_and_data(tmp_path):
    run_dir = sweep_mod.run_sweep(make_config(tmp_path / "run"))
    fields = json.loads((run_dir / "identity.json").read_text())["fields"]
    for key in ("model.name_or_path", "model.dtype", "device_kind", "seed", "versions.torch",
                "versions.transformers", "versions.lm_eval", "nvfp4kv.version", "nvfp4kv.git_commit",
                "nvfp4kv.git_dirty"):
        assert key in fields, key
    assert fields["device_kind"] == "cpu"
    import torch
    import transformers

    assert fields["versions.torch"] == torch.__version__ and fields["versions.transformers"] == transformers.__version__
    assert fields["seed"] == 1234 and fields["model.dtype"] == "bfloat16"
    assert fields["nvfp4kv.git_commit"] == ident.git_state()[0]


def test_f2_a_changed_harness_version_is_refused_unless_explicitly_allowed(tmp_path, monkeypatch):
    sweep_mod.run_sweep(make_config(tmp_path / "run"))
    real = ident.package_versions

    def newer():
        return {**real(), "transformers": "99.0.0"}

    monkeypatch.setattr(ident, "package_versions", newer)
    with pytest.raises(ident.IdentityMismatchError, match=r"versions\.transformers"):
        sweep_mod.run_sweep(make_config(tmp_path / "run"))
    allowed = make_config(tmp_path / "run")
    allowed["allow_identity_change"] = ["versions.transformers"]
    sweep_mod.run_sweep(allowed)
    entry = json.loads((tmp_path / "run" / "resumes.jsonl").read_text().splitlines()[-1])
    assert entry["allowed_changes"] == {"versions.transformers": "99.0.0"}
    stored = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert stored["fields"]["versions.transformers"] != "99.0.0", "the identity is written once, never rewritten"


# ---------------------------------------------------------------------------- F3: no trace
def test_f3_a_refused_resume_changes_no_byte_of_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=run") == 0
    before = dir_digest(tmp_path / "run")
    code = _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=run", "seed=7")
    assert code == 2
    assert dir_digest(tmp_path / "run") == before
    code = _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=run", "kvs.nvfp4.residual_length=8")
    assert code == 2
    assert dir_digest(tmp_path / "run") == before


# ---------------------------------------------------------------------------- F4/F5: before the model
def _load_must_not_happen(spec):
    raise AssertionError("the model must not load before the config is checked")


def test_f5_a_missing_local_model_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("nvfp4kv.models.load_model", _load_must_not_happen)
    code = _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "model=local",
                    f"model.name_or_path={tmp_path / 'no-such-model'}")
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no such directory" in lines[0] and "model=smollm2" in lines[0]
    assert "Traceback" not in err


def test_f5_a_directory_that_is_not_a_model_is_refused(tmp_path):
    config = make_config(tmp_path / "run")
    config["model"]["name_or_path"] = str(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        sweep_mod.plan_sweep(config)


def test_an_unwritable_run_dir_is_refused_before_loading(tmp_path):
    blocker = tmp_path / "a-file"  # a path under a regular file can never be created, even by root
    blocker.write_text("")
    config = make_config(blocker / "run")
    with pytest.raises(ConfigError, match="not a writable directory"):
        sweep_mod.plan_sweep(config)


def test_debug_true_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "kvs.nvfp4.k_format=nvfp5", "debug=true")
    assert code == 2 and "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------- F6/F7: exit codes, run.log
def test_f6_a_failing_report_is_a_failing_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    from nvfp4kv.analysis import report

    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.chdir(tmp_path)
    assert _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=run") == 1
    assert "stop: failed" in (tmp_path / "run" / "run.log").read_text()


def test_f7_run_log_records_cells_and_why_the_run_stopped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=run") == 0
    text = (tmp_path / "run" / "run.log").read_text()
    assert f"start {MODEL}__alpha__bf16" in text
    assert f"end {MODEL}__alpha__bf16 in " in text
    assert "stop: finished (2 cells computed" in text

    FAIL_ON.add("nvfp4")
    assert _run_cli(monkeypatch, "+sweep=smoke", *FAKE_TASK_OVERRIDES, "run_dir=failing") == 1
    text = (tmp_path / "failing" / "run.log").read_text()
    assert "failed: RuntimeError: injected failure" in text and "stop: failed" in text
    assert "Resume with: python -m experiments.run" in text and "run_dir=" in text


def test_f7_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _run_cli(monkeypatch, "+sweep=smoke", "~tasks.gsm8k", "~tasks.mmlu", "~tasks.passkey", "~tasks.fidelity",
                    "+tasks.stop={kind:interrupting}", "run_dir=run")
    assert code == 130
    text = (tmp_path / "run" / "run.log").read_text()
    assert "stop: interrupted" in text
    assert "interrupted; finished cells are kept. Resume with: python -m experiments.run +sweep=smoke" in text
    assert len(cell_files(tmp_path / "run")) == 2  # bf16 and fp8 finished before the interrupt


def test_f7_a_refusal_after_loading_is_logged_as_refused(tmp_path, monkeypatch):
    config = make_config(tmp_path / "run")
    monkeypatch.setattr("test_sweep.FakeModel.config", type("C", (), {"head_dim": 24})())  # NVFP4 blocks of 16
    with pytest.raises(ConfigError, match="head_dim is 24"):
        sweep_mod.run_sweep(config)
    assert "stop: refused" in (tmp_path / "run" / "run.log").read_text()


# ---------------------------------------------------------------------------- shards (cluster jobs)
def test_shards_write_one_run_dir_under_one_identity_with_the_same_records(tmp_path):
    whole = sweep_mod.run_sweep(make_config(tmp_path / "whole"))
    for shard in (1, 0, 2):  # any order: the first to start creates the identity
        config = make_config(tmp_path / "sharded", shard=shard, num_shards=3)
        config["run_id"] = f"job-{shard}"
        sweep_mod.run_sweep(config)
    sharded = tmp_path / "sharded"
    assert cell_files(sharded) == cell_files(whole)
    assert {c["run_id"] for c in results.read_cells(sharded)} == {"job-1"}

    def records(run_dir):
        return {c["cell_id"]: [{k: v for k, v in s.items() if k != "run_id"}
                               for s in results.read_samples(run_dir, c["cell_id"])]
                for c in results.read_cells(run_dir)}

    assert records(sharded) == records(whole)


def test_a_bad_shard_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="0 <= shard < num_shards"):
        sweep_mod.plan_sweep(make_config(tmp_path / "run", shard=3, num_shards=3))


# ---------------------------------------------------------------------------- comparing runs
def test_compare_runs_finds_identical_records_and_a_changed_sample(tmp_path, capsys):
    from experiments.compare_runs import main as compare_main

    whole = sweep_mod.run_sweep(make_config(tmp_path / "a"))
    sweep_mod.run_sweep(make_config(tmp_path / "b", shard=0, num_shards=2))
    sweep_mod.run_sweep(make_config(tmp_path / "b", shard=1, num_shards=2))
    assert compare_main([str(whole), str(tmp_path / "b")]) == 0
    path = results.samples_path(tmp_path / "b", f"{MODEL}__beta__nvfp4")
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["prediction"] = "tampered"
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    assert compare_main([str(whole), str(tmp_path / "b")]) == 1
    assert "beta__nvfp4: sample 0 (doc_id 0) differs in ['prediction']" in capsys.readouterr().err


def test_compare_runs_tolerance_applies_to_cell_aggregates_only(tmp_path):
    from experiments.compare_runs import main as compare_main

    a = sweep_mod.run_sweep(make_config(tmp_path / "a"))
    b = sweep_mod.run_sweep(make_config(tmp_path / "b"))
    cell_path = results.cell_path(b, f"{MODEL}__alpha__fp8")
    cell = json.loads(cell_path.read_text())
    cell["metrics"]["acc"]["value"] *= 1 + 1e-15  # a last-bit change of an aggregate
    cell_path.write_text(json.dumps(cell))
    assert compare_main([str(a), str(b)]) == 1
    assert compare_main([str(a), str(b), "--metrics-rel-tol", "1e-12"]) == 0
    samples = results.samples_path(b, f"{MODEL}__alpha__fp8")
    record = json.loads(samples.read_text().splitlines()[0])
    record["metrics"]["acc"] = 1.0 - record["metrics"]["acc"]
    samples.write_text("\n".join([json.dumps(record), *samples.read_text().splitlines()[1:]]) + "\n")
    assert compare_main([str(a), str(b), "--metrics-rel-tol", "1e-12"]) == 1  # samples stay exact


def test_a_refetched_model_keeps_its_hash_but_other_weights_do_not(tmp_path):
    """Fetching the same GGUF again (another day, another machine) rewrites the provenance's time,
    timings and cache path: the identity must not change, or every resume would need an allowance."""
    import json

    from nvfp4kv.eval.identity import local_model_hash

    def model_dir(name, **provenance):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"num_hidden_layers": 2}')
        (d / "model.safetensors").write_bytes(b"\0" * 64)
        base = {"gguf": {"sha256": "aa"}, "created": "2026-12-01T00:00:00", "timings_s": {"convert_s": 1.0},
                "cache_dir": "/a"}
        (d / "nvfp4kv_provenance.json").write_text(json.dumps({**base, **provenance}))
        return d

    first = local_model_hash(model_dir("first"))
    assert local_model_hash(model_dir("refetch", created="2026-12-05T07:33:31", timings_s={"convert_s": 9.0},
                                      cache_dir="/b")) == first
    assert local_model_hash(model_dir("other", gguf={"sha256": "bb"})) != first
