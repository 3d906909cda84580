"""Hydra configs: every sweep composes, every KV config is a valid KVCacheConfig, overrides work,
bad overrides fail early with a message that names the fix, and run dirs never collide."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from nvfp4kv.cache import KVCacheConfig
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval import sweep as sweep_mod
from nvfp4kv.formats import format_class
from nvfp4kv.models import ModelSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
KV_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "kv").glob("*.yaml") if not p.stem.startswith("_"))
TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
HAVE_DATA = bool(os.environ.get("NVFP4KV_DATA_DIR")) and Path(os.environ["NVFP4KV_DATA_DIR"]).is_dir()


def compose_cfg(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=list(overrides))


def test_expected_groups_exist():
    assert {"gsm8k", "mmlu", "long_context", "smoke", "full"} <= set(SWEEPS)
    assert {"bf16", "fp8", "nvfp4", "nvfp4_res128", "k_fp8_v_nvfp4", "fp4_mx_block16", "mxfp4",
            "int4_kivi", "int2_kivi", "fp8_per_head"} <= set(KV_CONFIGS)
    assert {"gsm8k", "gsm8k_cot", "mmlu", "ruler_niah", "passkey"} <= set(TASKS)
    assert {"smollm2", "llama31_8b_instruct", "qwen3_8b", "local"} <= set(MODELS)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_into_valid_kv_configs(name):
    cfg = compose_cfg(f"+sweep={name}", "run_dir=/tmp/unused")
    assert cfg.sweep.name == name
    assert len(cfg.tasks) >= 1 and len(cfg.kvs) >= 1
    for label, kv in cfg.kvs.items():
        KVCacheConfig.from_dict(kv)  # raises on an unknown format or field
    for task_name, task in cfg.tasks.items():
        assert task.kind in sweep_mod.TASK_KIND_MODULES, task_name
    assert "bf16" in cfg.kvs, "every sweep needs the bf16 baseline for its Δ column"


@pytest.mark.skipif(not HAVE_DATA, reason="needs NVFP4KV_DATA_DIR (local GSM8K/MMLU) to validate lm-eval tasks offline")
@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_plans_without_a_model(name):
    """Task validation (keys, local data files, offline hub) passes for the shipped sweeps, and the
    plan holds exactly the composed sweep: its tasks with their kinds and limits, its KV configs in
    order, and for each lm-eval task the local data it will read (source and hash)."""
    cfg = compose_cfg(f"+sweep={name}", "run_dir=/tmp/unused")
    plan = sweep_mod.plan_sweep(cfg)
    assert plan.sweep_name == name and plan.run_dir == Path("/tmp/unused").resolve()
    assert [t.name for t in plan.tasks] == list(cfg.tasks)
    for task in plan.tasks:
        composed = cfg.tasks[task.name]
        assert task.kind == composed.kind and task.config["name"] == task.name
        assert task.limit == (composed.get("limit") if composed.get("limit") is not None else cfg.limit)
        if task.kind == "lm_eval":  # HAVE_DATA: read from $NVFP4KV_DATA_DIR, hashed for the run identity
            data = task.data or {}
            assert data.get("source") == f"local:{Path(os.environ['NVFP4KV_DATA_DIR']).resolve()}", task.name
            assert len(data.get("sha256") or "") == 64, task.name
    assert list(plan.kvs) == list(cfg.kvs)
    assert all(plan.kvs[label] == KVCacheConfig.from_dict(cfg.kvs[label]) for label in cfg.kvs)


@pytest.mark.parametrize("name", KV_CONFIGS)
def test_every_kv_config_is_a_valid_cache_config(name):
    """Every key of the YAML reaches the KVCacheConfig unchanged (K/V options on top of the format's
    own defaults, as KIVI's), so no key is silently dropped, renamed or defaulted."""
    cfg = compose_cfg("+sweep=smoke", f"+kv@kvs.extra={name}")
    written = OmegaConf.to_container(cfg.kvs.extra, resolve=True, enum_to_str=True)
    kv = KVCacheConfig.from_dict(cfg.kvs.extra).to_dict()
    assert set(kv) == set(written)
    for side in ("k", "v"):
        defaults = dict(format_class(written[f"{side}_format"]).default_options.get(side, {}))
        assert kv.pop(f"{side}_options") == {**defaults, **written.pop(f"{side}_options")}, side
    assert kv == written


def test_kv_configs_mean_what_their_names_say():
    kvs = {name: KVCacheConfig.from_dict(compose_cfg("+sweep=smoke", f"+kv@kvs.x={name}").kvs.x) for name in
           ("bf16", "fp8", "nvfp4", "nvfp4_res128", "k_fp8_v_nvfp4", "int4_kivi", "fp8_per_head")}
    assert (kvs["bf16"].k_format, kvs["bf16"].v_format) == ("bf16", "bf16")
    assert (kvs["fp8"].k_format, kvs["fp8"].k_options.get("scaling", "tensor")) == ("fp8_e4m3", "tensor")
    assert kvs["fp8_per_head"].k_options["scaling"] == "head"
    assert (kvs["nvfp4"].k_format, kvs["nvfp4"].residual_length) == ("nvfp4", 0)
    assert kvs["nvfp4_res128"].residual_length == 128
    assert (kvs["k_fp8_v_nvfp4"].k_format, kvs["k_fp8_v_nvfp4"].v_format) == ("fp8_e4m3", "nvfp4")
    assert (kvs["int4_kivi"].k_options["axis"], kvs["int4_kivi"].v_options["axis"]) == ("channel", "token")
    assert kvs["int4_kivi"].residual_length == 128


def test_kv_schema_lists_every_cache_config_field_with_its_default():
    """So `kvs.<label>.<field>=...` works for every field without `+` (the KV files state only what
    differs), and the schema tracks the code: KVSchema's defaults are a BF16 KVCacheConfig's."""
    from nvfp4kv.config.schema import KVSchema

    assert not (CONFIG_DIR / "kv" / "_base.yaml").exists(), "the defaults live in the schema"
    schema = OmegaConf.to_container(OmegaConf.structured(KVSchema), enum_to_str=True)
    assert list(schema) == [f.name for f in dataclasses.fields(KVCacheConfig)]
    defaults = KVCacheConfig(k_format="bf16", v_format="bf16").to_dict()
    deliberate = {"dequant_cache"}  # CPU fast path on by default in sweeps: same outputs, faster
    assert {k: v for k, v in schema.items() if k not in deliberate} == {k: v for k, v in defaults.items() if k not in deliberate}
    assert schema["dequant_cache"] is True


@pytest.mark.parametrize("name", MODELS)
def test_model_configs_are_model_specs(name):
    cfg = compose_cfg("+sweep=smoke", f"model={name}", "model.name_or_path=/x" if name == "local" else "seed=1")
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))
    assert spec.device == cfg.device


