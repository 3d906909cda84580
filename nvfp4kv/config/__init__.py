"""Typed configuration, torch-free: the Hydra schemas, the closed choices, the resolvers and the
cheap checks that run right after Hydra composes a config and before torch or lm-eval load.

- :mod:`~nvfp4kv.config.choices`: every closed choice (scale policies, read modes, backends, NaN/Inf
  policies, loglikelihood modes, model dtypes, built-in KV format names); ``KVCacheConfig`` uses them.
- :mod:`~nvfp4kv.config.schema`: dataclasses for the run, the model, a KV setting, each built-in task
  kind and the sweep, registered in Hydra's ConfigStore by :mod:`~nvfp4kv.config.store`.
- :mod:`~nvfp4kv.config.kv`: :func:`~nvfp4kv.config.kv.kv_values`, the one parser of a KV setting
  (a mapping, a DictConfig or a compact string such as ``"k=fp8_e4m3;v=nvfp4"``).
- :mod:`~nvfp4kv.config.check`: :func:`~nvfp4kv.config.check.resolve_config` and
  :func:`~nvfp4kv.config.check.check_config`, and :func:`~nvfp4kv.config.check.describe_error`,
  the one-line form of a composition error.

Importing this package registers the schemas and the resolvers (both idempotent).
"""

from __future__ import annotations

from nvfp4kv.config.resolvers import register_resolvers
from nvfp4kv.config.store import register

register()
register_resolvers()

__all__ = ["register", "register_resolvers"]
