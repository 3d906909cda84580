"""The typed schemas of every config: the run, the model, a KV setting, each built-in task kind, the sweep.

Registered in Hydra's ConfigStore (:mod:`nvfp4kv.config.store`), so a config file that starts from
one (``defaults: [_schema, _self_]`` in ``configs/kv/``, ``[_lm_eval, _self_]`` in ``configs/task/``,
``[_run, _self_]`` in ``configs/config.yaml``) is typed when Hydra composes it: OmegaConf refuses
a value of the wrong type, a value outside a closed choice (naming the allowed ones) and an unknown
key, at compose time, before anything heavy is imported. The YAML files hold values only; the
defaults are here.

Closed choices come from :mod:`nvfp4kv.config.choices` (also used by ``KVCacheConfig``). What
OmegaConf cannot express (ranges, KV format names, which keys a task of a custom kind takes) is
checked right after composition by :func:`nvfp4kv.config.check.check_config`, still without torch.
Deeper checks (data files, task names in lm-eval's registry, the model's location, what a format
accepts as options) stay in ``nvfp4kv.eval.plan``.

Task fields other than ``kind`` default to MISSING, i.e. "not given": the key is dropped from the
resolved config (:func:`nvfp4kv.config.check.resolve_config`) and the task family's own default
applies, so a task's recorded config holds exactly the keys its YAML and overrides set.

This module imports only the standard library, omegaconf and :mod:`nvfp4kv.config.choices`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from nvfp4kv.config.choices import (
    BackendChoice,
    LmEvalSamplingChoice,
    LoglikelihoodModeChoice,
    ModelDtypeChoice,
    NonFiniteChoice,
    ReadModeChoice,
    ScalePolicyChoice,
)

# NOTE: annotations use typing's Optional/Dict/List (OmegaConf reads them at runtime on Python 3.10).
# A mapping that may be null is typed Any: OmegaConf 2.3 cannot apply a command-line override to an
# Optional[Dict] node whose value is null (`kvs.nvfp4.static_scales={0: [..]}` fails with an
# AttributeError); KVCacheConfig and the task families check those values. A list field that also
# takes a single value (`tasks.ruler.lengths=4096`, `kvs.x.skip_layers=3`) is Any for the same reason:
# a List node refuses a scalar.


@dataclass
class KVSchema:
    """One KV setting: every ``nvfp4kv.cache.KVCacheConfig`` field, with the defaults a KV config of
    ``configs/kv/`` starts from (K and V in BF16, the CPU fast path on; ``KVCacheConfig`` explains
    each field). ``configs/kv/<name>.yaml`` states only what differs."""

    k_format: str = "bf16"  # a registered format name: nvfp4kv.config.choices.known_formats()
    v_format: str = "bf16"
    k_options: Dict[str, Any] = field(default_factory=dict)
    v_options: Dict[str, Any] = field(default_factory=dict)
    # prefill (research: each request's own amax) | static (calibrated: static_scales or static_scales_file,
    # python -m experiments.calibrate) | checkpoint (k_scale/v_scale tensors of checkpoint_scales, default
    # the model's directory) | first_batch (vLLM calculate_kv_scales; first_batch_divisors=[200,100] for
    # vLLM's constants) | unit (1.0: vLLM/SGLang without scales) | dynamic (per write). docs/engines.md.
    scale_policy: ScalePolicyChoice = ScalePolicyChoice["prefill"]  # type: ignore[valid-type]
    static_scales: Any = None  # {layer: [k_scale, v_scale]} in scale_convention (mapping; see the NOTE)
    scale_convention: str = "decode"
    static_scales_file: Optional[str] = None
    checkpoint_scales: Optional[str] = None
    first_batch_divisors: Optional[List[float]] = None
    # KIVI-style full-precision windows: newest residual_length tokens and first sink_tokens tokens.
    residual_length: int = 0
    sink_tokens: int = 0
    skip_layers: Any = field(default_factory=list)  # a list of layer indices (a single index also works)
    # serving (what a quantized-KV server does) | quantized (every read dequantized) | raw_fresh
    read_mode: ReadModeChoice = ReadModeChoice["serving"]  # type: ignore[valid-type]
    # Keep dequantized copies of stored tokens (CPU fast path). Identical outputs, more memory:
    # set false on a GPU running long contexts. (KVCacheConfig's own default is false.)
    dequant_cache: bool = True
    # raise (NaN/Inf in K/V stop the run) | map (NaN -> 0, Inf -> largest finite) | keep (research)
    nonfinite: NonFiniteChoice = NonFiniteChoice["raise"]  # type: ignore[valid-type]
    # torch = the bit-exact references; triton | flashinfer | auto need nvfp4kv.kernels and a GPU.
    backend: BackendChoice = BackendChoice["torch"]  # type: ignore[valid-type]
    # Store keys minus each sequence's per-channel prompt mean (research; attention is unchanged by a
    # shift common to all keys; nvfp4kv/cache/k_center.py). No engine does this.
    k_center: bool = False


@dataclass
class ModelSchema:
    """``nvfp4kv.models.ModelSpec``: what to load. ``configs/model/<name>.yaml`` names the model."""

    name_or_path: str = MISSING  # hub id, local HF directory, embedded:<name> or offline:<name>
    dtype: ModelDtypeChoice = ModelDtypeChoice["bfloat16"]  # type: ignore[valid-type]
    device: str = "${device}"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    label: Optional[str] = None  # short name in tables (default: the directory / source name)
    extra: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- tasks
#: task keys that belong to the runner, not to the task family (nvfp4kv.eval.plan.RUNNER_TASK_KEYS)
RUNNER_TASK_KEYS = ("limit", "module")


@dataclass
class LmEvalTaskSchema:
    """A task of kind ``lm_eval`` (``nvfp4kv.eval.lmeval_config.LmEvalTaskConfig``)."""

    kind: str = "lm_eval"
    name: Optional[str] = MISSING
    lm_eval_task: str = MISSING
    num_fewshot: Optional[int] = MISSING
    metrics: Optional[List[str]] = MISSING
    gen_kwargs: Any = MISSING  # a mapping or null (see the NOTE)
    subjects: Any = MISSING  # null / all = every MMLU subject, or a list (a single name also works)
    metadata: Any = MISSING  # a mapping or null (see the NOTE)
    data_dir: Optional[str] = MISSING
    loglikelihood_mode: Optional[LoglikelihoodModeChoice] = MISSING  # type: ignore[valid-type]
    bootstrap_iters: int = MISSING
    apply_chat_template: bool = MISSING
    fewshot_as_multiturn: bool = MISSING
    system_instruction: Optional[str] = MISSING
    batch_size: int = MISSING
    # first (lm-eval's limit: the first N documents of each (sub)task; the family default) | seeded (a
    # sorted draw of min(N, docs) per (sub)task, seeded by the run's seed and the subtask's name)
    sampling: Optional[LmEvalSamplingChoice] = MISSING  # type: ignore[valid-type]
    limit: Optional[int] = MISSING
    module: Optional[str] = MISSING


@dataclass
class PasskeyTaskSchema:
    """A task of kind ``passkey`` (``nvfp4kv.eval.passkey.PasskeyConfig``)."""

    kind: str = "passkey"
    name: Optional[str] = MISSING
    context_lengths: Any = MISSING  # list of token counts (a single one also works)
    depths: Any = MISSING  # list of needle depths in [0, 1]
    trials: int = MISSING
    digits: int = MISSING
    max_new_tokens: Optional[int] = MISSING
    haystack_dir: Optional[str] = MISSING
    needle: str = MISSING
    question: str = MISSING
    intro: str = MISSING
    limit: Optional[int] = MISSING
    module: Optional[str] = MISSING


@dataclass
class RulerTaskSchema:
    """A task of kind ``ruler`` (``nvfp4kv.eval.ruler.RulerConfig``)."""

    kind: str = "ruler"
    name: Optional[str] = MISSING
    subtasks: Any = MISSING  # list of lm-eval RULER task names (a single one also works)
    lengths: Any = MISSING  # list of total token counts (a single one also works)
    num_samples: int = MISSING
    max_gen_toks: Optional[int] = MISSING
    cache_dir: Optional[str] = MISSING
    haystack_dir: Optional[str] = MISSING
    record_prompts: bool = MISSING
    limit: Optional[int] = MISSING
    module: Optional[str] = MISSING


@dataclass
class FidelityTaskSchema:
    """A task of kind ``fidelity`` (``nvfp4kv.metrics.task.FidelitySettings``)."""

    kind: str = "fidelity"
    name: Optional[str] = MISSING
    context_lens: Any = MISSING  # list of prefix lengths
    n_score: Optional[int] = MISSING
    n_windows: Optional[int] = MISSING
    score_chunk: Optional[int] = MISSING
    greedy_prompts: Optional[int] = MISSING
    greedy_prompt_len: Optional[int] = MISSING
    greedy_tokens: Optional[int] = MISSING
    capture_tokens: Optional[int] = MISSING
    limit: Optional[int] = MISSING
    module: Optional[str] = MISSING


#: the schema of each built-in task kind; a task of any other kind is an open mapping (its family,
#: registered with nvfp4kv.eval.api.register_task_kind, checks its own keys)
TASK_SCHEMAS: dict[str, type] = {
    "lm_eval": LmEvalTaskSchema,
    "passkey": PasskeyTaskSchema,
    "ruler": RulerTaskSchema,
    "fidelity": FidelityTaskSchema,
}


def task_family_keys(kind: str) -> tuple[str, ...]:
    """The keys a built-in task family reads (``kind`` and ``name`` included, runner keys excluded)."""
    return tuple(f.name for f in dataclasses.fields(TASK_SCHEMAS[kind]) if f.name not in RUNNER_TASK_KEYS)


# ---------------------------------------------------------------------------- sweep, run
@dataclass
class SweepInfo:
    """``sweep:`` of a ``configs/sweep/<name>.yaml`` (its tasks and KV settings are the run's
    ``tasks:`` and ``kvs:``, placed with ``/task@tasks.<name>`` and ``/kv@kvs.<label>``)."""

    name: str = MISSING
    description: str = ""
    suite: Optional[str] = None  # the accuracy gate's suite name (configs/sweep/gate*.yaml)


@dataclass
class RunConfig:
    """``python -m experiments.run +sweep=<name>``: the run-wide keys, the model, and the sweep's
    tasks x KV settings (``configs/config.yaml`` starts from this)."""

    # The selected sweep's name (resolving it without a sweep raises the list of sweeps).
    sweep_name: str = "${nvfp4kv.sweep_name:}"
    # seconds + a random suffix, so two runs started in the same second never share a directory; in a
    # multirun each job appends `-<job number>`. `now` and `nvfp4kv.uid` are cached per config object.
    run_id: str = "${now:%Y%m%d-%H%M%S}-${nvfp4kv.uid:}${nvfp4kv.job_suffix:}"
    run_dir: str = "results/runs/${sweep_name}/${run_id}"
    # Local benchmark data (gsm8k/*.jsonl, mmlu/{dev,test}/*.csv); null reads the HuggingFace hub.
    # Default: $NVFP4KV_DATA_DIR, else a shared/data directory beside the checkout, else null (the hub).
    data_dir: Optional[str] = "${nvfp4kv.default_data_dir:}"
    # Documents per task (null = all); a task's own `limit:` wins. Same docs for every KV config: the first N,
    # or (an lm_eval task with `sampling: seeded`) a draw of N per (sub)task seeded by `seed`.
    limit: Optional[int] = None
    seed: int = 1234
    # How multiple-choice (loglikelihood) tasks read the KV cache (nvfp4kv/eval/lm.py explains each;
    # raw_prefill is a control that ignores the KV format).
    loglikelihood_mode: LoglikelihoodModeChoice = LoglikelihoodModeChoice["decode_faithful"]  # type: ignore[valid-type]
    device: str = "auto"  # auto = cuda when available, else cpu
    baseline: str = "bf16"  # KV label the table and paired statistics compare against
    progress: bool = True  # tqdm progress bars inside tasks (the cell-level bar is always shown)
    fail_fast: bool = True  # stop at the first failing cell, or log it, go on and fail at the end
    debug: bool = False  # tracebacks for user errors (bad overrides, missing data); by default one line
    # Cluster jobs: run only cells i with i % num_shards == shard, all into one run_dir under one identity.
    shard: int = 0
    num_shards: int = 1
    # Identity fields a resume may change on purpose (recorded in resumes.jsonl).
    allow_identity_change: List[str] = field(default_factory=list)
    # Sequences per forward: an integer >= 1, or "auto".
    batch_size: Any = 1
    # A serving-engine profile (configs/engine/<name>.yaml, docs/engines.md), applied to every KV setting
    # by nvfp4kv.engines.apply_engine; validated (one line naming the key) by nvfp4kv.engines.load_engine_profile.
    engine: Any = None
    model: ModelSchema = field(default_factory=ModelSchema)
    sweep: SweepInfo = MISSING  # appended with +sweep=<name>
    tasks: Dict[str, Any] = MISSING  # name -> task (typed by its kind's schema when it comes from configs/task/)
    kvs: Dict[str, Any] = MISSING  # label -> KV setting (KVSchema when it comes from configs/kv/)


@dataclass
class CalibrateConfig:
    """``python -m experiments.calibrate``: static KV scales from a calibration set (configs/calibrate.yaml)."""

    model: ModelSchema = field(default_factory=ModelSchema)
    kv: KVSchema = field(default_factory=KVSchema)  # only for the printed summary
    dataset: str = "gsm8k"  # gsm8k (its train split) or /path/to/texts.jsonl with a "text" field
    data_dir: Optional[str] = "${nvfp4kv.default_data_dir:}"
    n_samples: int = 64  # texts drawn (seeded) from the dataset, then packed into max_length windows
    max_length: int = 512  # tokens per calibration window
    seed: int = 1234
    device: str = "auto"
    output: Optional[str] = None  # null: results/scales/<model label>/<dataset>-n<n>-L<len>-s<seed>.json
    progress: bool = True
    debug: bool = False
