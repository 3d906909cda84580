"""KVCacheConfig: validation with errors that name the fix, (de)serialization, labels."""

from __future__ import annotations

import json
import sys

import pytest

from nvfp4kv.cache import KVCacheConfig, QuantizedKVCache, make_cache
from nvfp4kv.errors import BackendUnavailableError, BlockSizeError, ConfigError, UnknownFormatError
from nvfp4kv.testing import tiny_llama


def test_defaults_are_nvfp4_prefill_serving():
    cfg = KVCacheConfig()
    assert (cfg.k_format, cfg.v_format, cfg.scale_policy, cfg.read_mode) == ("nvfp4", "nvfp4", "prefill", "serving")
    assert cfg.label == "nvfp4"


def test_kivi_formats_default_to_channel_keys_and_token_values():
    cfg = KVCacheConfig(k_format="int4", v_format="int4")
    assert cfg.k_options == {"axis": "channel"} and cfg.v_options == {"axis": "token"}
    assert cfg.build_format("k").token_group > 1 and cfg.build_format("v").token_group == 1
    assert cfg.label == "int4"
    cfg = KVCacheConfig(k_format="int2", v_format="int2", k_options={"group_size": 64})
    assert cfg.k_options == {"axis": "channel", "group_size": 64}
    assert cfg.label == "k-int2(group_size=64)/v-int2"


@pytest.mark.parametrize(
    "kwargs,label",
    [
        ({"k_format": "fp8_e4m3", "v_format": "nvfp4"}, "k-fp8_e4m3/v-nvfp4"),
        ({"residual_length": 128}, "nvfp4+res128"),
        ({"sink_tokens": 4, "scale_policy": "dynamic", "read_mode": "quantized"}, "nvfp4+dynamic+sink4+quantized"),
        ({"skip_layers": [1, 0]}, "nvfp4+skip0,1"),
        ({"k_format": "fp8_e4m3", "v_format": "fp8_e4m3", "k_options": {"scaling": "head"},
          "v_options": {"scaling": "head"}}, "fp8_e4m3(scaling=head)"),
        ({"dequant_cache": True}, "nvfp4"),  # changes no stored bit
    ],
)
def test_labels(kwargs, label):
    assert KVCacheConfig(**kwargs).label == label


def test_dict_round_trip_through_json():
    cfg = KVCacheConfig(k_format="fp8_e4m3", v_format="int4", scale_policy="static",
                        static_scales={0: (0.1, 0.2), 3: (1.0, 2.0)}, skip_layers=(2,), residual_length=16)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["skip_layers"] == [2] and data["static_scales"] == {"0": [0.1, 0.2], "3": [1.0, 2.0]}
    assert KVCacheConfig.from_dict(data) == cfg
    assert KVCacheConfig.from_dict(KVCacheConfig().to_dict()) == KVCacheConfig()


