"""lm-eval model class ``nvfp4kv``: a HuggingFace causal LM whose KV cache is quantized.

lm-eval's :class:`~lm_eval.models.huggingface.HFLM` never uses a KV cache for scoring
(loglikelihood is one cache-less forward) and lets ``generate`` build its own cache. Both paths
would silently ignore the KV format under test, so :class:`KVQuantLM` routes every forward through
a fresh :func:`nvfp4kv.cache.make_cache` cache:

* **Generation** (``generate_until``: GSM8K, passkey-style tasks): ``_model_generate`` hands
  ``model.generate`` a *fresh* quantized cache per call (a reused cache would continue from the
  previous prompt). The prompt is prefilled and every generated token decodes against the cache,
  with reads as the cache's ``read_mode`` says.

* **Loglikelihood** (multiple choice: MMLU), three modes, because "which attention reads see
  quantized K/V" is a real choice that changes the answer:

  ``decode_faithful`` (default)
      The context (all but its last token) is prefilled into the quantized cache; then the last
      context token plus the continuation (minus its last token) run as *one* forward against that
      cache, and those logits score the continuation. So the first continuation token is predicted
      by a step that reads the stored context back from the cache, exactly as a server answering a
      cached prompt would. Under ``read_mode='serving'`` a single-token chunk (MMLU's " A") is a
      decode step reading everything dequantized, and a multi-token chunk sees the prefix
      dequantized and its own K/V raw (chunked-prefill semantics). Use this to measure what users
      of a quantized-KV server experience. Batch 1, no padding.

  ``all_quantized``
      One forward over context+continuation through a cache with ``read_mode='quantized'``: every
      attention read, including within the prompt, sees dequantized K/V (SGLang's FP4 MHA pool
      semantics; the same as fake-quantizing K/V after RoPE). The pessimistic bound.

  ``raw_prefill``
      One forward through a cache with ``read_mode='serving'``: the whole sequence is a single
      prefill chunk reading its own raw K/V, so **the KV format has no effect at all**. This is
      what HF's ``QuantizedCache`` does for single-forward scoring. Use it only as a control (it
      must equal BF16) or to reproduce numbers from harnesses built on that behaviour.

  For the two single-forward modes ``batch_size > 1`` right-pads; pad rows then reach the cache
  and can move per-tensor dynamic scales, so keep ``batch_size=1`` for comparable numbers.

Memoization (decode_faithful): requests are grouped by their prefilled prefix so each distinct
context (e.g. an MMLU question shared by its four choices) is prefilled once; requests that also
share the scored chunk (all four MMLU choices: the chunk is the context's last token) share one
forward. When one context has several distinct chunks, the prefilled cache is **deep-copied** for
each chunk but the last (which consumes the original). We copy rather than ``crop`` because a
quantized layer's state is not only its tokens (dynamic scales, residual windows); a copy is
exact by construction, and re-running the prefill would multiply the cost by the number of
choices. Scores are memoized per (prefix, chunk, continuation) until :meth:`KVQuantLM.set_kv`.

Log-softmax runs in float32 in every mode unless ``softmax_dtype`` says otherwise (HFLM's default
is the logits' dtype, i.e. BF16, which rounds log-probs to ~3 significant digits).

CLI: ``lm_eval`` does not discover external model classes, so run it through this module:
``python -m nvfp4kv.eval.lm --model nvfp4kv --model_args pretrained=<dir|hub id|embedded:...>,kv=nvfp4
--device cpu --tasks gsm8k``. ``kv`` takes a format name for both K and V (``nvfp4``) or
``k=fp8_e4m3;v=nvfp4`` (``;``-separated, because lm-eval splits model_args on commas), plus any
other :class:`~nvfp4kv.cache.KVCacheConfig` field (``k=fp8_e4m3;v=nvfp4;read_mode=quantized``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from nvfp4kv.cache import KVCacheConfig, cache_kwarg_name, make_cache
from nvfp4kv.cache.first_batch import FrozenScales
from nvfp4kv.eval import prefill_share
from nvfp4kv.errors import ConfigError

LoglikelihoodMode = Literal["decode_faithful", "all_quantized", "raw_prefill"]
LOGLIKELIHOOD_MODES: tuple[str, ...] = get_args(LoglikelihoodMode)

#: read_mode forced by the single-forward loglikelihood modes (decode_faithful keeps the config's)
_SINGLE_FORWARD_READ_MODE = {"all_quantized": "quantized", "raw_prefill": "serving"}

_FORMAT_KEYS = {"k": "k_format", "v": "v_format"}

# (request string or None for rolling windows, context tokens, continuation tokens)
Request = tuple[tuple[str, str] | None, list[int], list[int]]


def parse_kv(kv: KVCacheConfig | Mapping[str, Any] | str | None) -> KVCacheConfig:
    """Accept a config object, its ``to_dict()`` form, or a compact string.

    Strings: ``"nvfp4"`` (both K and V), ``"k=fp8_e4m3,v=nvfp4"`` (``,`` or ``;`` separated), and
    any ``field=value`` of :class:`KVCacheConfig` (values parsed as YAML scalars/lists).
    """
    if kv is None:
        return KVCacheConfig(k_format="bf16", v_format="bf16")
    if isinstance(kv, KVCacheConfig):
        return kv
    if isinstance(kv, Mapping):  # a dict, a to_dict() record, or a Hydra DictConfig
        return KVCacheConfig.from_dict(kv)
    if not isinstance(kv, str):
        raise ConfigError(f"kv must be a KVCacheConfig, a dict or a string like 'nvfp4'; got {type(kv).__name__}.")
    field_names = {f.name for f in dataclasses.fields(KVCacheConfig)}
    values: dict[str, Any] = {}
    for item in (part.strip() for part in re.split(r"[;,]", kv)):
        if not item:
            continue
        if "=" not in item:
            values["k_format"] = values["v_format"] = item
            continue
        key, raw = (s.strip() for s in item.split("=", 1))
        key = _FORMAT_KEYS.get(key, key)
        if key not in field_names:
            raise ConfigError(
                f"Unknown KV config key {key!r} in kv={kv!r}; use k=<format>, v=<format> or one of "
                f"{sorted(field_names)}."
            )
        values[key] = raw if key in ("k_format", "v_format") else yaml.safe_load(raw)
    if "k_format" not in values or "v_format" not in values:
        raise ConfigError(f"kv={kv!r} names no format for K and V; write e.g. kv=nvfp4 or kv=k=fp8_e4m3;v=nvfp4.")
    return KVCacheConfig(**values)


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
    ``stats`` counts forwards (``prefill_forwards``, ``chunk_forwards``, ``single_forwards``,
    ``generate_caches``, ``memo_hits``) so tests and logs can verify the cache is really used.
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

    def _forward(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """One forward that reads/extends ``cache``; returns logits ``[B, T, V]``."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(input_ids=input_ids, use_cache=True, **{cache_kwarg_name(self.model): cache})
        return out.logits

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        generation_kwargs[cache_kwarg_name(self.model)] = self._fresh_cache()
        self.stats["generate_caches"] += 1
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ loglikelihood
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Single-forward scoring (all_quantized / raw_prefill, and batch-size probing)."""
        if attn_mask is not None or labels is not None:  # seq2seq: no KV-cache semantics to apply
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self.stats["single_forwards"] += 1
        return self._forward(inps, self._fresh_cache(_SINGLE_FORWARD_READ_MODE.get(self.loglikelihood_mode)))

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.loglikelihood_mode != "decode_faithful" or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return self._decode_faithful_loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _split(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix to prefill, chunk whose logits score ``continuation``), after HFLM's truncation."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise ValueError("loglikelihood needs a non-empty context and a continuation within max_length")
        inp = (context + continuation)[-(self.max_length + 1):][:-1]
        cut = len(inp) - len(continuation)
        return tuple(inp[:cut]), tuple(inp[cut:])

    def _decode_faithful_loglikelihood(self, requests: list[Request], disable_tqdm: bool) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # prefix -> chunk -> [(request index, continuation)]; insertion order keeps locality
        groups: dict[tuple[int, ...], dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]]] = defaultdict(dict)
        for index, (_, context, continuation) in enumerate(requests):
            prefix, chunk = self._split(context, continuation)
            groups[prefix].setdefault(chunk, []).append((index, tuple(continuation)))

        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress or self.rank != 0,
                    desc=f"loglikelihood [{self._kv.label}, decode_faithful]")
        for prefix, chunks in groups.items():
            todo = {chunk: items for chunk, items in chunks.items()
                    if any((prefix, chunk, cont) not in self._score_memo for _, cont in items)}
            prefilled = self._prefill(prefix) if todo else None
            for position, (chunk, items) in enumerate(todo.items()):
                last_use = position == len(todo) - 1
                cache = prefilled if last_use else copy.deepcopy(prefilled)
                self._score_chunk(prefix, chunk, [cont for _, cont in items], cache)
            for chunk, items in chunks.items():
                for index, cont in items:
                    results[index] = self._score_memo[(prefix, chunk, cont)]
                    if chunk not in todo:
                        self.stats["memo_hits"] += 1
                    request_str = requests[index][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, results[index])
                    pbar.update(1)
        pbar.close()
        assert all(r is not None for r in results), "every request is scored"
        return results  # type: ignore[return-value]

    def _prefill(self, prefix: tuple[int, ...]) -> Any:
        """A fresh cache holding ``prefix``. With ``share_prefill`` and a read mode under which the
        prefill is format-independent, a prefix already computed (by any KV format) is replayed
        into the cache instead of run again (exact: see nvfp4kv/eval/prefill_share.py)."""
        cache = self._fresh_cache()
        if not prefix:
            return cache
        store = (prefill_share.store_for(self.model)
                 if self.share_prefill and self._kv.read_mode in prefill_share.SHAREABLE_READ_MODES else None)
        writes = store.get(prefix) if store is not None else None
        if writes is not None:
            self.stats["prefill_replays"] += 1
            prefill_share.replay(cache, writes)
            return cache
        recorder = prefill_share.WriteRecorder() if store is not None else None
        cache.write_observer = recorder
        self.stats["prefill_forwards"] += 1
        try:
            self._forward(torch.tensor([prefix], dtype=torch.long, device=self.device), cache)
        finally:
            cache.write_observer = None
        if store is not None and recorder is not None:
            store.put(prefix, recorder.writes)
        return cache

    def _score_chunk(self, prefix: tuple[int, ...], chunk: tuple[int, ...],
                     continuations: Iterable[tuple[int, ...]], cache: Any) -> None:
        self.stats["chunk_forwards"] += 1
        logits = self._forward(torch.tensor([chunk], dtype=torch.long, device=self.device), cache)[0]
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        greedy = logprobs.argmax(dim=-1)
        for cont in continuations:
            # the chunk has exactly len(cont) tokens: row i predicts cont[i]
            target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
            score = float(logprobs.gather(1, target[:, None]).sum())
            is_greedy = bool((greedy == target).all())
            self._score_memo[(prefix, chunk, cont)] = (score, is_greedy)

    # ------------------------------------------------------------------ bookkeeping
    def get_model_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().get_model_info() if isinstance(self.pretrained, str) else {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
        }
        info.update(kv=self._kv.label, loglikelihood_mode=self.loglikelihood_mode)
        return info


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
