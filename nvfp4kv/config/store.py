"""Register the schemas of :mod:`nvfp4kv.config.schema` in Hydra's ConfigStore.

Config files start from them through their defaults lists:

- ``configs/config.yaml``: ``_run`` (:class:`~nvfp4kv.config.schema.RunConfig`), ``configs/calibrate.yaml``:
  ``_calibrate`` (:class:`~nvfp4kv.config.schema.CalibrateConfig`);
- ``configs/kv/<name>.yaml``: ``_schema`` of group ``kv`` (:class:`~nvfp4kv.config.schema.KVSchema`);
- ``configs/task/<name>.yaml``: ``_lm_eval`` / ``_passkey`` / ``_ruler`` / ``_fidelity`` of group
  ``task`` (one schema per built-in kind).

The leading ``_`` marks a schema, not a config to select. Whatever composes ``configs/`` must import
:mod:`nvfp4kv.config` first (``experiments/run.py``, ``experiments/calibrate.py`` and
``nvfp4kv.eval.plan`` do); :func:`register` is idempotent.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from nvfp4kv.config import schema

#: (group, name) -> schema; group None = a primary config's schema
SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "_run"): schema.RunConfig,
    (None, "_calibrate"): schema.CalibrateConfig,
    ("kv", "_schema"): schema.KVSchema,
    **{("task", f"_{kind}"): cls for kind, cls in schema.TASK_SCHEMAS.items()},
}


def register() -> None:
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)