def test_from_dict_accepts_a_hydra_dictconfig():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf

    cfg = KVCacheConfig.from_dict(OmegaConf.create({"k_format": "bf16", "v_format": "bf16", "skip_layers": [0]}))
    assert cfg.skip_layers == (0,) and cfg.k_format == "bf16"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k_format": "nvfp5"}, UnknownFormatError, "Known formats: .*nvfp4"),
        ({"v_format": "fp8_e4m3", "v_options": {"scaling": "row"}}, ConfigError, "v_options"),
        ({"k_options": {"no_such_option": 1}}, ConfigError, "k_options"),
        ({"scale_policy": "calibrated"}, ConfigError, "dynamic, prefill, static"),
        ({"read_mode": "fake"}, ConfigError, "serving, quantized, raw_fresh"),
        ({"nonfinite": "ignore"}, ConfigError, "raise, map, keep"),
        ({"backend": "cuda"}, ConfigError, "torch, triton"),
        ({"residual_length": -1}, ConfigError, "residual_length"),
        ({"sink_tokens": 1.5}, ConfigError, "sink_tokens"),
        ({"skip_layers": [-1]}, ConfigError, "0-based"),
        ({"skip_layers": ["a"]}, ConfigError, "layer indices"),
        ({"scale_policy": "static"}, ConfigError, "needs static_scales"),
        ({"scale_policy": "static", "static_scales": {0: (0.1,)}}, ConfigError, r"\(k_scale, v_scale\)"),
        ({"scale_policy": "static", "static_scales": {0: (0.1, -1.0)}}, ConfigError, "> 0"),
        ({"static_scales": {0: (0.1, 0.1)}}, ConfigError, "scale_policy='static'"),
        ({"scale_convention": "inverse"}, ConfigError, "flashinfer_encode"),
        ({"k_format": "fp8_e4m3", "scale_policy": "static", "static_scales": {0: (1.0, 1.0)},
          "scale_convention": "trtllm_xqa"}, ConfigError, "NVFP4 convention"),
        ({"dequant_cache": "yes"}, ConfigError, "dequant_cache"),
    ],
)
def test_bad_configs_fail_early_with_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        KVCacheConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="valid keys"):
        KVCacheConfig.from_dict({"k_fmt": "nvfp4"})


def test_non_torch_backend_is_looked_up_lazily_in_nvfp4kv_kernels(monkeypatch):
    import types

    import torch

    from nvfp4kv.cache import TorchCodec

    cfg = KVCacheConfig(backend="triton")  # accepted as config; resolved only when a cache is built
    monkeypatch.setitem(sys.modules, "nvfp4kv.kernels", types.ModuleType("nvfp4kv.kernels"))
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        QuantizedKVCache(cfg)

    calls = []

    class CountingCodec(TorchCodec):
        def quantize(self, fmt, x, global_scale):
            calls.append(fmt.name)
            return super().quantize(fmt, x, global_scale)

    kernels = types.ModuleType("nvfp4kv.kernels")
    kernels.get_backend = lambda name: CountingCodec() if name == "triton" else None
    monkeypatch.setitem(sys.modules, "nvfp4kv.kernels", kernels)
    cache = QuantizedKVCache(cfg)
    cache.update(torch.zeros(1, 1, 2, 32), torch.zeros(1, 1, 2, 32), 0)
    assert calls == ["nvfp4", "nvfp4"]
    kernels.get_backend = lambda name: object()
    with pytest.raises(BackendUnavailableError, match="lacks quantize"):
        QuantizedKVCache(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_make_cache_checks_the_config_against_the_model(model):
    with pytest.raises(ConfigError, match="past the model's 2 layers"):
        make_cache(model, KVCacheConfig(skip_layers=(5,)))
    with pytest.raises(ConfigError, match="no entry for layer 1"):
        make_cache(model, KVCacheConfig(scale_policy="static", static_scales={0: (0.1, 0.1)}))
    # a skipped layer needs no static scale; a scale-free format needs none at all
    make_cache(model, KVCacheConfig(scale_policy="static", static_scales={0: (0.1, 0.1)}, skip_layers=(1,)))
    make_cache(model, KVCacheConfig(k_format="mxfp4", v_format="mxfp4", scale_policy="static",
                                    static_scales={0: (0.1, 0.1)}))


def test_make_cache_rejects_a_block_that_does_not_divide_head_dim():
    odd = tiny_llama(head_dim=24)
    with pytest.raises(BlockSizeError, match="head_dim is 24.*skip_layers"):
        make_cache(odd, KVCacheConfig(k_format="mxfp4", v_format="mxfp4"))
    make_cache(odd, KVCacheConfig(k_format="fp8_e4m3", v_format="fp8_e4m3"))


def test_make_cache_accepts_a_dict_and_none(model):
    assert make_cache(model, {"k_format": "bf16", "v_format": "bf16"}).kv_config.label == "bf16"
    assert make_cache(model).kv_config == KVCacheConfig()
