"""The one parser of a KV setting, torch-free: :func:`kv_values`.

A KV setting arrives as a ``configs/kv/`` node (a DictConfig typed by
:class:`~nvfp4kv.config.schema.KVSchema`), a plain mapping (a JSON record, ``KVCacheConfig.to_dict()``,
a test), or a compact string (``"nvfp4"``, ``"k=fp8_e4m3;v=nvfp4"``, ``"nvfp4,residual_length=64"``).
:func:`kv_values` turns each into the keyword arguments of ``nvfp4kv.cache.KVCacheConfig``, checking
every key against the schema's fields, every value against the schema's type and closed choices,
and the format names against the known formats. ``KVCacheConfig.from_dict``, the sweep planner and
the cheap check of a composed config (:func:`nvfp4kv.config.check.check_config`) all call it; what
needs the format registry (a format's options, block sizes) and the checks across fields stay in
``KVCacheConfig``.

Only the keys the setting gives are returned (values as given, closed choices as plain strings):
defaults are the caller's, ``KVSchema``'s for a Hydra config, ``KVCacheConfig``'s for a mapping.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from nvfp4kv.config.choices import FORMAT_MODULES_ENV, format_modules, known_formats
from nvfp4kv.config.schema import KVSchema
from nvfp4kv.errors import ConfigError, UnknownFormatError

#: every KV setting key, in KVCacheConfig's order
KV_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(KVSchema))
#: short keys of the compact string form
_FORMAT_KEYS = {"k": "k_format", "v": "v_format"}


class UnknownFormatNameError(UnknownFormatError, ConfigError):
    """A KV format name that is neither built in nor registered: a config error (what a bad override
    raises) and an :class:`~nvfp4kv.errors.UnknownFormatError` (what the registry raises)."""


def plain(value: Any) -> Any:
    """A DictConfig/ListConfig (also nested, also inside plain containers) as plain dicts/lists,
    interpolations resolved and closed choices (Enums) as their string values."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, str) and type(value) is not str:  # a Choice member
        return str(value)
    return value


def parse_compact(kv: str) -> dict[str, Any]:
    """``"nvfp4"`` (K and V), ``"k=fp8_e4m3;v=nvfp4"`` (``,`` or ``;`` separated) and any
    ``field=value`` of the schema (values parsed as YAML scalars/lists)."""
    import yaml

    values: dict[str, Any] = {}
    for item in (part.strip() for part in re.split(r"[;,]", kv)):
        if not item:
            continue
        if "=" not in item:
            values["k_format"] = values["v_format"] = item
            continue
        key, raw = (s.strip() for s in item.split("=", 1))
        key = _FORMAT_KEYS.get(key, key)
        if key not in KV_FIELDS:
            raise ConfigError(f"Unknown KV config key {key!r} in kv={kv!r}; use k=<format>, v=<format> or one of "
                              f"{sorted(KV_FIELDS)}.")
        values[key] = raw if key in ("k_format", "v_format") else yaml.safe_load(raw)
    if "k_format" not in values or "v_format" not in values:
        raise ConfigError(f"kv={kv!r} names no format for K and V; write e.g. kv=nvfp4 or kv=k=fp8_e4m3;v=nvfp4.")
    return values


def kv_values(setting: Any, *, where: str = "") -> dict[str, Any]:
    """``setting`` (a mapping, a DictConfig, a compact string, or None for BF16 K and V) as checked
    ``KVCacheConfig`` keyword arguments; ``where`` (e.g. ``"kvs.nvfp4"``) prefixes every message.

    Raises :class:`~nvfp4kv.errors.ConfigError` (an unknown key or format name, a value of the wrong
    type or outside its choices), one line naming the key and what is allowed."""
    prefix = f"{where}: " if where else ""
    dotted = f"{where}." if where else ""
    if setting is None:
        return {"k_format": "bf16", "v_format": "bf16"}
    if isinstance(setting, str):
        values = parse_compact(setting)
    else:
        setting = plain(setting)
        if not isinstance(setting, Mapping):
            raise ConfigError(f"{prefix}a KV setting must be a mapping of KVCacheConfig fields; got "
                              f"{type(setting).__name__} {setting!r}. Give a mapping, e.g. "
                              f"{{'k_format': 'nvfp4', 'v_format': 'nvfp4'}} (see configs/kv/).")
        values = dict(setting)
    unknown = sorted(set(values) - set(KV_FIELDS), key=str)
    if unknown:
        raise ConfigError(f"{prefix}Unknown KV cache config keys {unknown}; valid keys are {list(KV_FIELDS)}. "
                          f"Fix the key's spelling (nvfp4kv/config/schema.py, KVSchema).")
    check_values(KVSchema, values, where)
    for key in ("k_format", "v_format"):
        name = values.get(key)
        if isinstance(name, str) and name not in known_formats() and not format_modules():
            raise UnknownFormatNameError(
                f"{prefix}Unknown KV format {name!r} ({dotted}{key}); use one of {', '.join(known_formats())} "
                f"(set {dotted}{key}=<name>). A format of your own: name the module that registers it in "
                f"${FORMAT_MODULES_ENV}.")
    return values


def check_values(schema: type, values: Mapping[str, Any], where: str = "") -> None:
    """Check ``values`` (keys already known to be fields of ``schema``) against the schema's types
    and closed choices with OmegaConf, raising a one-line :class:`~nvfp4kv.errors.ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = OmegaConf.structured(schema)
    for key, value in values.items():
        try:
            node[key] = value
        except OmegaConfBaseException as err:
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(omegaconf_message(err, full, value)) from None


def omegaconf_message(err: Exception, key: str, value: Any = None) -> str:
    """One line from an OmegaConf validation error: the key, the value and what is allowed."""
    text = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    choices = re.search(r"expected one of \[(.*)\]", text)
    if choices:
        return f"{key}={value!r} is not allowed; use one of {choices.group(1)}."
    converted = re.search(r"could not be converted to (\w+)", text)
    if converted:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false",
                "String": "a string"}.get(converted.group(1), converted.group(1))
        return f"{key}={value!r} must be {kind}; fix the value."
    return f"{key}={value!r}: {text}; fix the value."
