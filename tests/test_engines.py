"""Engine read profiles (nvfp4kv.engines, configs/engine/, docs/engines.md): every profile loads,
overrides land in the KV fields, unsupported formats and bad values are refused with a message that
names the key and the fix, and the doc states every profile's values exactly as the YAML does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nvfp4kv.config  # noqa: F401  (registers the schemas configs/ composes against)

from nvfp4kv.engines import (
    ENGINE_CONFIG_DIR,
    FIELD_NAMES,
    KNOWN_FORMATS,
    EngineProfile,
    apply_engine,
    available_engines,
    load_engine_profile,
)
from nvfp4kv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "engines.md"
PROFILES = sorted(p.stem for p in ENGINE_CONFIG_DIR.glob("*.yaml"))
NVFP4 = {"k_format": "nvfp4", "v_format": "nvfp4", "scale_policy": "prefill", "read_mode": "serving",
         "residual_length": 64}


def test_expected_profiles_exist():
    assert {"vllm_v1", "sglang", "trtllm", "hf", "none"} <= set(PROFILES) == set(available_engines())


@pytest.mark.parametrize("name", PROFILES)
def test_every_yaml_loads_with_exactly_the_fields(name):
    raw = yaml.safe_load((ENGINE_CONFIG_DIR / f"{name}.yaml").read_text())
    assert list(raw) == list(FIELD_NAMES), "fields exactly, in the dataclass order"
    profile = load_engine_profile(name)
    assert isinstance(profile, EngineProfile) and profile.name == name
    assert load_engine_profile(profile.to_dict()) == profile  # round trip
    assert load_engine_profile(profile) is profile


def test_profiles_compose_as_a_hydra_group():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="config", overrides=["engine=vllm_v1", "engine.read_mode=serving"])
    profile = load_engine_profile(cfg.engine)  # a DictConfig
    assert profile.name == "vllm_v1" and profile.read_mode == "serving"


def test_known_formats_match_the_registry():
    from nvfp4kv.formats.base import available_formats
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.engines import DEFAULT_KV_FORMAT

    assert set(KNOWN_FORMATS) == set(available_formats())
    assert KVCacheConfig().k_format == KVCacheConfig().v_format == DEFAULT_KV_FORMAT


def test_module_is_torch_free():
    code = "import sys, nvfp4kv.engines as e; e.apply_engine('vllm_v1', {}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_none_keeps_the_kv_config_as_written():
    fields = {**NVFP4, "k_format": "fp8_e4m3", "v_format": "nvfp4", "sink_tokens": 4}
    out, notes = apply_engine("none", fields)
    assert out == fields and notes == []
    assert out is not fields


def test_vllm_overrides_and_notes():
    fields = dict(NVFP4)
    out, notes = apply_engine("vllm_v1", fields)
    assert out["scale_policy"] == "checkpoint"
    assert out["read_mode"] == "quantized"
    assert out["residual_length"] == 0
    assert out["k_format"] == out["v_format"] == "nvfp4"
    assert fields == NVFP4, "the input dict is not modified"
    assert any(n.startswith("Q quantization not emulated") for n in notes)
    # bf16 is stored unquantized: the engine quantizes no Q, nothing to note
    _, bf16_notes = apply_engine("vllm_v1", {"k_format": "bf16", "v_format": "bf16"})
    assert bf16_notes == []


def test_null_fields_keep_the_kv_config_values():
    out, notes = apply_engine({"name": "custom", "residual_length": 16}, NVFP4)
    assert out == {**NVFP4, "residual_length": 16} and notes == []


def test_hf_profile_sets_window_and_raw_reads():
    out, notes = apply_engine("hf", {"k_format": "int4", "v_format": "int4", "read_mode": "serving"})
    assert out["residual_length"] == 128 and out["read_mode"] == "raw_fresh"
    assert "scale_policy" not in out  # null: not imposed
    assert any("re-quantiz" in n for n in notes)


def test_static_scales_dropped_when_the_engine_has_another_policy():
    fields = {**NVFP4, "scale_policy": "static", "static_scales": {0: [0.01, 0.02]}}
    out, notes = apply_engine("sglang", fields)
    assert out["scale_policy"] == "checkpoint" and out["static_scales"] is None
    assert any("static_scales dropped" in n for n in notes)
    out, _ = apply_engine({"name": "calibrated", "scale_policy": "static"}, fields)
    assert out["static_scales"] == {0: [0.01, 0.02]}


def test_first_batch_note_gives_the_divisors():
    out, notes = apply_engine({**load_engine_profile("vllm_v1").to_dict(), "scale_policy": "first_batch"},
                              {"k_format": "fp8_e4m3", "v_format": "fp8_e4m3"})
    assert out["scale_policy"] == "first_batch"
    assert any("amax(K)/200" in n and "amax(V)/100" in n for n in notes)


def test_engine_specific_notes():
    _, notes = apply_engine("trtllm", {"k_format": "fp8_e4m3", "v_format": "fp8_e4m3"})
    assert any("scale_policy=unit" in n for n in notes)
    _, notes = apply_engine("sglang", {"k_format": "fp4_mx_block16", "v_format": "fp4_mx_block16", "sink_tokens": 2})
    assert any("sink_tokens=2 is harness-only" in n for n in notes)


@pytest.mark.parametrize(("engine", "fmt"), [("vllm_v1", "mxfp4"), ("vllm_v1", "fp4_mx_block16"), ("sglang", "mxfp4"),
                                             ("trtllm", "int4"), ("hf", "nvfp4")])
def test_unsupported_format_refused_with_the_message(engine, fmt):
    supported = ", ".join(load_engine_profile(engine).supported_formats)
    expected = (f"engine={engine} does not support KV format '{fmt}' (supported: {supported}); "
                f"drop that KV config or use engine=none")
    with pytest.raises(ConfigError) as err:
        apply_engine(engine, {"k_format": fmt, "v_format": fmt})
    assert str(err.value) == expected
    with pytest.raises(ConfigError, match=re.escape(f"KV format '{fmt}'")):
        apply_engine(engine, {"k_format": "bf16", "v_format": fmt})


def test_mixed_k_and_v_formats_refused_by_engines():
    with pytest.raises(ConfigError, match=r"engine=vllm_v1 stores K and V in one KV cache dtype.*use engine=none"):
        apply_engine("vllm_v1", {"k_format": "fp8_e4m3", "v_format": "nvfp4"})


def test_default_kv_format_is_checked():
    with pytest.raises(ConfigError, match="KV format 'nvfp4'"):
        apply_engine("hf", {})  # KVCacheConfig's default formats are nvfp4


@pytest.mark.parametrize(("override", "key", "fix"), [
    ({"scale_policy": "amax"}, "engine.scale_policy='amax'", "first_batch"),
    ({"read_mode": "prefill"}, "engine.read_mode='prefill'", "raw_fresh"),
    ({"quantize_query": "yes"}, "engine.quantize_query", "true or false"),
    ({"residual_length": -1}, "engine.residual_length", ">= 0"),
    ({"residual_length": True}, "engine.residual_length", ">= 0"),
    ({"supported_formats": ["nvfp5"]}, "engine.supported_formats", "nvfp4"),
    ({"supported_formats": "nvfp4"}, "engine.supported_formats", "non-empty list"),
    ({"supported_formats": []}, "engine.supported_formats", "non-empty list"),
    ({"first_batch_divisors": {"k": 200.0}}, "engine.first_batch_divisors", "{k: <float>, v: <float>}"),
    ({"first_batch_divisors": {"k": 0, "v": 100}}, "engine.first_batch_divisors.k", "> 0"),
    ({"first_batch_divisors": None, "scale_policy": "first_batch"}, "engine.first_batch_divisors is required",
     "{k: 200.0, v: 100.0}"),
    ({"name": ""}, "engine.name", "non-empty string"),
    ({"scaling_policy": "unit"}, "unknown engine profile keys ['scaling_policy']", "scale_policy"),
])
def test_bad_values_refused_naming_the_key(override, key, fix):
    data = {**load_engine_profile("vllm_v1").to_dict(), **override}
    with pytest.raises(ConfigError) as err:
        load_engine_profile(data)
    message = str(err.value)
    assert key in message and fix in message
    assert "\n" not in message


def test_unknown_engine_name_lists_the_profiles():
    with pytest.raises(ConfigError, match=r"engine='vllm' is not a known engine profile; use one of .*vllm_v1"):
        load_engine_profile("vllm")


# ------------------------------------------------------------------ docs/engines.md
def _render(value) -> str:
    """A YAML value as the doc writes it: null, true, [a, b], {k: 200.0, v: 100.0}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


