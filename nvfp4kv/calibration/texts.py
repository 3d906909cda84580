"""Calibration texts: a slice of a *training* split, packed into windows of ``max_length`` tokens.

Why a training split: scales fitted on the evaluation questions would leak the test set into the
quantizer (a small but real optimism). ModelOpt calibrates on cnn_dailymail/pile by default; we
default to GSM8K's train split because it is what this project can read offline (``../shared``,
a data_dir, the hub, or the packaged sample as a last resort), and any dataset a user prefers can
be given as a JSONL file of ``{"text": ...}`` rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError, DatasetNotFoundError

#: datasets this module knows how to read, with the split used and the fields joined into a text
KNOWN = {"gsm8k": ("openai/gsm8k", "train", ("question", "answer"))}


def _rows_gsm8k(data_dir: str | None) -> tuple[list[dict[str, Any]], str]:
    from nvfp4kv.eval.data import announce_sample, gsm8k_files, resolve_data_source

    source = resolve_data_source(data_dir, "openai/gsm8k")
    if source.kind == "hub":
        import datasets

        rows = list(datasets.load_dataset("openai/gsm8k", "main", split="train"))
        return rows, "hub:openai/gsm8k/main/train"
    assert source.root is not None
    path = gsm8k_files(source.root)["train"]
    if source.is_sample:
        announce_sample("gsm8k train (calibration)", sum(1 for _ in path.open()), source.origin)
    return [json.loads(line) for line in path.open() if line.strip()], f"{source.label}:gsm8k/train.jsonl"


def calibration_texts(dataset: str, data_dir: str | None, n_samples: int, seed: int) -> tuple[list[str], str]:
    """``n_samples`` texts drawn (seeded, without replacement) from ``dataset``; and where they came from.

    ``dataset`` is ``gsm8k`` (its train split) or a path to a JSONL file with a ``text`` field.
    """
    if n_samples < 1:
        raise ConfigError(f"calibration n_samples must be >= 1; got {n_samples}. Set n_samples=64 (or more).")
    if dataset in KNOWN:
        rows, origin = _rows_gsm8k(data_dir)
        fields = KNOWN[dataset][2]
        texts = ["\n".join(str(row[f]) for f in fields) for row in rows]
    else:
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise DatasetNotFoundError(f"calibration dataset {dataset!r} is neither a known name ({', '.join(KNOWN)}) "
                                       f"nor a JSONL file; give dataset=gsm8k or dataset=/path/to/texts.jsonl.")
        texts = [str(json.loads(line)["text"]) for line in path.open() if line.strip()]
        origin = f"file:{path.resolve()}"
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n_samples]], origin


def pack_windows(token_lists: list[list[int]], max_length: int) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into windows of ``max_length`` tokens.

    Why pack: scales must cover the K/V of *long* positions too (RoPE rotates keys, so amax grows
    with position in some heads); one window per short text would calibrate only short contexts.
    The last partial window is kept if it holds at least a quarter of ``max_length``.
    """
    stream = [t for tokens in token_lists for t in tokens]
    windows = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
    return [w for w in windows if len(w) >= max(1, max_length // 4)] or ([stream] if stream else [])
