"""What lm-eval's own YAMLs say about its synthetic RULER tasks, and importing their generator modules."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from nvfp4kv.errors import ConfigError

#: lm-eval's sampler per generator module: called with ``num_samples`` capped at what is used
_SAMPLERS = {"niah_utils": "generate_samples", "vt_utils": "sys_vartrack_w_noise_random",
             "cwe_utils": "sys_word_pair_random", "fwe_utils": "sys_kwext"}
#: lm-eval RULER tasks whose haystack is the Paul Graham essays (checked against the generator's
#: own ``get_haystack`` calls at generation time)
ESSAY_TASKS = frozenset({"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"})


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

        from nvfp4kv.eval.ruler_haystack import _nltk_punkt_installed  # here: ruler_haystack imports this module

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
