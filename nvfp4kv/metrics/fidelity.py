"""Decode-faithful fidelity of a quantized KV cache against an unquantized one, on the same text.

Why "decode-faithful": a single forward over a whole text never reads K/V back from a cache,
so a format applied only at storage time would not change its logits at all. Here every
measured prediction reads the *stored* prefix back from the cache under test:

1. **Next-token scoring (chunk-wise).** For each window, the first ``L - 1`` of its ``L`` prefix
   tokens are prefilled into a fresh cache (``make_cache(model, kv)``). Then the last prefix
   token and the targets (teacher forcing) are fed in chunks of ``score_chunk`` tokens, each
   chunk one forward against the cache; each chunk's logits predict the next tokens, ``n_score``
   predictions in all, every one from a forward that reads the stored prefix back from the
   cache. With ``score_chunk=1`` this is exactly token-by-token decoding; with larger chunks a
   chunk reads the prefix and earlier chunks from the cache and its own K/V as the cache's
   ``read_mode`` says (``serving``: raw, chunked-prefill semantics; ``quantized``: dequantized).
   Chunks of 16 cost ~1/10 of the CPU time of token-by-token decoding for that one detail.
2. **Greedy agreement.** From a prompt of essay tokens, greedy-decode token by token with each
   cache; count the tokens generated before the first disagreement with the reference.

The *reference* runs the identical procedure with a plain ``transformers.DynamicCache`` (no
harness code involved), so a bug in the BF16 path of our own cache shows up as KL > 0 for the
``bf16`` format. Reference logits are memoized per model, so a sweep over formats computes them
once. All scoring is on the Paul Graham essays (:mod:`nvfp4kv.metrics.text`); windows for all
context lengths end at the same token, so ``ppl@L`` scores the same targets with more or less
context.

Per position we record ``kl = KL(p_ref || p_kv)`` (nats), ``top1_agree`` (argmax equal) and
``nll`` of the true next token under the quantized cache; the cell reports means, KL's p99 and
``ppl@L = exp(mean nll)`` per context length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CacheFactory = Callable[[], Any]


@dataclass(frozen=True)
class Window:
    """A scored window: ``prefix`` tokens go into the cache, ``targets`` are predicted after it."""

    context_len: int
    index: int
    start: int  # stream offset of the first target token
    prefix: tuple[int, ...]
    targets: tuple[int, ...]


def make_windows(tokens: Sequence[int], context_lens: Sequence[int], n_score: int, n_windows: int) -> list[Window]:
    """Windows whose targets are the same ``n_score`` tokens for every context length.

    Window ``w`` scores ``tokens[a_w : a_w + n_score]`` with ``a_w = max(L) + w * (max(L) + n_score)``
    (windows do not share targets or prefixes of the longest length), and its prefix for
    length ``L`` is the ``L`` tokens just before ``a_w``.
    """
    longest = max(context_lens)
    windows = []
    for w in range(n_windows):
        a = longest + w * (longest + n_score)
        if a + n_score > len(tokens):
            raise ValueError(f"need {a + n_score} tokens for {n_windows} windows, have {len(tokens)}; lower n_windows, "
                             f"n_score or context_lens.")
        for length in sorted(context_lens):
            windows.append(Window(length, w, a, tuple(tokens[a - length : a]), tuple(tokens[a : a + n_score])))
    return windows


def tokens_needed(context_lens: Sequence[int], n_score: int, n_windows: int) -> int:
    """Stream length :func:`make_windows` consumes."""
    longest = max(context_lens)
    return longest + (n_windows - 1) * (longest + n_score) + n_score


def _forward(model: Any, ids: Sequence[int], cache: Any, cache_kwarg: str, *, last_only: bool = False) -> torch.Tensor:
    """One forward of ``ids`` against ``cache``; logits ``[T, V]`` (or ``[1, V]`` with ``last_only``)."""
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if last_only else {}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{cache_kwarg: cache}, **extra)
    return out.logits[0]


def score_window(model: Any, window: Window, cache: Any, cache_kwarg: str, chunk: int) -> torch.Tensor:
    """Logits ``[n_score, V]`` (model dtype, CPU) predicting each target of ``window``.

    The prefix minus its last token is prefilled; then the last prefix token and the targets
    but the last are fed ``chunk`` tokens per forward. Every scored row therefore comes from a
    forward that reads the stored prefix back from ``cache`` (none from the prefill itself,
    whose attention may use raw K/V).
    """
    if chunk < 1:
        raise ValueError(f"score_chunk must be >= 1, got {chunk}")
    if len(window.prefix) < 2:
        raise ValueError("a scored window needs a prefix of at least 2 tokens")
    _forward(model, window.prefix[:-1], cache, cache_kwarg, last_only=True)
    fed = window.prefix[-1:] + window.targets[:-1]
    rows = [_forward(model, fed[start : start + chunk], cache, cache_kwarg) for start in range(0, len(fed), chunk)]
    return torch.cat(rows).cpu()


def compare_logits(ref_logits: torch.Tensor, kv_logits: torch.Tensor, targets: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-position ``kl`` (nats, clamped at 0), ``top1_agree`` (0/1), ``nll``, ``prediction``.

    Everything in float32; KL is clamped at zero because float32 rounding can leave ``-1e-8``
    where the distributions are equal, and KL is non-negative by definition.
    """
    lp_ref = F.log_softmax(ref_logits.float(), dim=-1)
    lp_kv = F.log_softmax(kv_logits.float(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp_kv)).sum(-1).clamp_min(0.0)
    pred = lp_kv.argmax(-1)
    top1 = (pred == lp_ref.argmax(-1)).float()
    target = torch.tensor(list(targets), dtype=torch.long)
    nll = -lp_kv.gather(1, target[:, None])[:, 0]
    return {"kl": kl, "top1_agree": top1, "nll": nll, "prediction": pred}


def greedy_decode(model: Any, prompt: Sequence[int], n_tokens: int, cache: Any, cache_kwarg: str) -> list[int]:
    """``n_tokens`` greedy tokens after ``prompt``, one decode step per token against ``cache``.

    Our own loop rather than ``generate``: no generation-config defaults (sampling, EOS stops)
    can creep in, and each step is visibly one forward reading the cache.
    """
    out: list[int] = []
    logits = _forward(model, prompt, cache, cache_kwarg, last_only=True)
    for _ in range(n_tokens):
        token = int(logits[-1].float().argmax())
        out.append(token)
        if len(out) == n_tokens:
            break
        logits = _forward(model, [token], cache, cache_kwarg)
    return out


def agreement_length(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Tokens generated before the first divergence."""
    n = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        n += 1
    return n


class ReferenceMemo:
    """Reference (unquantized-cache) results memoized per model object.

    A sweep loads the model once and runs every KV format against it; the reference depends
    only on the model and the inputs, so it is computed once. Only the most recent model is
    kept, so a long-lived process never pins an old model in memory.
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._store: dict[Any, Any] = {}

    def get(self, model: Any, key: Any, compute: Callable[[], Any]) -> Any:
        if model is not self._model:
            self._model, self._store = model, {}
        if key not in self._store:
            self._store[key] = compute()
        return self._store[key]

    def clear(self) -> None:
        self._model, self._store = None, {}


REFERENCE = ReferenceMemo()


def reference_cache(model: Any) -> Any:
    """The reference cache: transformers' own ``DynamicCache`` (keeps K/V exactly as computed)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
