"""Typed configuration (nvfp4kv/config): the Hydra schemas track the code they configure, the closed
choices have one source, a bad override fails in about a second as one line before torch or lm-eval
load, and the one KV parser accepts every form of a KV setting."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nvfp4kv.config  # noqa: F401  (registers the schemas)
from nvfp4kv.config import choices, schema
from nvfp4kv.config.check import check_config, check_task, resolve_config
from nvfp4kv.config.kv import kv_values
from nvfp4kv.errors import ConfigError, NVFP4KVError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose_cfg(*overrides: str, config_name: str = "config"):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=config_name, overrides=list(overrides))


# ---------------------------------------------------------------------------- one source of choices
def test_builtin_format_names_equal_the_registry():
    from nvfp4kv.formats.base import available_formats

    assert list(choices.BUILTIN_FORMATS) == available_formats()


def test_closed_choices_have_one_source():
    from nvfp4kv.cache import config as cache_config
    from nvfp4kv.eval import lm
    from nvfp4kv.eval.api import task_kinds
    from nvfp4kv.eval.plan import TASK_KIND_MODULES
    from nvfp4kv.formats import base
    from nvfp4kv.models import _DTYPES

    assert cache_config.SCALE_POLICIES is choices.SCALE_POLICIES
    assert cache_config.READ_MODES is choices.READ_MODES and cache_config.BACKENDS is choices.BACKENDS
    assert cache_config.NONFINITE_POLICIES is choices.NONFINITE_POLICIES
    # copies in modules that cannot import nvfp4kv.config (formats) or belong to others (lm, models)
    assert base.NONFINITE_POLICIES == choices.NONFINITE_POLICIES and base.NONFINITE_ALIASES == choices.NONFINITE_ALIASES
    assert lm.LOGLIKELIHOOD_MODES == choices.LOGLIKELIHOOD_MODES
    assert set(_DTYPES) == set(choices.MODEL_DTYPES)
    assert set(TASK_KIND_MODULES) == set(choices.BUILTIN_TASK_KINDS) == set(schema.TASK_SCHEMAS)
    assert set(task_kinds()) >= {"lm_eval", "passkey"}


def test_enums_are_the_choices():
    for enum, values in [(choices.ScalePolicyChoice, choices.SCALE_POLICIES), (choices.ReadModeChoice, choices.READ_MODES),
                         (choices.BackendChoice, choices.BACKENDS),
                         (choices.LoglikelihoodModeChoice, choices.LOGLIKELIHOOD_MODES),
                         (choices.ModelDtypeChoice, choices.MODEL_DTYPES)]:
        assert tuple(m.value for m in enum) == values and all(m.name == m.value for m in enum)
    assert [m.value for m in choices.NonFiniteChoice] == ["raise", "map", "keep", "error"]  # error: deprecated alias
    member = choices.ScalePolicyChoice["first_batch"]
    assert member == "first_batch" and f"{member}" == str(member) == "first_batch" and json.dumps(member) == '"first_batch"'


# ---------------------------------------------------------------------------- schemas track the code
def test_schemas_have_the_fields_of_what_they_configure():
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.eval.lmeval_config import LmEvalTaskConfig
    from nvfp4kv.eval.passkey import PasskeyConfig
    from nvfp4kv.eval.ruler import RulerConfig
    from nvfp4kv.metrics.task import FidelitySettings
    from nvfp4kv.models import ModelSpec

    def names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    assert names(schema.KVSchema) == names(KVCacheConfig)
    assert names(schema.ModelSchema) == names(ModelSpec)
    for kind, family in [("lm_eval", LmEvalTaskConfig), ("passkey", PasskeyConfig), ("ruler", RulerConfig),
                         ("fidelity", FidelitySettings)]:
        keys = schema.task_family_keys(kind)
        assert set(keys) == {"kind", "name", *names(family)}, kind
        assert set(names(schema.TASK_SCHEMAS[kind])) == {*keys, *schema.RUNNER_TASK_KEYS}, kind


def test_model_schema_defaults_are_model_spec_defaults():
    from nvfp4kv.models import ModelSpec

    defaults = OmegaConf.to_container(OmegaConf.structured(schema.ModelSchema), enum_to_str=True)
    spec = dataclasses.asdict(ModelSpec())
    assert OmegaConf.is_missing(OmegaConf.structured(schema.ModelSchema), "name_or_path")  # a model file names one
    assert defaults["device"] == "${device}" and spec["device"] == "auto"  # the run's device
    assert {k: v for k, v in defaults.items() if k not in ("name_or_path", "device")} == \
        {k: v for k, v in spec.items() if k not in ("name_or_path", "device")}


def test_yaml_files_hold_values_only():
    """No config file restates a schema default (the schemas hold them); the kv files name their schema."""
    import yaml

    kv_defaults = OmegaConf.to_container(OmegaConf.structured(schema.KVSchema), enum_to_str=True)
    for path in sorted((CONFIG_DIR / "kv").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert data["defaults"][0] == "_schema", path.name
        restated = {k for k, v in data.items() if k != "defaults" and kv_defaults.get(k) == v}
        assert not restated, f"{path.name} restates defaults {restated}"
    model_defaults = OmegaConf.to_container(OmegaConf.structured(schema.ModelSchema), enum_to_str=True)
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert not {k for k, v in data.items() if k != "name_or_path" and model_defaults.get(k) == v}, path.name
    for path in sorted((CONFIG_DIR / "task").glob("*.yaml")):
        assert "kind" not in yaml.safe_load(path.read_text()), f"{path.name}: the schema in its defaults sets kind"


def test_composed_nodes_are_typed():
    cfg = compose_cfg("+sweep=smoke", "+tasks.x={kind:passkey,trials:2}", "+kv@kvs.mxfp4=mxfp4")
    assert OmegaConf.get_type(cfg) is schema.RunConfig and OmegaConf.get_type(cfg.model) is schema.ModelSchema
    assert OmegaConf.get_type(cfg.kvs.nvfp4) is OmegaConf.get_type(cfg.kvs.mxfp4) is schema.KVSchema
    assert OmegaConf.get_type(cfg.tasks.mmlu) is schema.LmEvalTaskSchema
    assert OmegaConf.get_type(cfg.tasks.passkey) is schema.PasskeyTaskSchema
    assert OmegaConf.get_type(cfg.tasks.fidelity) is schema.FidelityTaskSchema
    assert OmegaConf.get_type(cfg.tasks.x) is dict  # inline: checked against its kind's schema after composition
    assert OmegaConf.get_type(compose_cfg("+sweep=ruler").tasks.ruler) is schema.RulerTaskSchema
    assert cfg.batch_size == 1 and cfg.engine.name == "none"  # the research profile: KV configs as written


# ---------------------------------------------------------------------------- resolve and check
def test_resolved_tasks_hold_only_the_keys_their_config_sets():
    """Unset task fields are dropped, so a task's recorded config (and its cells' identity) is what
    the YAML and the overrides say, as before the schemas; closed choices are plain strings."""
    config = resolve_config(compose_cfg("+sweep=smoke", "run_dir=/tmp/unused", "tasks.gsm8k.num_fewshot=8"))
    assert config["tasks"]["gsm8k"] == {"kind": "lm_eval", "name": "gsm8k", "lm_eval_task": "gsm8k", "num_fewshot": 8,
                                        "gen_kwargs": {"max_gen_toks": 16}, "data_dir": config["data_dir"], "limit": 4}
    assert config["tasks"]["passkey"] == {"kind": "passkey", "name": "passkey", "context_lengths": [512, 1024],
                                          "depths": [0.25, 0.75], "trials": 1, "limit": None}
    assert type(config["tasks"]["mmlu"]["loglikelihood_mode"]) is str and type(config["model"]["dtype"]) is str
    assert type(config["kvs"]["nvfp4"]["scale_policy"]) is str
    check_config(config)


def test_a_config_made_plain_by_omegaconf_loses_its_unset_task_fields():
    """OmegaConf.to_container(cfg) writes an unset (MISSING) field as "???"; a plain config that comes
    from it resolves like the DictConfig itself."""
    cfg = compose_cfg("+sweep=smoke", "run_dir=/tmp/unused")
    from_plain = resolve_config(OmegaConf.to_container(cfg, resolve=True))
    assert from_plain["tasks"] == resolve_config(cfg)["tasks"]
    assert "module" not in from_plain["tasks"]["passkey"]


def test_an_unknown_task_kind_stays_an_open_mapping():
    check_task("x", {"kind": "my_kind", "anything": [1, 2], "limit": 3})
    with pytest.raises(ConfigError, match=r"tasks\.x: Unknown key\(s\) \['anything'\] in passkey task config"):
        check_task("x", {"kind": "passkey", "anything": [1, 2]})


def test_scalars_still_count_as_one_element_lists():
    """Hydra overrides such as tasks.ruler.lengths=4096 keep working (the families take a scalar)."""
    config = resolve_config(compose_cfg("+sweep=ruler", "tasks.ruler.lengths=4096", "run_dir=/tmp/unused"))
    assert config["tasks"]["ruler"]["lengths"] == 4096
    check_config(config)


def test_existing_override_paths_still_compose():
    cfg = compose_cfg("+sweep=smoke", "kvs.nvfp4.residual_length=64", "+kv@kvs.mxfp4=mxfp4", "~kvs.fp8",
                      "+tasks.x={kind:passkey,trials:2}", "tasks.gsm8k.num_fewshot=8", "model=local",
                      "model.name_or_path=/models/x", "shard=1", "num_shards=2", "kvs.nvfp4.skip_layers=3",
                      "kvs.nvfp4.static_scales={0: [0.1, 0.2]}", "kvs.nvfp4.scale_policy=static", "batch_size=auto",
                      "tasks.gsm8k.gen_kwargs={max_gen_toks: 8}", "kvs.bf16.scale_policy=first_batch",
                      "kvs.bf16.first_batch_divisors=[200,100]",
                      "run_dir=/tmp/unused")
    config = resolve_config(cfg)
    check_config(config)
    assert list(config["kvs"]) == ["bf16", "nvfp4", "mxfp4"] and config["kvs"]["nvfp4"]["residual_length"] == 64
    assert config["kvs"]["nvfp4"]["static_scales"] == {0: [0.1, 0.2]} and config["tasks"]["gsm8k"]["gen_kwargs"] == {"max_gen_toks": 8}
    assert config["tasks"]["x"] == {"kind": "passkey", "trials": 2} and config["model"]["name_or_path"] == "/models/x"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        hydra_cfg = compose(config_name="config", overrides=["+sweep=smoke", "hydra/launcher=submitit_local"],
                            return_hydra_config=True)
    assert hydra_cfg.hydra.launcher._target_.endswith("LocalLauncher")


def test_calibrate_config_is_typed():
    cfg = compose_cfg("n_samples=4", "max_length=64", "output=/tmp/x.json", config_name="calibrate")
    assert OmegaConf.get_type(cfg) is schema.CalibrateConfig and OmegaConf.get_type(cfg.kv) is schema.KVSchema
    assert cfg.kv.k_format == "nvfp4" and cfg.n_samples == 4 and cfg.model.name_or_path.startswith("embedded:")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("n_samples=many", config_name="calibrate")


# ---------------------------------------------------------------------------- the one KV parser
def test_kv_values_gives_what_parse_kv_gives():
    """kv_values parses the compact strings of nvfp4kv.eval.lm.parse_kv the same way (parse_kv can call it)."""
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.eval.lm import parse_kv

    for text in ("nvfp4", "k=fp8_e4m3,v=nvfp4", "k=fp8_e4m3;v=nvfp4", "nvfp4;read_mode=quantized;residual_length=16",
                 "int4;skip_layers=0"):
        assert KVCacheConfig(**kv_values(text)) == parse_kv(text), text
    assert KVCacheConfig(**kv_values(None)) == parse_kv(None)
    mapping = {"k_format": "fp8_e4m3", "v_format": "nvfp4", "sink_tokens": 4}
    assert kv_values(mapping) == mapping and KVCacheConfig.from_dict(mapping) == parse_kv(mapping)
    for bad in ("k=nvfp4", "nvfp4;colour=red", "nvfp4;read_mode=sometimes", "nvfp5"):
        with pytest.raises(NVFP4KVError):
            parse_kv(bad)
        with pytest.raises(ConfigError):
            kv_values(bad)


def test_kv_values_returns_the_given_keys_with_plain_values():
    node = compose_cfg("+sweep=smoke").kvs.nvfp4
    values = kv_values(node, where="kvs.nvfp4")
    assert list(values) == [f.name for f in dataclasses.fields(schema.KVSchema)]
    assert all(type(v) is str for k, v in values.items() if k in ("scale_policy", "read_mode", "nonfinite", "backend"))
    with pytest.raises(ConfigError, match=r"kvs\.y\.residual_length='many' must be an integer"):
        kv_values({"residual_length": "many"}, where="kvs.y")


CUSTOM_FORMAT = '''
from dataclasses import dataclass, field
from nvfp4kv.formats.base import register_format
from nvfp4kv.formats.bf16 import BF16Format

@register_format("my_bf16")
@dataclass(frozen=True)
class MyBF16(BF16Format):
    name: str = field(default="my_bf16", init=False)
'''


def test_a_format_of_your_own_passes_through_nvfp4kv_format_modules(tmp_path):
    """A registered custom format is known to the parser; from the command line, $NVFP4KV_FORMAT_MODULES
    names the module that registers it (imported by the planner before the KV configs are built)."""
    (tmp_path / "my_formats.py").write_text(CUSTOM_FORMAT)
    code = textwrap.dedent("""
        import sys
        from nvfp4kv.config.kv import kv_values
        from nvfp4kv.errors import ConfigError, NVFP4KVError
        try:
            kv_values({"k_format": "my_bf16"})
            raise SystemExit("an unregistered name passed without NVFP4KV_FORMAT_MODULES")
        except ConfigError:
            pass
        import os
        os.environ["NVFP4KV_FORMAT_MODULES"] = "my_formats"
        kv_values({"k_format": "my_bf16"})  # let through to the registry check
        from nvfp4kv.eval.plan import _kv_configs
        kv = _kv_configs({"mine": {"k_format": "my_bf16", "v_format": "bf16"}})[0]["mine"]
        assert kv.k_format == "my_bf16", kv
        del os.environ["NVFP4KV_FORMAT_MODULES"]
        from nvfp4kv.config.choices import known_formats
        assert "my_bf16" in known_formats()  # registered in this process: known without the variable
        kv_values({"k_format": "my_bf16"})
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------- the CLI's failing path
PROBE = textwrap.dedent("""
    import json, runpy, sys, time
    start = time.perf_counter()
    sys.argv = ["experiments/run.py", *sys.argv[1:]]
    try:
        runpy.run_module("experiments.run", run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "torch": "torch" in sys.modules, "lm_eval": "lm_eval" in sys.modules,
                      "transformers": "transformers" in sys.modules}))
""")