def _doc_sections() -> dict[str, dict[str, str]]:
    """``{profile: {field: value cell}}`` from each ``## `name`...`` section's table."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `([a-z0-9_]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), {})
            continue
        if line.startswith("## "):
            current = None
            continue
        if current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            field = cells[0].strip("`")
            if field in FIELD_NAMES:
                current[field] = cells[1].strip("`")
    return sections


def test_doc_states_every_profile_and_field_as_the_yaml_does():
    sections = _doc_sections()
    assert set(sections) == set(PROFILES), "one section per profile, no section without a profile"
    for name in PROFILES:
        profile = load_engine_profile(name).to_dict()
        assert list(sections[name]) == list(FIELD_NAMES), f"docs/engines.md section {name}: one row per field"
        for field in FIELD_NAMES:
            if field == "description":
                assert sections[name][field], f"{name}: describe the profile"
                continue
            assert sections[name][field] == _render(profile[field]), f"docs/engines.md {name}.{field} != YAML"


def test_doc_lists_checkpoint_scale_names():
    text = DOC.read_text(encoding="utf-8")
    for name in ("self_attn\\.k_proj\\.k_scale", "_proj\\.output_scale", "kv_scale", "qk(qk)?v_proj",
                 "quantization-param-path"):
        assert name in text
