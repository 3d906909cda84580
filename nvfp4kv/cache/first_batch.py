"""``FrozenScales``: the global scales a ``first_batch`` policy computed once, shared by caches.

Why a store outside the cache: vLLM's ``calculate_kv_scales`` sets each attention layer's
``k_scale``/``v_scale`` from the first forward the engine runs and keeps them for every later
request. Our caches live one request each, so the frozen scales must outlive them: every cache
built with the same store reads the scales the first one wrote. A cache built without a store
gets its own, which makes ``first_batch`` equal to a per-request scale (documented, not hidden).
"""

from __future__ import annotations

import torch


class FrozenScales:
    """Scale tensors keyed by stream label (``"layer 3 K"``), written once, then only read."""

    def __init__(self) -> None:
        self._scales: dict[str, torch.Tensor] = {}

    def get(self, label: str) -> torch.Tensor | None:
        return self._scales.get(label)

    def freeze(self, label: str, scale: torch.Tensor) -> torch.Tensor:
        """Keep ``scale`` for ``label`` unless one is already frozen; return the frozen one."""
        return self._scales.setdefault(label, scale.detach().float().clone())

    def __len__(self) -> int:
        return len(self._scales)

    def clear(self) -> None:
        self._scales.clear()
