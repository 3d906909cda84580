"""F11 (issue 10): every refusal a user can meet names the problem *and* the fix.

Each case triggers one user-facing error and checks that its message says what to do: a fix
phrase (set/use/give/drop/pick/resume/...) and the key or value to change. A message that only
names the problem (what the old messages of these cases did) fails here.
"""

from __future__ import annotations

import re

import pytest

from nvfp4kv.cache import KVCacheConfig
from nvfp4kv.errors import NVFP4KVError

#: words with which our messages tell the user what to do
FIX_WORDS = re.compile(r"\b(set|use|give|drop|pick|fix|pass|lower|point|recalibrate|calibrate|install|resume|"
                       r"start a new|delete|unset|add|move|keep)\b", re.IGNORECASE)


def _kv_values(*args, **kwargs):
    from nvfp4kv.config.kv import kv_values

    return kv_values(*args, **kwargs)


def _check_task(*args):
    from nvfp4kv.config.check import check_task

    return check_task(*args)


def _check_run_keys(config):
    from nvfp4kv.config.check import check_run_keys

    return check_run_keys(config)


def _message(call) -> str:
    with pytest.raises(NVFP4KVError) as info:
        call()
    return str(info.value)


CASES = {
    "unknown format": (lambda: KVCacheConfig(k_format="nvfp5"), "nvfp4"),
    "negative residual": (lambda: KVCacheConfig(residual_length=-1), "residual_length=0"),
    "non-bool dequant_cache": (lambda: KVCacheConfig(dequant_cache="yes"), "dequant_cache=true"),
    "format not a string": (lambda: KVCacheConfig(k_format=3), "k_format=<name>"),
    "options not a mapping": (lambda: KVCacheConfig(k_format="nvfp4", k_options=[1]), "k_options={}"),
    "skip_layers not a list": (lambda: KVCacheConfig(skip_layers="x"), "skip_layers=[0,1]"),
    "static without scales": (lambda: KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="static"),
                              "scale_policy=prefill"),
    "bad static entry": (lambda: KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="static",
                                               static_scales={0: "x"}), "static_scales={0: [0.01, 0.02]}"),
    "zero static scale": (lambda: KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="static",
                                                static_scales={0: [0.0, 1.0]}), "amax/(6*448)"),
    "unknown key": (lambda: KVCacheConfig.from_dict({"k_fromat": "nvfp4"}), "KVSchema"),
    "unknown format name": (lambda: _kv_values({"k_format": "nvfp5"}, where="kvs.x"), "kvs.x.k_format=<name>"),
    "scale policy outside its choices": (lambda: _kv_values({"scale_policy": "sometimes"}, where="kvs.x"),
                                         "use one of dynamic, prefill"),
    "inline task of a built-in kind": (lambda: _check_task("x", {"kind": "passkey", "trial": 2}), "Fix the key's"),
    "limit of zero": (lambda: _check_task("x", {"kind": "passkey", "limit": 0}), "set tasks.x.limit=<n>"),
    "batch size": (lambda: _check_run_keys({"batch_size": "many"}), "use an integer >= 1 or auto"),
    "not a mapping": (lambda: KVCacheConfig.from_dict(["nvfp4"]), "k_format"),
    "bad scale policy": (lambda: KVCacheConfig(scale_policy="sometimes"), "prefill"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_refusal_names_the_fix(name):
    call, fix = CASES[name]
    message = _message(call)
    assert FIX_WORDS.search(message), f"{name}: no fix in {message!r}"
    assert fix in message, f"{name}: the fix should mention {fix!r}: {message!r}"


def test_skip_layers_past_the_model_names_the_fix():
    from nvfp4kv.cache import make_cache
    from nvfp4kv.testing import tiny_llama

    model = tiny_llama()
    message = _message(lambda: make_cache(model, KVCacheConfig(k_format="nvfp4", v_format="nvfp4",
                                                               skip_layers=[99])))
    assert "Drop those indices from skip_layers" in message


def test_scales_for_another_model_name_the_fix():
    from nvfp4kv.cache import make_cache
    from nvfp4kv.testing import tiny_llama

    model = tiny_llama()
    cfg = KVCacheConfig(k_format="nvfp4", v_format="nvfp4", scale_policy="static",
                        static_scales={i: [0.01, 0.01] for i in range(40)})
    message = _message(lambda: make_cache(model, cfg))
    assert "belong to another model" in message and "Calibrate" in message
