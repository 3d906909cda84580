"""Engine read profiles: what vLLM, SGLang, TensorRT-LLM or HF transformers actually do with a
quantized KV cache, as overrides of our KV config fields.

Why: our KV configs are research knobs (per-prompt amax scales, raw prefill reads, residual
windows). A user who turns on ``--kv-cache-dtype fp8`` in a serving engine gets one fixed
combination of them, and the accuracy we report should be the accuracy that engine delivers.
An :class:`EngineProfile` fixes that combination: the scale policy, which attention reads see
quantized K/V, whether a recent window stays full precision, which formats the engine can store,
and whether it also quantizes Q (which we do not emulate). Every value, with the engine source
it was read from, is in ``docs/engines.md``; the values live in ``configs/engine/<name>.yaml``.

Torch-free on purpose (pure Python + yaml/omegaconf): a bad ``engine=`` override must fail while
the sweep is being planned, before torch or a model is loaded.

- :func:`load_engine_profile`: a profile from ``configs/engine/<name>.yaml`` or a mapping,
  each field validated with a one-line error naming the key, the allowed values and the fix.
- :func:`apply_engine`: a KV config's field dict with the engine's overrides applied, plus notes
  on what the harness cannot reproduce; refuses formats the engine cannot store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nvfp4kv.config.choices import BUILTIN_FORMATS, READ_MODES, SCALE_POLICIES
from nvfp4kv.errors import ConfigError

#: configs/engine/ beside the package (the Hydra config group ``engine``)
ENGINE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "engine"

#: the scale policies, read modes and built-in format names a profile may name: the one torch-free
#: list of closed choices (nvfp4kv/config/choices.py), which KVCacheConfig validates against too;
#: tests/test_engines.py checks the format names against the nvfp4kv.formats registry.
KNOWN_FORMATS: tuple[str, ...] = BUILTIN_FORMATS
#: KVCacheConfig's default k_format/v_format, used when a KV field dict does not name them
DEFAULT_KV_FORMAT = "nvfp4"
#: formats that store K/V unquantized: no Q quantization, no scale policy, nothing to note
UNQUANTIZED_FORMATS: frozenset[str] = frozenset({"bf16"})


@dataclass(frozen=True)
class EngineProfile:
    """What one serving engine does with a quantized KV cache (see docs/engines.md).

    A ``None`` (or ``False``) field imposes nothing: the KV config's own value is kept. That is
    the ``none`` profile, research mode, where KV configs run as written.

    - ``scale_policy``: how the engine gets K/V global scales (one of :data:`SCALE_POLICIES`).
    - ``first_batch_divisors``: ``{"k": d_k, "v": d_v}``, the divisors of ``scale_policy=first_batch``
      (``scale = amax(first forward) / d``, vLLM's ``K_SCALE_CONSTANT``/``V_SCALE_CONSTANT``);
      required with that policy, carried (and ignored) with any other so that
      ``engine.scale_policy=first_batch`` alone reproduces the engine's option.
    - ``read_mode``: which attention reads see quantized K/V (one of :data:`READ_MODES`).
    - ``quantize_query``: the engine also quantizes Q (to FP8) before attention. The harness does
      not emulate this; :func:`apply_engine` says so in its notes.
    - ``residual_length``: newest tokens the engine keeps in full precision (0 = none).
    - ``supported_formats``: our format names the engine can store K/V in (``None`` = any).
    """

    name: str
    description: str = ""
    scale_policy: str | None = None
    first_batch_divisors: dict[str, float] | None = None
    read_mode: str | None = None
    quantize_query: bool = False
    residual_length: int | None = None
    supported_formats: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict (lists, not tuples) that :func:`load_engine_profile` reads back."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.supported_formats is not None:
            out["supported_formats"] = list(self.supported_formats)
        if self.first_batch_divisors is not None:
            out["first_batch_divisors"] = dict(self.first_batch_divisors)
        return out


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(EngineProfile))


def available_engines() -> list[str]:
    """Profile names in configs/engine/ (``none`` included)."""
    return sorted(p.stem for p in ENGINE_CONFIG_DIR.glob("*.yaml"))


# ---------------------------------------------------------------------------------- loading
def _to_plain(data: Any) -> Any:
    """Hydra hands DictConfig/ListConfig objects; make them plain containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        return data
    if isinstance(data, (DictConfig, ListConfig)):
        return OmegaConf.to_container(data, resolve=True)
    return data


def _read_yaml(name: str) -> dict[str, Any]:
    import yaml

    path = ENGINE_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"engine={name!r} is not a known engine profile; use one of {', '.join(available_engines())} "
                          f"(configs/engine/), or engine=none to run KV configs as written.")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of engine profile fields ({', '.join(FIELD_NAMES)}); "
                          f"got {type(data).__name__}. Fix the file (see configs/engine/none.yaml).")
    if data.get("name") != name:
        raise ConfigError(f"{path}: name={data.get('name')!r} must equal the file name {name!r}; set name: {name}.")
    return dict(data)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value is None or value in choices:
        return value
    raise ConfigError(f"engine.{key}={value!r} is not allowed; use one of {', '.join(choices)} or null "
                      f"(keep each KV config's own {key}).")


