"""Batched loglikelihood scoring for :class:`~nvfp4kv.eval.lm.KVQuantLM`, batch-invariant.

A request's score must not depend on which requests share its batch or on its padding. So:

* batches are **left-padded** and the cache is told each row's pad length
  (:meth:`~nvfp4kv.cache.QuantizedKVCache.set_padding`: pads stored as zeros, kept out of every
  scale, sink window and token group, per-row global scales); the forward gets the matching
  attention mask and per-row position ids (a row's first real token is position 0);
* ``decode_faithful``: the prefixes of a batch are prefilled in one forward (logits of the last
  position only: nothing reads the others), then every scored row **decodes its chunk token by
  token** (teacher forcing): step ``s`` writes chunk token ``s`` into the cache, reads the cache
  back as the format stores it, and its logits score continuation token ``s``. A token's score
  therefore depends only on the tokens before it (never on the continuation's later tokens, nor
  on how many there are). Rows whose chunk is shorter than their neighbours' repeat their last
  token for the remaining steps; those steps are written after everything the row scores and are
  never read by it;
* ``all_quantized`` / ``raw_prefill``: one left-padded forward over ``context + continuation[:-1]``
  per row, through a cache with the mode's read mode.

What stays batch-dependent is floating point below the harness: on a CPU, MKL's GEMM rounds a row
differently depending on how many rows it multiplies at once (e.g. 1, 2-15 or more rows), so
batched and one-by-one log-likelihoods of a real model differ in the last bits (measured in
``tests/test_batch_invariance.py``). With a row-invariant matrix multiply everything here is
bit-identical batched and one by one (the same test, every format and scale policy).

Rows are ordered by prefix length (longest first, then tokens) so a batch pads little and the
batching is a deterministic function of the requests, independent of the KV format: two cells of
a sweep run the same batches, which is what lets a prefill be shared between them
(:mod:`nvfp4kv.eval.prefill_share`, keyed by the batch's prefixes).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nvfp4kv.eval import prefill_share

if TYPE_CHECKING:
    from nvfp4kv.eval.lm import KVQuantLM

Tokens = tuple[int, ...]
Score = tuple[float, bool]


@dataclass
class Row:
    """One scored sequence: ``prefix`` prefilled, then ``chunk`` read; every continuation in
    ``conts`` has ``len(chunk)`` tokens and is scored by the same logits."""

    prefix: Tokens
    chunk: Tokens
    conts: list[Tokens] = field(default_factory=list)


def pad_batch(seqs: Sequence[Tokens], device: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[int]]:
    """Left-pad ``seqs``: ``(input_ids, attention_mask, position_ids, pads)``; mask and position
    ids are None when no row is padded (the model's own defaults are then exactly these)."""
    length = max(len(s) for s in seqs)
    pads = [length - len(s) for s in seqs]
    ids = torch.tensor([[0] * p + list(s) for p, s in zip(pads, seqs)], dtype=torch.long, device=device)
    if not any(pads):
        return ids, None, None, pads
    mask = torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pads, seqs)], dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, pads


def announce_padding(cache: Any, pads: Sequence[int]) -> None:
    """Tell ``cache`` the batch's left padding (caches without the method, e.g. a plain
    ``DynamicCache`` in tests, store pads as tokens: correct for exact formats)."""
    if any(pads):
        setter = getattr(cache, "set_padding", None)
        if setter is not None:
            setter(list(pads))


def batch_size_for(lm: KVQuantLM, requests: Sequence[tuple[Any, Tokens, Tokens]]) -> int:
    """The lm's batch size; ``auto`` asks HFLM's detector with the longest request."""
    size = lm.batch_size
    if isinstance(size, str):  # "auto" / "auto:N"
        longest = max(range(len(requests)), key=lambda i: len(requests[i][1]) + len(requests[i][2]))
        return max(1, int(lm._detect_batch_size(list(requests), longest)))
    return max(1, int(size))


