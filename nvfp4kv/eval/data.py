"""Where benchmark data comes from: the HuggingFace hub by default, a local directory when told.

Users with network read ``openai/gsm8k`` and ``cais/mmlu`` from the hub exactly as lm-eval's
built-in tasks do. Machines without network (CI here, air-gapped clusters) point the harness at a
directory laid out like the original releases::

    <data_dir>/gsm8k/{train,test}.jsonl              {"question": ..., "answer": "... #### N"}
    <data_dir>/mmlu/{dev,test}/<subject>_<split>.csv  no header: question,A,B,C,D,answer-letter

The directory comes from the ``NVFP4KV_DATA_DIR`` environment variable if set, else from the
``data_dir`` config key. The environment variable wins so that one machine-level setting (CI,
a cluster profile) redirects every sweep without editing configs. Nothing here copies data: the
generated lm-eval task YAMLs reference these files by absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvfp4kv.errors import DatasetNotFoundError

DATA_DIR_ENV = "NVFP4KV_DATA_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

_LAYOUT_HINT = (
    "Expected layout: <data_dir>/gsm8k/{train,test}.jsonl and "
    "<data_dir>/mmlu/{dev,test}/<subject>_<split>.csv (headerless: question,A,B,C,D,answer)."
)


def resolve_data_dir(configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data directory to use, or ``None`` for the hub.

    ``$NVFP4KV_DATA_DIR`` (non-empty) overrides ``configured``. A directory that is named but
    missing raises instead of silently falling back to the hub: a typo should not turn an
    offline run into a network run (or a hang).
    """
    env_value = os.environ.get(DATA_DIR_ENV, "").strip()
    chosen, source = (env_value, f"${DATA_DIR_ENV}") if env_value else (configured, "data_dir")
    if chosen in (None, ""):
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"Local data directory {path} (from {source}) does not exist. Fix the path, or unset "
            f"{DATA_DIR_ENV} / data_dir to read from the HuggingFace hub. {_LAYOUT_HINT}"
        )
    return path


def hub_is_offline() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid hub downloads."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_ENVS)


def hub_dataset_cached(dataset_id: str) -> bool:
    """Whether ``dataset_id`` may load offline: present in the hub or the ``datasets`` cache."""
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub_constants

    org_name = dataset_id.split("/")
    candidates = [
        Path(hub_constants.HF_HUB_CACHE) / ("datasets--" + "--".join(org_name)),
        Path(datasets_config.HF_DATASETS_CACHE) / "___".join(org_name),
    ]
    return any(path.is_dir() for path in candidates)


def offline_hub_error(dataset_id: str, cause: BaseException | None = None) -> DatasetNotFoundError:
    """The error to raise when a hub dataset is needed but the hub is unreachable/offline."""
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return DatasetNotFoundError(
        f"Dataset {dataset_id!r} must come from the HuggingFace hub, but the hub is offline or "
        f"unreachable{detail}. Set {DATA_DIR_ENV}=/path/to/data (or data_dir=...) to use local files. "
        f"{_LAYOUT_HINT}"
    )


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{what}: {path} does not exist. Put the file there, point {DATA_DIR_ENV} / data_dir at a "
            f"complete data directory, or unset both to read from the HuggingFace hub. {_LAYOUT_HINT}"
        )
    return path


def gsm8k_files(data_dir: Path) -> dict[str, Path]:
    """Absolute paths of the local GSM8K splits (``train`` is the few-shot pool)."""
    return {
        split: _require_file(data_dir / "gsm8k" / f"{split}.jsonl", f"GSM8K {split} split")
        for split in ("train", "test")
    }


def mmlu_files(data_dir: Path, subject: str) -> dict[str, Path]:
    """Absolute paths of one MMLU subject's ``dev`` (few-shot pool) and ``test`` CSVs."""
    return {
        split: _require_file(data_dir / "mmlu" / split / f"{subject}_{split}.csv", f"MMLU {subject} {split} split")
        for split in ("dev", "test")
    }


def local_mmlu_subjects(data_dir: Path) -> list[str]:
    """Subjects present in a local MMLU directory (those with a test CSV)."""
    test_dir = data_dir / "mmlu" / "test"
    if not test_dir.is_dir():
        raise DatasetNotFoundError(f"MMLU test directory {test_dir} does not exist. {_LAYOUT_HINT}")
    return sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
