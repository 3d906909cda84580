"""Share one prefill between KV formats: compute a prompt's raw K/V once, replay it into each cache.

Why this is exact, and when: under ``read_mode="serving"`` a prefill chunk written into an empty
cache attends to its *own raw* K/V, so every hidden state of the prefill, and therefore every K/V
tensor it writes, is the same whatever the KV format. What differs between formats is only what
the cache *stores* from those tensors. Replaying the recorded ``update(k, v, layer)`` calls into
a fresh cache of another format stores exactly what that format's own prefill would have stored
(codes, scales, sink/residual windows, frozen first-batch scales), without running the model.

That turns a multiple-choice study (MMLU: prefill-bound, ~6 CPU-s a question on a 1.5B model)
from one prefill per question per format into one prefill per question. Not used when a read
mode makes the prefill itself format-dependent (``quantized``, ``raw_fresh``) or when the prefix
cache is written by something other than one forward over an empty cache.

Batches: the key is the batch's prefixes, in order (:mod:`nvfp4kv.eval.lm_score` forms batches
deterministically from the requests, so every format's cell runs the same batches), and the
recorded writes are the batch's left-padded K/V. A replay announces the same padding
(``set_padding``) and writes the same tensors, so it stores exactly what that batch's own prefill
would have stored. Keying by the batch, not by each prefix, matters: on a CPU a row's K/V from a
batched forward can differ in the last bits from the same row computed alone (GEMM rounding), and
a replay must reproduce the forward it stands for bit for bit.

The store is per model (weakly keyed: it dies with the model), bounded in bytes (least recently
used prefixes dropped first; ``NVFP4KV_PREFILL_SHARE_GIB``, default 3), and holds references to
the very tensors the forward produced (nothing is copied or rounded). ``tests/test_eval_lm.py``
checks that scores with and without sharing are bit-identical for several formats.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

#: read modes under which a prefill over an empty cache reads only its own raw K/V
SHAREABLE_READ_MODES = ("serving",)

KV = list[tuple[torch.Tensor, torch.Tensor] | None]


def budget_bytes() -> int:
    return int(float(os.environ.get("NVFP4KV_PREFILL_SHARE_GIB", "3")) * 2**30)


class PrefillStore:
    """Recorded prefill writes (one ``(k, v)`` per layer) keyed by the batch's prefix tokens
    (a tuple of token tuples), LRU within a byte budget."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget_bytes() if budget is None else budget
        self._entries: OrderedDict[Hashable, KV] = OrderedDict()
        self.nbytes = 0
        #: prompt -> the first greedy token its prefill's logits choose (nvfp4kv.eval.greedy)
        self.first_tokens: dict[Hashable, int] = {}

    @staticmethod
    def _size(writes: KV) -> int:
        return sum(t.numel() * t.element_size() for pair in writes if pair is not None for t in pair)

    def get(self, prefix: Hashable) -> KV | None:
        writes = self._entries.get(prefix)
        if writes is not None:
            self._entries.move_to_end(prefix)
        return writes

    def put(self, prefix: Hashable, writes: KV) -> None:
        size = self._size(writes)
        if size > self.budget or prefix in self._entries:
            return
        self._entries[prefix] = writes
        self.nbytes += size
        while self.nbytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= self._size(old)

    def __len__(self) -> int:
        return len(self._entries)


_STORES: weakref.WeakKeyDictionary[Any, PrefillStore] = weakref.WeakKeyDictionary()


def store_for(model: Any) -> PrefillStore:
    """The process-wide store of ``model`` (created on first use)."""
    store = _STORES.get(model)
    if store is None:
        store = _STORES[model] = PrefillStore()
    return store


class WriteRecorder:
    """Records the ``(k, v)`` each layer writes during one forward (a cache's ``write_observer``)."""

    def __init__(self) -> None:
        self.writes: KV = []

    def __call__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        while len(self.writes) <= layer_idx:
            self.writes.append(None)
        if self.writes[layer_idx] is not None:
            raise RuntimeError(f"layer {layer_idx} was written twice in one prefill; the prefill cannot be shared")
        self.writes[layer_idx] = (key, value)


def replay(cache: Any, writes: KV) -> None:
    """Write recorded prefill K/V into ``cache`` layer by layer, as the forward would have."""
    for idx, pair in enumerate(writes):
        if pair is not None:
            cache.update(pair[0], pair[1], idx)
