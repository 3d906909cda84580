"""Resolving the kernels a format declares (:class:`~nvfp4kv.formats.base.FormatKernels`).

The one place backends turn a format's lazy ``"module:attribute"`` paths into objects, cached
per declaration so a decode step does not pay an import lookup. Backends never ask "which
format is this?": they ask the format for its kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from nvfp4kv.formats.base import FormatKernels, KernelSlot, KVFormat, Parts


def format_kernel(fmt: KVFormat, slot: KernelSlot) -> Any | None:
    """The kernel object ``fmt`` declares for ``slot`` (imported on first use), or None."""
    return _load(fmt.kernels, slot) if fmt.kernels.has(slot) else None


@functools.lru_cache(maxsize=64)
def _load(kernels: FormatKernels, slot: KernelSlot) -> Any:
    return kernels.load(slot)


def first_part(parts: Parts) -> torch.Tensor:
    """Any stored part (for device routing and checks; every part lives on one device)."""
    return next(iter(parts.values()))
