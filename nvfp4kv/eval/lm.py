"""lm-eval model class ``nvfp4kv``: a HuggingFace causal LM whose KV cache is quantized.

lm-eval's :class:`~lm_eval.models.huggingface.HFLM` never uses a KV cache for scoring
(loglikelihood is one cache-less forward) and lets ``generate`` build its own cache. Both paths
would silently ignore the KV format under test, so :class:`KVQuantLM` routes every forward through
a fresh :func:`nvfp4kv.cache.make_cache` cache:

* **Generation** (``generate_until``: GSM8K, passkey-style tasks): ``_model_generate`` hands
  ``model.generate`` a *fresh* quantized cache per call (a reused cache would continue from the
  previous prompt). The prompt is prefilled and every generated token decodes against the cache,
  with reads as the cache's ``read_mode`` says.

* **Loglikelihood** (multiple choice: MMLU; ``loglikelihood_rolling``: perplexity windows),
  three modes, because "which attention reads see quantized K/V" is a real choice that changes
  the answer:

  ``decode_faithful`` (default)
      The context (all but its last token) is prefilled into the quantized cache; then the
      continuation is scored by **teacher-forced decoding through the cache**: the last context
      token, then each continuation token but the last, is written to the cache as one decode
      step that reads the cache back as the format stores it, and that step's logits score the
      next continuation token. So every scored token is predicted exactly as a server decoding
      that text would predict it (under ``read_mode='serving'`` a decode step reads everything
      dequantized, itself included), and a token's score never depends on the tokens after it
      (the first token of a 5-token continuation scores as it does alone). Rolling windows are
      continuations too: each window is scored token by token through the cache, so perplexity
      sees the format (one decode step per token: slow on long documents, by design).

  ``all_quantized``
      One forward over context+continuation through a cache with ``read_mode='quantized'``: every
      attention read, including within the prompt, sees dequantized K/V (SGLang's FP4 MHA pool
      semantics; the same as fake-quantizing K/V after RoPE). The pessimistic bound; a token's
      score may depend on later tokens through the scale of the write.

  ``raw_prefill``
      One forward through a cache with ``read_mode='serving'``: the whole sequence is a single
      prefill chunk reading its own raw K/V, so **the KV format has no effect at all**. This is
      what HF's ``QuantizedCache`` does for single-forward scoring. Use it only as a control (it
      must equal BF16, and HFLM) or to reproduce numbers from harnesses built on that behaviour.

**Batching** (``batch_size``: an integer or ``auto``; every mode, and ``generate_until``): rows
are left-padded and the cache is told each row's padding
(:meth:`~nvfp4kv.cache.QuantizedKVCache.set_padding`), so a row's codes, scales, log-likelihoods
and greedy tokens are those it gets alone, under every scale policy but ``first_batch`` (one
scale from the first forward's whole batch: batch-wide by definition). The one exception below
the harness is the CPU GEMM's rounding, which depends on how many rows it multiplies: see
:mod:`nvfp4kv.eval.lm_score` and ``tests/test_batch_invariance.py`` for what is exact and the
measured size of the rest. Attention: a model running ``sdpa`` is switched to its row-invariant
twin for the duration of each call (:class:`~nvfp4kv.kernels.attention_interface.row_invariant_attention`;
one SDPA call per padded row); other implementations are left as they are, so with
``nvfp4kv_decode`` (the fused GPU kernel, whose split-K reduction sees the pads) or ``eager``,
padded rows are not guaranteed bit-identical to the same rows alone.

Memoization (decode_faithful): requests are grouped by their prefilled prefix so each distinct
context (e.g. an MMLU question shared by its four choices) is prefilled once; requests that also
share the scored chunk (all four MMLU choices: the chunk is the context's last token) share one
row of decode steps. When one context has several distinct chunks, the prefilled cache's rows are
selected (``batch_select_indices``) once per chunk, or, for a context with more chunks than
``batch_size``, the prefilled cache is **deep-copied** per group of rows. We copy rather than
``crop`` because a quantized layer's state is not only its tokens (dynamic scales, residual
windows); a copy is exact by construction, and re-running the prefill would multiply the cost by
the number of choices. Scores are memoized per (prefix, chunk, continuation) until
:meth:`KVQuantLM.set_kv`.

Log-softmax runs in float32 in every mode unless ``softmax_dtype`` says otherwise (HFLM's default
is the logits' dtype, i.e. BF16, which rounds log-probs to ~3 significant digits).

CLI: ``lm_eval`` does not discover external model classes, so run it through this module:
``python -m nvfp4kv.eval.lm --model nvfp4kv --model_args pretrained=<dir|hub id|embedded:...>,kv=nvfp4
--device cpu --tasks gsm8k``. ``kv`` takes a format name for both K and V (``nvfp4``) or
``k=fp8_e4m3;v=nvfp4`` (``;``-separated, because lm-eval splits model_args on commas), plus any
other :class:`~nvfp4kv.cache.KVCacheConfig` field (``k=fp8_e4m3;v=nvfp4;read_mode=quantized``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.config.kv import kv_values
from nvfp4kv.eval import lm_score
from nvfp4kv.errors import ConfigError
from nvfp4kv.kernels.attention_interface import row_invariant_attention

LoglikelihoodMode = Literal["decode_faithful", "all_quantized", "raw_prefill"]
LOGLIKELIHOOD_MODES: tuple[str, ...] = get_args(LoglikelihoodMode)

#: read_mode forced by the single-forward loglikelihood modes (decode_faithful keeps the config's)
_SINGLE_FORWARD_READ_MODE = {"all_quantized": "quantized", "raw_prefill": "serving"}

# (request string or None for rolling windows, context tokens, continuation tokens)
Request = tuple[tuple[str, str] | None, list[int], list[int]]


def parse_kv(kv: KVCacheConfig | Mapping[str, Any] | str | None) -> KVCacheConfig:
    """Accept a config object, its ``to_dict()`` form, or a compact string.

    Strings: ``"nvfp4"`` (both K and V), ``"k=fp8_e4m3,v=nvfp4"`` (``,`` or ``;`` separated), and
    any ``field=value`` of :class:`KVCacheConfig` (values parsed as YAML scalars/lists). Parsed by
    the one KV parser, :func:`nvfp4kv.config.kv.kv_values`, as sweeps and ``from_dict`` are.
    """
    if isinstance(kv, KVCacheConfig):
        return kv
    if kv is not None and not isinstance(kv, (str, Mapping)):
        raise ConfigError(f"kv must be a KVCacheConfig, a dict or a string like 'nvfp4'; got {type(kv).__name__}.")
    return KVCacheConfig(**kv_values(kv))


def _check_mode(mode: str) -> str:
    if mode not in LOGLIKELIHOOD_MODES:
        raise ConfigError(f"Unknown loglikelihood_mode {mode!r}; use one of {', '.join(LOGLIKELIHOOD_MODES)}.")
    return mode


def _register(cls: type) -> type:
    # Under `python -m nvfp4kv.eval.lm` this file also runs as __main__; only the importable
    # module may register, or lm-eval's registry rejects the second class under the same name.
    return register_model("nvfp4kv")(cls) if __name__ != "__main__" else cls


@_register
class KVQuantLM(HFLM):
    """HFLM whose generation and loglikelihood read K/V through a quantized cache.

    Takes every HFLM argument plus ``kv`` (see :func:`parse_kv`) and ``loglikelihood_mode``.
    ``stats`` counts forwards (``prefill_forwards`` and ``prefill_replays``: prefill batches run or
    replayed; ``chunk_forwards``: decode-step forwards that score continuation tokens, one per
    step of a batch; ``single_forwards``; ``generate_caches``; ``memo_hits``) so tests and logs
    can verify the cache is really used.
    """

    def __init__(
        self,
        pretrained: Any,
        kv: KVCacheConfig | dict[str, Any] | str | None = "bf16",
        loglikelihood_mode: LoglikelihoodMode = "decode_faithful",
        progress: bool = True,
        share_prefill: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str) and pretrained.startswith("embedded:"):
            from nvfp4kv.models import resolve_path

            pretrained = resolve_path(pretrained)
        kwargs.setdefault("batch_size", 1)
        kwargs.setdefault("softmax_dtype", "float32")
        super().__init__(pretrained=pretrained, **kwargs)
        self._kv = parse_kv(kv)
        self.loglikelihood_mode: str = _check_mode(loglikelihood_mode)
        self.progress = progress
        #: decode_faithful: reuse a prefix's prefill K/V across KV formats (exact; prefill_share.py)
        self.share_prefill = share_prefill
        self.stats: Counter[str] = Counter()
        self._score_memo: dict[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], tuple[float, bool]] = {}
        #: first_batch policy: the scales the first forward of this KV setting froze (reset by set_kv)
        self._frozen_scales = FrozenScales()

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        kv: KVCacheConfig | dict[str, Any] | str | None = "bf16",
        loglikelihood_mode: LoglikelihoodMode = "decode_faithful",
        **kwargs: Any,
    ) -> KVQuantLM:
        """Wrap an already-loaded :class:`~nvfp4kv.models.ModelBundle` (no reload, no copy)."""
        return cls(pretrained=bundle.model, tokenizer=bundle.tokenizer, kv=kv,
                   loglikelihood_mode=loglikelihood_mode, **kwargs)

    # ------------------------------------------------------------------ KV config
    @property
    def kv(self) -> KVCacheConfig:
        return self._kv

    def set_kv(self, kv: KVCacheConfig | dict[str, Any] | str | None,
               loglikelihood_mode: LoglikelihoodMode | None = None) -> None:
        """Switch KV format (and optionally scoring mode) in place; memoized scores are dropped."""
        self._kv = parse_kv(kv)
        if loglikelihood_mode is not None:
            self.loglikelihood_mode = _check_mode(loglikelihood_mode)
        self._score_memo.clear()
        self._frozen_scales = FrozenScales()

    def _fresh_cache(self, read_mode: str | None = None) -> Any:
        config = self._kv if read_mode is None else dataclasses.replace(self._kv, read_mode=read_mode)
        return make_cache(self.model, config, self._frozen_scales)

    def _forward(self, input_ids: torch.Tensor, cache: Any, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, logits_to_keep: int | None = None) -> torch.Tensor:
        """One forward that reads/extends ``cache``; returns logits ``[B, T, V]`` (the last
        ``logits_to_keep`` positions only, when given and the model supports it)."""
        kwargs: dict[str, Any] = {cache_kwarg_name(self.model): cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if logits_to_keep is not None and self._accepts_logits_to_keep():
            kwargs["logits_to_keep"] = logits_to_keep
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(input_ids=input_ids, use_cache=True, **kwargs)
        return out.logits

    def _accepts_logits_to_keep(self) -> bool:
        if not hasattr(self, "_logits_to_keep_ok"):
            self._logits_to_keep_ok = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep_ok

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """HFLM's batched generation (left-padded ``context``), through a fresh quantized cache
        that knows each row's padding (from ``attention_mask``), so a row generates what it would
        generate alone."""
        cache = self._fresh_cache()
        mask = generation_kwargs.get("attention_mask")
        if mask is not None and context.shape[0] > 1:
            lm_score.announce_padding(cache, _left_pads(mask))
        generation_kwargs[cache_kwarg_name(self.model)] = cache
        self.stats["generate_caches"] += 1
        with row_invariant_attention(self.model):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ loglikelihood
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """One forward through a fresh cache (HFLM's batch-size probing)."""
        if attn_mask is not None or labels is not None:  # seq2seq: no KV-cache semantics to apply
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self.stats["single_forwards"] += 1
        return self._forward(inps, self._fresh_cache(_SINGLE_FORWARD_READ_MODE.get(self.loglikelihood_mode)))

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """Score ``requests`` in the configured mode, batched and batch-invariant (lm_score.py)."""
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        keys = []
        rows: dict[tuple[tuple[int, ...], tuple[int, ...]], lm_score.Row] = {}
        for _, context, continuation in requests:
            prefix, chunk = self._split(context, continuation)
            key = (prefix, chunk, tuple(continuation))
            keys.append(key)
            if key not in self._score_memo:
                row = rows.setdefault((prefix, chunk), lm_score.Row(prefix, chunk))
                if key[2] not in row.conts:
                    row.conts.append(key[2])
        todo = list(rows.values())
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress or self.rank != 0,
                    desc=f"loglikelihood [{self._kv.label}, {self.loglikelihood_mode}]")
        if todo:
            size = lm_score.batch_size_for(self, requests) if override_bs is None or self.batch_size != "auto" \
                else max(1, int(override_bs))
            with row_invariant_attention(self.model):
                self._score_rows(todo, size, pbar)
        scored = sum(len(row.conts) for row in todo)
        for index, key in enumerate(keys):
            results[index] = self._score_memo[key]
            request_str = requests[index][0]
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, results[index])
        if len(requests) > scored:
            self.stats["memo_hits"] += len(requests) - scored
            pbar.update(len(requests) - scored)
        pbar.close()
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[lm_score.Row], size: int, pbar: Any) -> None:
        if self.loglikelihood_mode == "decode_faithful":
            self._score_memo.update(lm_score.decode_faithful(self, rows, size, pbar))
        else:
            read_mode = _SINGLE_FORWARD_READ_MODE[self.loglikelihood_mode]
            self._score_memo.update(lm_score.single_forward(self, rows, size, read_mode, pbar))

    def _split(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix to prefill, chunk whose steps score ``continuation``), after HFLM's truncation."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise ValueError("loglikelihood needs a non-empty context and a continuation within max_length")
        inp = (context + continuation)[-(self.max_length + 1):][:-1]
        cut = len(inp) - len(continuation)
        return tuple(inp[:cut]), tuple(inp[cut:])

    # ------------------------------------------------------------------ bookkeeping
    def get_model_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().get_model_info() if isinstance(self.pretrained, str) else {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
        }
        info.update(kv=self._kv.label, loglikelihood_mode=self.loglikelihood_mode)
        return info


def _left_pads(mask: torch.Tensor) -> list[int]:
    """Leading zeros of each row of a left-padded attention mask ``[B, T]``."""
    return [int(n) for n in (mask.cumsum(-1) == 0).sum(-1).tolist()]


def lm_eval_cli(argv: list[str] | None = None) -> None:
    """Run lm-eval's own CLI with ``--model nvfp4kv`` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    from nvfp4kv.eval import lm as _registered  # noqa: F401  (registers the class under "nvfp4kv")

    _registered.lm_eval_cli()
