"""Every closed choice of the configuration, in one torch-free place.

The Hydra schemas (:mod:`nvfp4kv.config.schema`) turn these tuples into Enums, so OmegaConf itself
refuses a bad value when the config is composed, naming the allowed ones; the code that acts on
a value (``nvfp4kv.cache.config.KVCacheConfig``, the lm-eval model, the model loader) imports the
same tuples. Modules that need torch keep their own copies only where they cannot import this one
(``nvfp4kv.formats`` imports nothing but ``nvfp4kv.errors``); tests check those copies against
these (``tests/test_config_schema.py``).

KV format names are open: users register formats of their own in Python (``@register_format``).
:data:`BUILTIN_FORMATS` lists the formats this package ships (a test checks it equals the
registry's :func:`~nvfp4kv.formats.base.available_formats`), and :func:`known_formats` adds the
names a user's code registers: every name already in the registry of this process (a Python
driver that registered its format before planning), and those of the modules named in
``$NVFP4KV_FORMAT_MODULES`` (comma-separated; imported before the KV configs are built, so a
command-line sweep can use them: ``NVFP4KV_FORMAT_MODULES=my_pkg.formats python -m experiments.run
... kvs.x.k_format=my_format``). The cheap config check cannot import those modules (they import
torch), so while ``$NVFP4KV_FORMAT_MODULES`` is set it lets unknown names through to the registry
check in ``nvfp4kv.eval.plan``, which names the registered formats.
"""

from __future__ import annotations

import importlib
import os
import sys
from enum import Enum
from typing import Literal, get_args

ScalePolicy = Literal["dynamic", "prefill", "static", "checkpoint", "first_batch", "unit"]
ReadMode = Literal["serving", "quantized", "raw_fresh"]
Backend = Literal["torch", "triton", "flashinfer", "auto"]
NonFinite = Literal["raise", "map", "keep"]
LoglikelihoodMode = Literal["decode_faithful", "all_quantized", "raw_prefill"]
LmEvalSampling = Literal["first", "seeded"]

#: ``KVCacheConfig.scale_policy``: where the global scale of NVFP4/FP8 comes from
SCALE_POLICIES: tuple[str, ...] = get_args(ScalePolicy)
#: ``KVCacheConfig.read_mode``: which attention reads see quantized K/V
READ_MODES: tuple[str, ...] = get_args(ReadMode)
#: ``KVCacheConfig.backend``: only "torch" lives in nvfp4kv.cache, the rest in nvfp4kv.kernels
BACKENDS: tuple[str, ...] = get_args(Backend)
#: ``KVCacheConfig.nonfinite`` (the NaN/Inf policy); ``nvfp4kv.formats.base.NONFINITE_POLICIES`` equals it
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinite)
#: old ``nonfinite`` spellings still accepted (with a DeprecationWarning), and what they mean now
NONFINITE_ALIASES: dict[str, str] = {"error": "raise"}
#: how multiple-choice tasks read the KV cache (``nvfp4kv.eval.lm`` explains each)
LOGLIKELIHOOD_MODES: tuple[str, ...] = get_args(LoglikelihoodMode)
#: ``sampling`` of an lm_eval task: which documents ``limit`` takes from each (sub)task: the first N
#: (lm-eval's own limit) or a sorted random draw of N seeded by (the run's seed, the subtask's name)
LM_EVAL_SAMPLINGS: tuple[str, ...] = get_args(LmEvalSampling)
#: ``model.dtype`` spellings ``nvfp4kv.models.resolve_dtype`` maps to a torch dtype
MODEL_DTYPES: tuple[str, ...] = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
#: the KV formats nvfp4kv.formats registers (sorted, as ``available_formats()`` returns them)
BUILTIN_FORMATS: tuple[str, ...] = ("bf16", "fp4_mx_block16", "fp8_e4m3", "int2", "int4", "mxfp4", "nvfp4")
#: the task kinds this package ships (users register more with ``nvfp4kv.eval.api.register_task_kind``)
BUILTIN_TASK_KINDS: tuple[str, ...] = ("lm_eval", "passkey", "ruler", "fidelity")

#: environment variable naming modules that register KV formats of their own (comma-separated)
FORMAT_MODULES_ENV = "NVFP4KV_FORMAT_MODULES"


def format_modules() -> list[str]:
    """The modules named in ``$NVFP4KV_FORMAT_MODULES``."""
    return [m.strip() for m in os.environ.get(FORMAT_MODULES_ENV, "").split(",") if m.strip()]


def import_format_modules() -> None:
    """Import the modules of ``$NVFP4KV_FORMAT_MODULES`` (each registers its formats on import)."""
    from nvfp4kv.errors import ConfigError

    for module in format_modules():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"{FORMAT_MODULES_ENV} names {module!r}, which could not be imported ({err}); "
                              f"fix the module path or unset {FORMAT_MODULES_ENV}.") from err


def known_formats() -> tuple[str, ...]:
    """Built-in format names plus every name in the registry of this process, if it is loaded.

    Never imports the registry (it imports torch): a format registered by code that has not run
    yet is not known here (see the module docstring for ``$NVFP4KV_FORMAT_MODULES``)."""
    names = set(BUILTIN_FORMATS)
    base = sys.modules.get("nvfp4kv.formats.base")
    if base is not None:
        names.update(base.available_formats())
    return tuple(sorted(names))


class Choice(str, Enum):
    """A closed config choice: an Enum OmegaConf validates (by member name, equal to the value),
    and a ``str`` everywhere else (``==``, ``in``, JSON, f-strings give the plain value)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def _choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


ScalePolicyChoice = _choice("ScalePolicyChoice", SCALE_POLICIES)
ReadModeChoice = _choice("ReadModeChoice", READ_MODES)
BackendChoice = _choice("BackendChoice", BACKENDS)
#: the deprecated alias stays accepted (KVCacheConfig warns and maps it)
NonFiniteChoice = _choice("NonFiniteChoice", NONFINITE_POLICIES + tuple(NONFINITE_ALIASES))
LoglikelihoodModeChoice = _choice("LoglikelihoodModeChoice", LOGLIKELIHOOD_MODES)
LmEvalSamplingChoice = _choice("LmEvalSamplingChoice", LM_EVAL_SAMPLINGS)
ModelDtypeChoice = _choice("ModelDtypeChoice", MODEL_DTYPES)