def test_sweep_must_be_appended_with_plus():
    with pytest.raises(ConfigCompositionException, match=r"\+sweep=gsm8k"):
        compose_cfg("sweep=gsm8k")


def test_missing_sweep_lists_the_sweeps():
    cfg = compose_cfg()
    with pytest.raises(ConfigError, match=r"\+sweep=<name>") as info:
        sweep_mod.plan_sweep(cfg)
    for name in SWEEPS:
        assert name in str(info.value)


def test_command_line_precheck_for_a_missing_sweep():
    from experiments.run import _sweep_given

    assert not _sweep_given([])
    assert not _sweep_given(["limit=3"])
    assert _sweep_given(["+sweep=smoke"])
    assert _sweep_given(["-m", "+sweep=gsm8k,mmlu"])
    assert _sweep_given(["--help"])
    assert _sweep_given(["--cfg", "job"])


def test_overrides_change_add_and_remove_kv_configs():
    cfg = compose_cfg("+sweep=smoke", "kvs.nvfp4.residual_length=64", "+kv@kvs.nvfp4_res128=nvfp4_res128",
                      "~kvs.fp8", "tasks.gsm8k.limit=2", "limit=7", "run_dir=/tmp/unused")
    plan = sweep_mod.plan_sweep(cfg) if HAVE_DATA else None
    assert list(cfg.kvs) == ["bf16", "nvfp4", "nvfp4_res128"]
    assert cfg.kvs.nvfp4.residual_length == 64
    if plan is not None:
        limits = {t.name: t.limit for t in plan.tasks}
        assert limits["gsm8k"] == 2 and limits["passkey"] == 7  # per-task limit wins, else the global one
        assert plan.kvs["nvfp4"].residual_length == 64


