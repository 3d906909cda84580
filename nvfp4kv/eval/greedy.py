"""Greedy generation of one prompt through a fresh quantized cache, its prefill shared between KV formats.

The long-context tasks (pass-key, RULER) generate a few tokens after a 4K-8K prompt, once per KV
format. Their cost is the prefill: on a 1.5B model in fp32 on two CPU cores an 8K-token prefill
takes minutes, the few decode steps after it seconds. Under ``read_mode="serving"`` the prefill of
an empty cache attends to its own raw K/V, so it is the same for every format
(:mod:`nvfp4kv.eval.prefill_share` says why, and keeps the store): the first format runs it and
records the K/V it writes; every other format replays those writes into its own cache and decodes
from there. The first generated token comes from the prefill's logits, so it is the same for every
format too, and is stored beside the writes.

Exact, not approximate: the shared path runs ``generate`` twice (one token, then the rest with the
prefilled cache), which is the same sequence of forwards, masks, positions and logits processors
as one ``generate`` call; ``tests/test_greedy.py`` checks equal tokens with and without sharing for
every format and scale policy. Under other read modes (``quantized``, ``raw_fresh``) the prefill
depends on the format, so nothing is shared.

Memory: one stored prompt is its K/V in the model's dtype (Qwen2.5-1.5B fp32: ~57 KB per token,
470 MB at 8K); the store keeps the most recent prompts within ``NVFP4KV_PREFILL_SHARE_GIB``. A sweep
runs each task for every format before the next task, so a task's prompts must fit that budget to
be shared (split a long grid into several tasks, as ``configs/sweep/long_context*.yaml`` do); what
does not fit is simply computed again.
"""

from __future__ import annotations

from typing import Any

import torch

from nvfp4kv.eval import prefill_share


def greedy_generate(model: Any, input_ids: list[int], kv: Any, new_tokens: int, *, pad_token_id: int | None,
                    frozen_scales: Any = None, share_prefill: bool = True) -> list[int]:
    """The ``new_tokens`` greedy tokens after ``input_ids`` (fewer if generation stops at EOS),
    through a fresh cache of KV setting ``kv`` (a ``KVCacheConfig``)."""
    from nvfp4kv.cache import cache_kwarg_name, make_cache

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    cache = make_cache(model, kv, frozen_scales)
    cache_kwarg = cache_kwarg_name(model)

    def run(prompt: torch.Tensor, tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=pad_token_id, **{cache_kwarg: cache})
        return out[0, prompt.shape[1]:].tolist()

    if not share_prefill or kv.read_mode not in prefill_share.SHAREABLE_READ_MODES or new_tokens < 1:
        return run(ids, new_tokens)

    store = prefill_share.store_for(model)
    firsts = store.first_tokens
    key = ("greedy", tuple(input_ids))
    writes = store.get(key)
    if writes is not None and key in firsts:
        prefill_share.replay(cache, writes)
        first = firsts[key]
    else:
        recorder = prefill_share.WriteRecorder()
        cache.write_observer = recorder
        try:
            first = run(ids, 1)[0]  # the prefill forward, and the token its logits choose
        finally:
            cache.write_observer = None
        store.put(key, recorder.writes)
        firsts[key] = first
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if new_tokens == 1 or first in eos_ids:
        return [first]
    prompt = torch.cat([ids, torch.tensor([[first]], dtype=torch.long, device=device)], dim=1)
    return [first] + run(prompt, new_tokens - 1)
