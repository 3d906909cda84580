"""Calibrated and engine-style scales: the scales file, its use by a KV config, and the
``unit``, ``first_batch`` and ``checkpoint`` policies (issue 11, items 1-2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.calibration import ScalesFile, load_scales_file, write_scales_file
from nvfp4kv.calibration.checkpoint import match_scale_name, read_checkpoint_scales
from nvfp4kv.calibration.collect import collect_kv_amax
from nvfp4kv.calibration.scales_file import LayerAmax
from nvfp4kv.calibration.texts import pack_windows
from nvfp4kv.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def forward(model, ids: list[int], cache) -> None:
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg_name(model): cache})


def stream_scales(cache) -> list[tuple[float, float]]:
    return [(float(layer.k_stream.scale.reshape(-1)[0]), float(layer.v_stream.scale.reshape(-1)[0]))
            for layer in cache.layers]


def scales_file(amax: dict[int, tuple[float, float]], layers: int = 2, heads: int = 2, head_dim: int = 32) -> ScalesFile:
    return ScalesFile(model="tiny", model_source={}, num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                      data={"dataset": "test"}, layers={i: LayerAmax(k, v) for i, (k, v) in amax.items()})


# ---------------------------------------------------------------------------- collection
def test_pack_windows_concatenates_and_drops_only_a_short_tail():
    assert pack_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert pack_windows([[1, 2, 3, 4, 5], [6, 7, 8, 9]], 8) == [[1, 2, 3, 4, 5, 6, 7, 8]]  # a 1-token tail < 8/4
    assert pack_windows([[1, 2]], 8) == [[1, 2]]  # keeps the one window if that is all there is


def test_collected_amax_is_the_max_of_the_cached_keys_and_values_over_windows(model):
    windows = [list(range(1, 40)), list(range(50, 120))]
    stats = collect_kv_amax(model, windows, progress=False)
    expected = {}
    for w in windows:  # independently: a DynamicCache forward per window
        cache = DynamicCache(config=model.config)
        forward(model, w, cache)
        for i, layer in enumerate(cache.layers):
            for name, t in (("k", layer.keys), ("v", layer.values)):
                per_head = t.abs().amax(dim=(0, 2, 3))
                key = (i, name)
                expected[key] = per_head if key not in expected else torch.maximum(expected[key], per_head)
    assert set(stats) == {0, 1}
    for (i, name), per_head in expected.items():
        torch.testing.assert_close(stats[i][name], per_head, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the scales file
def test_scales_file_round_trips_and_a_static_config_takes_each_formats_own_scale(tmp_path, model):
    path = write_scales_file(tmp_path / "s.json", scales_file({0: (5.376, 2.688), 1: (44.8, 0.448)}))
    assert load_scales_file(path).amax_pairs() == {0: (5.376, 2.688), 1: (44.8, 0.448)}
    doc = json.loads(path.read_text())
    assert doc["scales"]["nvfp4"]["0"] == pytest.approx([5.376 / 2688, 2.688 / 2688])
    nv = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="static", static_scales_file=str(path))
    assert nv.static_scales == {0: pytest.approx((5.376 / 2688, 2.688 / 2688)), 1: pytest.approx((44.8 / 2688, 0.448 / 2688))}
    mixed = KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="static", static_scales_file=str(path))
    assert mixed.static_scales[1] == pytest.approx((44.8 / 448, 0.448 / 2688))
    # the cache stores exactly those scales, and the config survives its own record
    cache = make_cache(model, mixed)
    forward(model, list(range(1, 20)), cache)
    assert stream_scales(cache) == [pytest.approx(p, rel=1e-6) for p in (mixed.static_scales[0], mixed.static_scales[1])]
    assert KVCacheConfig.from_dict(json.loads(json.dumps(mixed.to_dict()))) == mixed
    assert mixed.label == "k-fp8_e4m3/v-nvfp4+static"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p.unlink(), "python -m experiments.calibrate"),
    (lambda p: p.write_text("{not json"), "not readable JSON"),
    (lambda p: p.write_text(json.dumps({"version": 1})), "not an nvfp4kv scales file"),
    (lambda p: p.write_text(p.read_text().replace("5.376", "0.0")), "not a finite positive number"),
])
def test_a_bad_scales_file_is_refused_with_the_fix(tmp_path, mutate, message):
    path = write_scales_file(tmp_path / "s.json", scales_file({0: (5.376, 2.688), 1: (1.0, 1.0)}))
    mutate(path)
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig(scale_policy="static", static_scales_file=str(path))


def test_scales_of_another_model_are_refused_when_the_cache_is_built(tmp_path, model):
    for shape in ({"layers": 3}, {"heads": 4}, {"head_dim": 64}):
        amax = {i: (1.0, 1.0) for i in range(shape.get("layers", 2))}
        path = write_scales_file(tmp_path / "other.json", scales_file(amax, **shape))
        cfg = KVCacheConfig(scale_policy="static", static_scales_file=str(path))
        with pytest.raises(ConfigError, match="belong to another model"):
            make_cache(model, cfg)


def test_scale_sources_given_to_another_policy_are_refused(tmp_path):
    path = write_scales_file(tmp_path / "s.json", scales_file({0: (1.0, 1.0)}))
    for kwargs, name in ((dict(static_scales_file=str(path)), "static_scales_file"),
                         (dict(checkpoint_scales=str(tmp_path)), "checkpoint_scales"),
                         (dict(first_batch_divisors=[200, 100]), "first_batch_divisors")):
        with pytest.raises(ConfigError, match=f"{name} was given but scale_policy='prefill'"):
            KVCacheConfig(**kwargs)
    with pytest.raises(ConfigError, match="finite and > 0"):
        KVCacheConfig(scale_policy="first_batch", first_batch_divisors=[200, 0])


# ---------------------------------------------------------------------------- policies
def test_unit_policy_stores_with_scale_one(model):
    cache = make_cache(model, KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="unit"))
    forward(model, list(range(1, 20)), cache)
    assert stream_scales(cache) == [(1.0, 1.0), (1.0, 1.0)]


def test_first_batch_scales_are_frozen_by_the_first_forward_and_shared_through_the_store(model):
    cfg = KVCacheConfig(scale_policy="first_batch")
    store = FrozenScales()
    first = make_cache(model, cfg, store)
    forward(model, list(range(1, 30)), first)
    second = make_cache(model, cfg, store)
    forward(model, list(range(60, 120)), second)  # other tokens: their own amax differs
    own = make_cache(model, KVCacheConfig())  # prefill policy: per-request scale
    forward(model, list(range(60, 120)), own)
    assert stream_scales(second) == stream_scales(first)
    assert stream_scales(own) != stream_scales(first)
    alone = make_cache(model, cfg)  # without a shared store a cache freezes its own
    forward(model, list(range(60, 120)), alone)
    assert stream_scales(alone) == stream_scales(own)


def test_first_batch_divisors_reproduce_an_engines_constants(model):
    store = FrozenScales()
    cache = make_cache(model, KVCacheConfig(k_format="fp8_e4m3", v_format="fp8_e4m3", scale_policy="first_batch",
                                            first_batch_divisors=[200, 100]), store)
    reference = DynamicCache(config=model.config)
    ids = list(range(1, 30))
    forward(model, ids, cache)
    forward(model, ids, reference)
    for (k_scale, v_scale), layer in zip(stream_scales(cache), reference.layers):
        assert k_scale == pytest.approx(float(layer.keys.abs().max()) / 200, rel=1e-6)
        assert v_scale == pytest.approx(float(layer.values.abs().max()) / 100, rel=1e-6)


# ---------------------------------------------------------------------------- checkpoint scales
@pytest.mark.parametrize("name", ["model.layers.{i}.self_attn.k_proj.k_scale", "model.layers.{i}.self_attn.k_scale",
                                  "model.layers.{i}.self_attn.attn.k_scale", "model.layers.{i}.self_attn.k_proj.output_scale",
                                  "model.layers.{i}.self_attn.qkv_proj.k_scale", "model.language_model.layers.{i}.mixer.k_proj.k_scale",
                                  "model.layers.{i}.self_attn.k_cache.scale"])
def test_checkpoint_scale_names_engines_accept_are_recognized(name):
    assert match_scale_name(name.format(i=7)) == (7, "k")
    assert match_scale_name(name.format(i=7).replace("k_", "v_")) == (7, "v")
    assert match_scale_name("model.layers.7.self_attn.k_proj.weight") is None


def test_the_deprecated_single_kv_scale_serves_k_and_v(tmp_path):
    from safetensors.torch import save_file

    save_file({f"model.layers.{i}.self_attn.kv_scale": torch.tensor(0.5 + i) for i in range(2)},
              str(tmp_path / "m.safetensors"))
    assert read_checkpoint_scales(tmp_path) == {0: (0.5, 0.5), 1: (1.5, 1.5)}


def test_checkpoint_policy_reads_the_scales_a_checkpoint_carries(tmp_path, model):
    from safetensors.torch import save_file

    model.save_pretrained(tmp_path)
    scales = {f"model.layers.{i}.self_attn.{w}_proj.{w}_scale": torch.tensor(0.01 * (i + 1) * (2 if w == "v" else 1))
              for i in range(2) for w in "kv"}
    save_file(scales, str(tmp_path / "kv_scales.safetensors"))
    assert read_checkpoint_scales(tmp_path) == {0: pytest.approx((0.01, 0.02)), 1: pytest.approx((0.02, 0.04))}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # config._name_or_path is the checkpoint
    cache = make_cache(loaded, KVCacheConfig(k_format="fp8_e4m3", v_format="nvfp4", scale_policy="checkpoint"))
    forward(loaded, list(range(1, 20)), cache)
    assert stream_scales(cache) == [pytest.approx((0.01, 0.02)), pytest.approx((0.02, 0.04))]


def test_a_checkpoint_without_scales_is_refused_naming_the_fix(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="scale_policy=unit"):
        make_cache(loaded, KVCacheConfig(scale_policy="checkpoint"))
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        make_cache(loaded, KVCacheConfig(scale_policy="checkpoint", checkpoint_scales=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------- the CLI
def test_calibrate_cli_writes_a_scales_file_a_sweep_config_can_use(tmp_path):
    out = tmp_path / "scales.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.calibrate", "n_samples=4", "max_length=64",
                           "progress=false", f"output={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scales = load_scales_file(out)
    assert scales.num_layers == 30 and scales.data["dataset"] == "gsm8k" and scales.data["n_samples"] == 4
    assert "train" in scales.data["source"] and "test" not in scales.data["source"]
    assert scales.created_by["versions"]["torch"] and "use it: scale_policy=static" in proc.stdout
    cfg = KVCacheConfig(scale_policy="static", static_scales_file=str(out))
    assert len(cfg.static_scales) == 30