def test_unknown_field_override_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="residual_len"):
        compose_cfg("+sweep=smoke", "kvs.nvfp4.residual_len=64")


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("kvs.nvfp4.k_format=nvfp5", r"kvs\.nvfp4: Unknown KV format 'nvfp5' \(kvs\.nvfp4\.k_format\); use one of "
                                     r"bf16, .*nvfp4"),
        ("limit=0", r"limit=0"),
        ("tasks.passkey.kind=nope", r"Unknown task kind 'nope'"),
        ("+tasks.x={kind:passkey,colour:red}", r"tasks\.x: Unknown key\(s\) \['colour'\] in passkey task config"),
        ("+tasks.passkey.colour=red", r"tasks\.passkey: Unknown key\(s\) \['colour'\] in passkey task config"),
        ("+kvs.nvfp4.residual_len=64", r"kvs\.nvfp4: Unknown KV cache config keys \['residual_len'\]"),
        ("+tasks.x={kind:passkey,trials:abc}", r"tasks\.x\.trials='abc' must be an integer"),
        ("+kvs.x={k_format:nvfp4,read_mode:sometimes}", r"kvs\.x\.read_mode='sometimes' is not allowed; use one of "
                                                        r"serving, quantized, raw_fresh"),
        ("+kvs.x={k_format:nvfp4,residual_len:64}", r"kvs\.x: Unknown KV cache config keys \['residual_len'\]"),
        ("shard=2", r"shard=2 num_shards=1"),
        ("batch_size=0", r"batch_size=0 is not allowed; use an integer >= 1 or auto"),
        ("+colour=red", r"Unknown run key\(s\) \['colour'\]; valid keys: sweep_name, "),
    ],
)
def test_bad_overrides_fail_before_loading_the_model(override, pattern, monkeypatch):
    """What composition cannot refuse (ranges, format names, inline nodes) fails in the cheap check."""
    def no_model(spec):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model must not be loaded for a config error")

    monkeypatch.setattr(sweep_mod, "get_model", no_model)
    cfg = compose_cfg("+sweep=smoke", override, "~tasks.gsm8k", "~tasks.mmlu",
                      "run_dir=/tmp/unused")
    with pytest.raises(ConfigError, match=pattern):
        sweep_mod.run_sweep(cfg)


@pytest.mark.parametrize(
    "override, line",
    [
        ("kvs.nvfp4.scale_policy=sometimes",
         "kvs.nvfp4.scale_policy='sometimes' is not allowed; use one of dynamic, prefill, static, checkpoint, "
         "first_batch, unit."),
        ("kvs.nvfp4.read_mode=sometimes", "kvs.nvfp4.read_mode='sometimes' is not allowed; use one of serving, "
                                          "quantized, raw_fresh."),
        ("model.dtype=float13", "model.dtype='float13' is not allowed; use one of bfloat16, bf16, float16, fp16, "
                                "float32, fp32."),
        ("loglikelihood_mode=x", "loglikelihood_mode='x' is not allowed; use one of decode_faithful, all_quantized, "
                                 "raw_prefill."),
        ("tasks.mmlu.num_fewshot=abc", "tasks.mmlu.num_fewshot='abc' must be an integer; fix the value."),
        ("tasks.passkey.colour=red", "tasks.passkey.colour: no such key; valid keys: kind, name, context_lengths, "),
        ("kvs.nvfp4.residual_len=64", "kvs.nvfp4.residual_len: no such key; valid keys: k_format, v_format, "),
    ],
)
def test_bad_values_are_refused_when_hydra_composes(override, line):
    """The schemas make composition itself refuse a wrong type, a value outside a closed choice and
    an unknown key; describe_error turns that into the one line the CLI prints."""
    from nvfp4kv.config.check import describe_error

    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("+sweep=smoke", override)
    assert describe_error(info.value).startswith(line)
    assert "\n" not in describe_error(info.value)


def test_local_model_needs_a_path():
    cfg = compose_cfg("+sweep=smoke", "model=local")
    with pytest.raises(ConfigError, match=r"model\.name_or_path=/path/to/hf_dir"):
        sweep_mod.plan_sweep(cfg)


def test_run_dirs_do_not_collide_but_are_stable_within_a_run():
    first, second = compose_cfg("+sweep=smoke"), compose_cfg("+sweep=smoke")
    # every attribute access re-resolves the interpolation; the uid resolver is cached per config,
    # so a run sees one dir (an uncached resolver gives a new random suffix on each access)
    once, again = first.run_dir, first.run_dir
    assert once == again == f"results/runs/smoke/{first.run_id}"
    assert first.run_dir != second.run_dir  # same second, different random suffix
    assert first.run_dir.startswith("results/runs/smoke/")
    resolved = sweep_mod.resolve_config(first)
    assert resolved["run_dir"] == first.run_dir and resolved["run_dir"].endswith(resolved["run_id"])


def test_slurm_launcher_config_composes_when_the_plugin_is_installed():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install hydra-submitit-launcher")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=["+sweep=smoke", "hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