def _sum_scores(logprobs: list[torch.Tensor], greedy: list[bool]) -> Score:
    # summed as HFLM sums them: one FP32 reduction over the continuation's log-probs
    return float(torch.stack(logprobs).sum()), all(greedy)


# ---------------------------------------------------------------------------- decode_faithful
def _batches(rows: list[Row], size: int) -> list[list[Tokens]]:
    """Prefixes in deterministic order (longest first), grouped so a batch holds at most ``size``
    rows (a prefix with more rows than that goes alone) and never mixes empty and real prefixes."""
    per_prefix: dict[Tokens, int] = defaultdict(int)
    for row in rows:
        per_prefix[row.prefix] += 1
    batches: list[list[Tokens]] = []
    current: list[Tokens] = []
    used = 0
    for prefix in sorted(per_prefix, key=lambda p: (-len(p), p)):
        n = per_prefix[prefix]
        if current and (used + n > size or (not prefix) != (not current[0])):
            batches.append(current)
            current, used = [], 0
        current.append(prefix)
        used += n
    if current:
        batches.append(current)
    return batches


def decode_faithful(lm: KVQuantLM, rows: list[Row], size: int, progress: Any) -> dict[tuple[Tokens, Tokens, Tokens], Score]:
    """Score every row (prefill, then teacher-forced decode steps through the cache)."""
    by_prefix: dict[Tokens, list[Row]] = defaultdict(list)
    for row in rows:
        by_prefix[row.prefix].append(row)
    scores: dict[tuple[Tokens, Tokens, Tokens], Score] = {}
    for prefixes in _batches(rows, size):
        cache = _prefill(lm, prefixes)
        batch_rows = [(i, row) for i, prefix in enumerate(prefixes) for row in by_prefix[prefix]]
        subs = [batch_rows[k : k + size] for k in range(0, len(batch_rows), size)]
        for n, sub in enumerate(subs):
            sub_cache = cache if n == len(subs) - 1 else _fork(lm, cache)
            sources = [i for i, _ in sub]
            if prefixes[0] and sources != list(range(len(prefixes))):
                sub_cache.batch_select_indices(torch.tensor(sources, dtype=torch.long, device=lm.device))
            scores.update(_decode_rows(lm, sub_cache, [row for _, row in sub], max(len(p) for p in prefixes)))
            progress.update(sum(len(row.conts) for _, row in sub))
    return scores


def _fork(lm: KVQuantLM, cache: Any) -> Any:
    """An independent copy of a prefilled cache (a quantized layer's state is more than its
    tokens, so a copy, not a crop); the first_batch store stays shared. An empty prefix's cache
    is simply a fresh one."""
    if cache.get_seq_length() == 0:
        return lm._fresh_cache()
    frozen = getattr(cache, "frozen_scales", None)
    return copy.deepcopy(cache, {id(frozen): frozen} if frozen is not None else None)