BAD_OVERRIDES = {
    "kvs.nvfp4.scale_policy=sometimes": "error: kvs.nvfp4.scale_policy='sometimes' is not allowed; use one of "
                                        "dynamic, prefill, static, checkpoint, first_batch, unit.",
    "kvs.nvfp4.k_format=nvfp5": "error: kvs.nvfp4: Unknown KV format 'nvfp5' (kvs.nvfp4.k_format); use one of "
                                "bf16, fp4_mx_block16, fp8_e4m3, int2, int4, mxfp4, nvfp4",
    "model.dtype=float13": "error: model.dtype='float13' is not allowed; use one of bfloat16, bf16, float16, fp16, "
                           "float32, fp32.",
    "loglikelihood_mode=x": "error: loglikelihood_mode='x' is not allowed; use one of decode_faithful, all_quantized, "
                            "raw_prefill.",
    "tasks.mmlu.num_fewshot=abc": "error: tasks.mmlu.num_fewshot='abc' must be an integer",
    "limit=0": "error: limit=0: a limit is a number of documents >= 1",
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_a_bad_override_fails_as_one_line_before_torch_or_lm_eval_load(override, tmp_path):
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, "+sweep=smoke", override, f"run_dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["code"] == 2, out.stderr
    assert not report["torch"] and not report["lm_eval"] and not report["transformers"], report
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(BAD_OVERRIDES[override]), out.stderr
    assert not (tmp_path / "run").exists(), "a refused run leaves no directory"
    assert wall < 30, f"{wall:.1f} s (about 1 s on an idle machine; generous for a loaded CI box)"


def test_a_good_config_still_reaches_the_runner(tmp_path):
    """The lazy import: the same probe with a valid config gets past the checks and imports torch."""
    out = subprocess.run([sys.executable, "-c", PROBE, "+sweep=smoke", "~tasks.gsm8k", "~tasks.mmlu",
                          "~tasks.fidelity", "tasks.passkey.kind=nope", f"run_dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["code"] == 2 and report["torch"], (report, out.stderr[-2000:])
    assert "Unknown task kind 'nope'" in out.stderr
