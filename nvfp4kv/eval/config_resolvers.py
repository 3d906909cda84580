"""Moved to :mod:`nvfp4kv.config.resolvers` (torch-free, so the CLI resolves a config before torch
loads); re-exported here for existing imports."""

from __future__ import annotations

from nvfp4kv.config.resolvers import (  # noqa: F401
    CONFIG_DIR,
    _default_data_dir,
    _job_suffix,
    _sweep_name,
    _uid,
    available_kv_configs,
    available_sweeps,
    missing_sweep_message,
    register_resolvers,
)

register_resolvers()