def _prefill(lm: KVQuantLM, prefixes: list[Tokens]) -> Any:
    """A fresh cache holding ``prefixes`` (left-padded rows). With ``share_prefill`` and a read
    mode under which the prefill is format-independent, the same batch already computed (by any
    KV format) is replayed instead of run again (exact: nvfp4kv/eval/prefill_share.py)."""
    cache = lm._fresh_cache()
    if not prefixes[0]:
        return cache
    ids, mask, positions, pads = pad_batch(prefixes, lm.device)
    announce_padding(cache, pads)
    store = (prefill_share.store_for(lm.model)
             if lm.share_prefill and lm.kv.read_mode in prefill_share.SHAREABLE_READ_MODES else None)
    key = tuple(prefixes)
    writes = store.get(key) if store is not None else None
    if writes is not None:
        lm.stats["prefill_replays"] += 1
        prefill_share.replay(cache, writes)
        return cache
    recorder = prefill_share.WriteRecorder() if store is not None else None
    if recorder is not None:
        cache.write_observer = recorder
    lm.stats["prefill_forwards"] += 1
    try:
        lm._forward(ids, cache, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    finally:
        if recorder is not None:
            cache.write_observer = None
    if store is not None and recorder is not None:
        store.put(key, recorder.writes)
    return cache


def _decode_rows(lm: KVQuantLM, cache: Any, rows: list[Row], prefill_len: int) -> dict[tuple[Tokens, Tokens, Tokens], Score]:
    """Teacher-forced decode of every row's chunk, all rows one step at a time."""
    steps = max(len(row.chunk) for row in rows)
    pads = [prefill_len - len(row.prefix) for row in rows] if rows[0].prefix else [0] * len(rows)
    written = prefill_len if rows[0].prefix else 0
    collected: dict[tuple[int, Tokens], list[torch.Tensor]] = defaultdict(list)
    greedy: dict[tuple[int, Tokens], list[bool]] = defaultdict(list)
    for s in range(steps):
        ids = torch.tensor([[row.chunk[min(s, len(row.chunk) - 1)]] for row in rows], dtype=torch.long, device=lm.device)
        mask = positions = None
        if any(pads):
            mask = torch.ones((len(rows), written + 1), dtype=torch.long, device=lm.device)
            for r, pad in enumerate(pads):
                mask[r, :pad] = 0
            positions = torch.tensor([[len(row.prefix) + s] for row in rows], dtype=torch.long, device=lm.device)
        lm.stats["chunk_forwards"] += 1  # forwards that score continuation tokens (decode steps)
        logits = lm._forward(ids, cache, attention_mask=mask, position_ids=positions)[:, -1]
        logprobs = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)
        best = logprobs.argmax(dim=-1).tolist()
        written += 1
        for r, row in enumerate(rows):
            if s >= len(row.chunk):
                continue
            for cont in row.conts:
                collected[r, cont].append(logprobs[r, cont[s]])
                greedy[r, cont].append(best[r] == cont[s])
    return {(row.prefix, row.chunk, cont): _sum_scores(collected[r, cont], greedy[r, cont])
            for r, row in enumerate(rows) for cont in row.conts}


# ---------------------------------------------------------------------------- single forward
def single_forward(lm: KVQuantLM, rows: list[Row], size: int, read_mode: str, progress: Any) -> dict[tuple[Tokens, Tokens, Tokens], Score]:
    """``all_quantized`` / ``raw_prefill``: one forward over ``prefix + chunk`` per row (rows
    sharing that input share the forward), left-padded batches through a ``read_mode`` cache."""
    by_input: dict[Tokens, list[Row]] = defaultdict(list)
    for row in rows:
        by_input[row.prefix + row.chunk].append(row)
    ordered = sorted(by_input, key=lambda seq: (-len(seq), seq))
    scores: dict[tuple[Tokens, Tokens, Tokens], Score] = {}
    for k in range(0, len(ordered), size):
        inputs = ordered[k : k + size]
        ids, mask, positions, pads = pad_batch(inputs, lm.device)
        cache = lm._fresh_cache(read_mode)
        announce_padding(cache, pads)
        lm.stats["single_forwards"] += 1
        longest = max(len(row.chunk) for seq in inputs for row in by_input[seq])
        logits = lm._forward(ids, cache, attention_mask=mask, position_ids=positions)[:, -longest:]
        logprobs = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)
        best = logprobs.argmax(dim=-1)
        for r, seq in enumerate(inputs):
            for row in by_input[seq]:
                n = len(row.chunk)
                for cont in row.conts:
                    target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                    picked = logprobs[r, longest - n :].gather(1, target[:, None])[:, 0]
                    scores[row.prefix, row.chunk, cont] = (float(picked.sum()), bool((best[r, longest - n :] == target).all()))
                progress.update(len(row.conts))
    return scores