def _divisors(value: Any, policy: str | None) -> dict[str, float] | None:
    if value is None:
        if policy == "first_batch":
            raise ConfigError("engine.first_batch_divisors is required with engine.scale_policy=first_batch; set "
                              "engine.first_batch_divisors={k: 200.0, v: 100.0} (vLLM's K_/V_SCALE_CONSTANT).")
        return None
    if not isinstance(value, Mapping) or set(value) != {"k", "v"}:
        raise ConfigError(f"engine.first_batch_divisors must be null or a mapping {{k: <float>, v: <float>}}; got "
                          f"{value!r}. Set e.g. engine.first_batch_divisors={{k: 200.0, v: 100.0}}.")
    out: dict[str, float] = {}
    for which in ("k", "v"):
        d = value[which]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ConfigError(f"engine.first_batch_divisors.{which}={d!r} must be a finite number > 0 "
                              f"(scale = amax / divisor); set e.g. {which}: {200.0 if which == 'k' else 100.0}.")
        out[which] = float(d)
    return out


def _formats(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"engine.supported_formats must be null (any format) or a non-empty list of format names "
                          f"({', '.join(KNOWN_FORMATS)}); got {value!r}. Set e.g. engine.supported_formats=[bf16,fp8_e4m3].")
    unknown = [f for f in value if f not in KNOWN_FORMATS]
    if unknown:
        raise ConfigError(f"engine.supported_formats holds unknown format names {unknown}; use names from "
                          f"{', '.join(KNOWN_FORMATS)} (nvfp4kv.formats).")
    return tuple(dict.fromkeys(value))  # order kept, duplicates dropped


def load_engine_profile(name_or_mapping: str | Mapping[str, Any] | EngineProfile) -> EngineProfile:
    """The :class:`EngineProfile` named ``name_or_mapping`` (``configs/engine/<name>.yaml``), or built
    from a mapping of its fields (a Hydra ``engine`` node, say). Missing fields impose nothing.

    Raises :class:`~nvfp4kv.errors.ConfigError` naming the key, the allowed values and the fix.
    """
    if isinstance(name_or_mapping, EngineProfile):
        return name_or_mapping
    data = _to_plain(name_or_mapping)
    if isinstance(data, str):
        data = _read_yaml(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"an engine profile is a name ({', '.join(available_engines())}) or a mapping of "
                          f"{', '.join(FIELD_NAMES)}; got {type(data).__name__}. Use engine=<name>.")
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown engine profile keys {unknown}; valid keys are {', '.join(FIELD_NAMES)}. "
                          f"Fix the key's spelling (see configs/engine/none.yaml).")

    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"engine.name must be a non-empty string; got {name!r}. Set engine.name=<profile name>.")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"engine.description must be a string; got {description!r}. Quote it in the YAML.")
    scale_policy = _choice("scale_policy", data.get("scale_policy"), SCALE_POLICIES)
    read_mode = _choice("read_mode", data.get("read_mode"), READ_MODES)
    quantize_query = data.get("quantize_query", False)
    if quantize_query is None:
        quantize_query = False
    if not isinstance(quantize_query, bool):
        raise ConfigError(f"engine.quantize_query must be true or false; got {quantize_query!r}. "
                          f"Set engine.quantize_query=true if the engine quantizes Q, else false.")
    residual_length = data.get("residual_length")
    if residual_length is not None and (isinstance(residual_length, bool) or not isinstance(residual_length, int)
                                        or residual_length < 0):
        raise ConfigError(f"engine.residual_length must be null (keep the KV config's) or an integer >= 0 "
                          f"(tokens kept full precision); got {residual_length!r}. Set engine.residual_length=0.")
    return EngineProfile(
        name=name,
        description=description,
        scale_policy=scale_policy,
        first_batch_divisors=_divisors(data.get("first_batch_divisors"), scale_policy),
        read_mode=read_mode,
        quantize_query=quantize_query,
        residual_length=residual_length,
        supported_formats=_formats(data.get("supported_formats")),
    )


