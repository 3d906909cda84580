"""Calling lm-eval's RULER generators under control: seeded, capped at the samples used, offline."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from nvfp4kv.errors import ConfigError
from nvfp4kv.eval.ruler_haystack import essay_dir, essay_haystack, sentence_splitter
from nvfp4kv.eval.ruler_specs import _SAMPLERS, get_spec, ruler_module

_PROBE = "The quick brown fox. It jumps over 1234567 lazy dogs!\nVAR ABCDE = 12345 ... 3f2a-uuid"
_LOCK = threading.RLock()


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
                           f"nvfp4kv.eval.ruler_generate needs updating for this lm-eval version.")
    if ("essay" in haystacks) != spec.uses_essays:
        raise RuntimeError(f"lm-eval's {task} {'uses' if 'essay' in haystacks else 'does not use'} the essay haystack, "
                           f"contrary to ESSAY_TASKS; update nvfp4kv.eval.ruler_specs.ESSAY_TASKS.")
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
