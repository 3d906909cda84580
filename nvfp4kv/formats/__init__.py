"""KV formats: pure functions + constants, one module per format, registered by name.

Importing this package imports every module in it, which registers each format, so
``get_format("nvfp4")`` works after ``import nvfp4kv.formats``. Modules are *discovered*
(every ``nvfp4kv/formats/<name>.py`` not starting with ``_``), not listed: a new format is
one new module here, with no import line to add. Exact semantics of each format are in its
module docstring and in ``docs/kv-formats.md``; how to add one is ARCHITECTURE.md ("Adding a
KV format").
"""

from __future__ import annotations

import importlib
import pkgutil

from nvfp4kv.formats.base import (
    FormatKernels,
    KVFormat,
    Parts,
    available_formats,
    format_class,
    get_format,
    register_format,
)


def _import_format_modules() -> None:
    """Import every submodule (sorted, so registration order is the same everywhere)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_format_modules()

__all__ = [
    "FormatKernels",
    "KVFormat",
    "Parts",
    "available_formats",
    "format_class",
    "get_format",
    "register_format",
]