# ---------------------------------------------------------------------------------- applying
#: what a named engine does that no profile field can express, per K/V format (docs/engines.md).
#: "*" applies to every quantized format of that engine.
_ENGINE_FORMAT_NOTES: dict[tuple[str, str], str] = {
    ("vllm_v1", "nvfp4"): (
        "vLLM stores NVFP4 K/V only through its FlashInfer backend; on SM80/SM90/SM120 that is the fa2 path, "
        "where Q stays in the model dtype (the Q-quantization note applies to SM100 trtllm-gen only)"),
    ("sglang", "nvfp4"): (
        "SGLang reads an nvfp4 KV cache only with the trtllm_mha decode backend (Blackwell); with FlashInfer "
        "prefill the dequantized prefix is cast to FP8 E4M3 (a second rounding the harness does not emulate)"),
    ("sglang", "fp8_e4m3"): (
        "SGLang writes FP8 K/V as a plain .to(float8_e4m3fn) after dividing by the scale; whether that cast "
        "saturates or gives NaN past 448 on GPU is not confirmed, the harness saturates at 448"),
    ("trtllm", "fp8_e4m3"): (
        "TensorRT-LLM's PyTorch backend keeps the FP8 KV scale at 1.0 whatever the checkpoint holds; ModelOpt "
        "exports FP8 k_scale = max(amax/448, 1), so checkpoint and unit agree unless amax > 448 "
        "(engine.scale_policy=unit reproduces the engine exactly)"),
    ("hf", "*"): (
        "HF QuantizedCache quantizes the whole prompt at prefill and flushes its raw window each time it "
        "reaches residual_length tokens, re-quantizing already-dequantized tokens with new group statistics; "
        "the harness keeps the newest residual_length tokens raw at every step and never re-quantizes "
        "(optimistic), and its int4/int2 KIVI axes are not HF's axis_key=axis_value=0 grouping"),
}


def _q_note(profile: EngineProfile) -> str:
    return (f"Q quantization not emulated: engine={profile.name} quantizes Q to FP8 E4M3 before attention "
            f"(docs/engines.md); the harness keeps Q in the model dtype, so this effect is missing from its numbers")


def apply_engine(profile: EngineProfile | str | Mapping[str, Any],
                 kv_fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``kv_fields`` (KVCacheConfig fields) with the engine's overrides applied, and the
    notes that say what the harness cannot reproduce for this engine and KV config.

    Overrides, each only when the profile's value is not null: ``scale_policy``, ``read_mode``,
    ``residual_length``. ``static_scales`` are dropped when the engine's policy is not ``static``
    (they would contradict it). ``quantize_query`` changes no field: Q quantization is not
    emulated, so it becomes a note, as does what only a named engine does (docs/engines.md).

    Raises :class:`~nvfp4kv.errors.ConfigError` naming the engine when the KV config stores K or V
    in a format the engine cannot (``supported_formats``), or K and V in two formats (every
    profiled engine has one ``--kv-cache-dtype`` for both).
    """
    profile = load_engine_profile(profile)
    fields_in = _to_plain(kv_fields)
    if not isinstance(fields_in, Mapping):
        raise ConfigError(f"apply_engine needs a mapping of KV config fields; got {type(fields_in).__name__}. "
                          f"Pass e.g. {{'k_format': 'nvfp4', 'v_format': 'nvfp4'}}.")
    out = dict(fields_in)
    notes: list[str] = []
    k_format = out.get("k_format", DEFAULT_KV_FORMAT)
    v_format = out.get("v_format", DEFAULT_KV_FORMAT)

    if profile.supported_formats is not None:
        for fmt in (k_format, v_format):
            if fmt not in profile.supported_formats:
                raise ConfigError(
                    f"engine={profile.name} does not support KV format {fmt!r} (supported: "
                    f"{', '.join(profile.supported_formats)}); drop that KV config or use engine=none")
        if k_format != v_format:
            raise ConfigError(
                f"engine={profile.name} stores K and V in one KV cache dtype, but this KV config has "
                f"k_format={k_format!r} and v_format={v_format!r}; drop that KV config or use engine=none")

    if profile.scale_policy is not None:
        if out.get("scale_policy") == "static" and profile.scale_policy != "static" and out.get("static_scales"):
            notes.append(f"static_scales dropped: engine={profile.name} uses scale_policy={profile.scale_policy}")
        if profile.scale_policy != "static" and "static_scales" in out:
            out["static_scales"] = None
        out["scale_policy"] = profile.scale_policy
    if profile.read_mode is not None:
        out["read_mode"] = profile.read_mode
    if profile.residual_length is not None:
        out["residual_length"] = profile.residual_length

    quantized = {k_format, v_format} - UNQUANTIZED_FORMATS
    if profile.scale_policy == "first_batch" and profile.first_batch_divisors:
        d = profile.first_batch_divisors
        notes.append(f"scale_policy=first_batch divisors: k_scale = amax(K)/{d['k']:g}, v_scale = amax(V)/{d['v']:g} "
                     f"over the first forward (engine={profile.name})")
    if profile.quantize_query and quantized:
        notes.append(_q_note(profile))
    if out.get("sink_tokens") and profile.supported_formats is not None:
        notes.append(f"sink_tokens={out['sink_tokens']} is harness-only: engine={profile.name} keeps no "
                     f"full-precision sink tokens")
    if out.get("k_center") and profile.supported_formats is not None:
        notes.append(f"k_center is harness-only: engine={profile.name} stores keys as they are, without "
                     f"subtracting their per-channel mean")
    for fmt in sorted(quantized):
        note = _ENGINE_FORMAT_NOTES.get((profile.name, fmt))
        if note:
            notes.append(note)
    if quantized and (profile.name, "*") in _ENGINE_FORMAT_NOTES:
        notes.append(_ENGINE_FORMAT_NOTES[(profile.name, "*")])
    return out, notes
