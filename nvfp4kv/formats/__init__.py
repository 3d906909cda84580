"""KV formats: pure functions + constants, one module per format, registered by name.

Importing this package imports every format module, which registers it, so
``get_format("nvfp4")`` works after ``import nvfp4kv.formats``. Exact semantics of each
format are in its module docstring and in ``docs/kv-formats.md``.
"""

from __future__ import annotations

from nvfp4kv.formats import (  # noqa: F401  (imported for their registration side effect)
    bf16,
    conventions,
    e2m1,
    e4m3,
    fp4_mx_block16,
    fp8_e4m3,
    kivi,
    mxfp4,
    nvfp4,
)
from nvfp4kv.formats.base import KVFormat, Parts, available_formats, get_format, register_format

__all__ = ["KVFormat", "Parts", "available_formats", "get_format", "register_format"]
