"""The ``task_cfg`` of an ``lm_eval`` cell: its allowed keys and the validated :class:`LmEvalTaskConfig`."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nvfp4kv.config.schema import task_family_keys
from nvfp4kv.errors import ConfigError
from nvfp4kv.eval.task_checks import check_num_fewshot, check_sampling

#: task_cfg keys this runner reads (others, like ``kind``/``name``, belong to the runner): the fields of
#: the ``lm_eval`` schema (nvfp4kv/config/schema.py, LmEvalTaskSchema), the one list of them
TASK_CONFIG_KEYS = task_family_keys("lm_eval")


def to_plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig (also nested) as plain dicts/lists (closed choices as strings),
    so lm-eval and JSON see ordinary containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class LmEvalTaskConfig:
    """The validated ``task_cfg`` of an ``lm_eval`` cell."""

    name: str
    lm_eval_task: str
    num_fewshot: int | None = None
    metrics: tuple[str, ...] | None = None
    gen_kwargs: dict[str, Any] | None = None
    subjects: tuple[str, ...] | None = None  # None = all (MMLU only)
    metadata: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    loglikelihood_mode: str = "decode_faithful"
    bootstrap_iters: int = 100000
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    batch_size: int = 1
    #: which documents ``limit`` takes per (sub)task: ``first`` N (lm-eval's limit) or a ``seeded`` draw
    sampling: str = "first"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> LmEvalTaskConfig:
        cfg = to_plain(dict(cfg))
        unknown = sorted(set(cfg) - set(TASK_CONFIG_KEYS))
        if unknown:
            hints = {k: difflib.get_close_matches(k, TASK_CONFIG_KEYS, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} -> did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ConfigError(f"Unknown key(s) {unknown} in lm_eval task config{f' ({hint})' if hint else ''}; "
                              f"allowed: {list(TASK_CONFIG_KEYS)}.")
        name = cfg.get("name") or cfg.get("lm_eval_task")
        if not name:
            raise ConfigError("An lm_eval task config needs `lm_eval_task:` (e.g. gsm8k, mmlu, niah_single_1).")
        subjects = cfg.get("subjects")
        if subjects in (None, "all", ["all"]):
            subjects = None
        elif isinstance(subjects, str):
            subjects = [subjects]
        metrics = cfg.get("metrics")
        return cls(
            name=str(name),
            lm_eval_task=str(cfg.get("lm_eval_task") or name),
            num_fewshot=check_num_fewshot(cfg.get("num_fewshot")),
            metrics=tuple(metrics) if metrics else None,
            gen_kwargs=dict(cfg["gen_kwargs"]) if cfg.get("gen_kwargs") else None,
            subjects=tuple(subjects) if subjects is not None else None,
            metadata=dict(cfg.get("metadata") or {}),
            data_dir=cfg.get("data_dir"),
            loglikelihood_mode=cfg.get("loglikelihood_mode", "decode_faithful"),
            bootstrap_iters=int(cfg.get("bootstrap_iters", 100000)),
            apply_chat_template=bool(cfg.get("apply_chat_template", False)),
            fewshot_as_multiturn=bool(cfg.get("fewshot_as_multiturn", False)),
            system_instruction=cfg.get("system_instruction"),
            batch_size=int(cfg.get("batch_size", 1)),
            sampling=check_sampling(cfg.get("sampling")),
        )
