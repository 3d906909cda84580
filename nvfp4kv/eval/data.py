"""Where benchmark data comes from, decided once per task and recorded with every cell.

Resolution order (:func:`resolve_data_source`), first match wins:

1. ``$NVFP4KV_DATA_DIR`` (non-empty), else the task's ``data_dir`` key: a local directory. Named
   but missing is an error, never a silent fall-back (a typo should not turn an offline run into
   a network run, or a hang).
2. A ``shared/data`` directory beside the checkout (:func:`shared_data_dir`), how this project's
   CI and offline machines keep the full data.
3. The HuggingFace hub (``openai/gsm8k``, ``cais/mmlu``), exactly as lm-eval's built-in tasks read
   it, when it is online, or offline with the dataset already in the local cache.
4. The embedded sample (:data:`SAMPLE_DIR`): a few dozen MIT-licensed rows of GSM8K and of three
   MMLU subjects shipped as package data, so a fresh clone runs the quick start with no network.
   Used only when the hub is offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) or unreachable
   (one HEAD request, 2 s at most, once per process). One warning line says so; cells record
   ``data_source: embedded-sample``. Quick start and tests only: never for published numbers.

A local directory (and the sample) is laid out like the original releases::

    <data_dir>/gsm8k/{train,test}.jsonl              {"question": ..., "answer": "... #### N"}
    <data_dir>/mmlu/{dev,test}/<subject>_<split>.csv  no header: question,A,B,C,D,answer-letter

Nothing here copies data: the generated lm-eval task YAMLs reference these files by absolute
path. :func:`files_sha256` fingerprints the files a task reads, for the run identity.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nvfp4kv.errors import DatasetNotFoundError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "NVFP4KV_DATA_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
#: the embedded quick-start sample (same layout as a data directory); see its PROVENANCE.md
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
#: what a cell records as its data source when it read the embedded sample
SAMPLE_SOURCE = "embedded-sample"
#: seconds the one hub reachability probe may take
HUB_PROBE_TIMEOUT_S = 2.0

_LAYOUT_HINT = (
    "Expected layout: <data_dir>/gsm8k/{train,test}.jsonl and "
    "<data_dir>/mmlu/{dev,test}/<subject>_<split>.csv (headerless: question,A,B,C,D,answer)."
)
#: the fix when only the embedded sample is available and it is not enough
SAMPLE_FIX = (
    f"set {DATA_DIR_ENV}=/path/to/data (or data_dir=...) for the full data, "
    f"or go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
)


# ---------------------------------------------------------------------------- directories
def resolve_data_dir(configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The explicitly configured local data directory, or ``None`` when none is configured.

    ``$NVFP4KV_DATA_DIR`` (non-empty) overrides ``configured``. A directory that is named but
    missing raises instead of silently falling back to the hub: a typo should not turn an
    offline run into a network run (or a hang). :func:`resolve_data_source` goes on from ``None``.
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


def shared_data_dir() -> Path | None:
    """``shared/data`` beside this checkout (``<checkout>/../shared/data``) if it exists, else None.

    An offline machine set up like this project's CI keeps the full benchmark data there; finding
    it lets the quick start run on the real data with no extra setup. (For an installed wheel the
    path points into the Python installation and does not exist.)
    """
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside if beside.is_dir() else None


# ---------------------------------------------------------------------------- the hub
def hub_is_offline() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid hub downloads."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_ENVS)


def hub_endpoint() -> str:
    """The hub URL ``datasets`` talks to (``$HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover - a dependency of datasets
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=4)
def _probe(url: str, timeout: float) -> bool:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - a fixed https URL
            return True
    except urllib.error.HTTPError:  # the server answered (401/404/...): reachable
        return True
    except (urllib.error.URLError, OSError, ValueError):  # DNS, refused, timeout, bad proxy
        return False


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers: False at once when offline by environment, else one HEAD request
    (honours proxy variables; ``timeout`` seconds at most), remembered for the process."""
    if hub_is_offline():
        return False
    return _probe(hub_endpoint() + "/api/datasets", timeout)


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


# ---------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class DataSource:
    """Where one task's data comes from.

    ``kind``: ``dir`` (a local directory), ``hub`` or ``sample`` (the embedded sample, whose
    ``root`` is :data:`SAMPLE_DIR`). ``origin`` says why, for messages: ``$NVFP4KV_DATA_DIR``,
    ``data_dir``, ``shared/data beside the checkout``, ``hub``, or why the hub was not usable.
    """

    kind: str
    root: Path | None
    origin: str

    @property
    def label(self) -> str:
        """What cells record as ``data_source``: ``hub``, ``local:<dir>`` or ``embedded-sample``."""
        if self.kind == "hub":
            return "hub"
        if self.kind == "sample":
            return SAMPLE_SOURCE
        return f"local:{self.root}"

    @property
    def is_sample(self) -> bool:
        return self.kind == "sample"


def _hub_unusable_reason(dataset_id: str) -> str | None:
    """None if ``dataset_id`` can be read from the hub (online, or offline but cached), else why not."""
    if hub_is_offline():
        reason = "the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
    elif hub_reachable():
        return None
    else:
        reason = f"the hub ({hub_endpoint()}) is unreachable"
    return None if hub_dataset_cached(dataset_id) else reason


def resolve_data_source(configured: str | os.PathLike[str] | None, dataset_id: str) -> DataSource:
    """Where ``dataset_id`` (``openai/gsm8k``, ``cais/mmlu``) comes from; the module docstring has
    the order. Cheap to repeat: env/filesystem checks, and at most one network probe per process."""
    explicit = resolve_data_dir(configured)
    if explicit is not None:
        origin = f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV, "").strip() else "data_dir"
        return DataSource("dir", explicit, origin)
    beside = shared_data_dir()
    if beside is not None:
        return DataSource("dir", beside, "shared/data beside the checkout")
    reason = _hub_unusable_reason(dataset_id)
    if reason is None:
        return DataSource("hub", None, "hub")
    return DataSource("sample", SAMPLE_DIR, f"{reason} and no data directory is set")


_ANNOUNCED: set[str] = set()


def announce_sample(dataset: str, n_rows: int, why: str) -> None:
    """The one line (per dataset and process) saying a run reads the embedded sample."""
    if dataset in _ANNOUNCED:
        return
    _ANNOUNCED.add(dataset)
    log.warning("nvfp4kv: using the embedded %d-row sample of %s (quick start/tests only; not for published "
                "numbers): %s; set %s=/path/to/data for the full data.", n_rows, dataset, why, DATA_DIR_ENV)


# ---------------------------------------------------------------------------- files
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


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=1024)
def _count_rows(key: tuple[str, int, int]) -> int:
    path = Path(key[0])
    if path.suffix == ".csv":  # quoted fields may hold newlines: count records, not lines
        with path.open(newline="", encoding="utf-8") as handle:
            return sum(1 for row in csv.reader(handle) if row)
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def count_rows(path: Path) -> int:
    """Documents in a ``.jsonl`` (non-empty lines) or headerless ``.csv`` (records) file; memoized
    by path, size and mtime."""
    return _count_rows(_stat_key(path))


@functools.lru_cache(maxsize=1024)
def _file_sha256(key: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: Iterable[Path], root: Path | None = None) -> str:
    """One SHA-256 over the files a task reads: each file's path (relative to ``root`` when
    given, so the same data in another directory hashes the same) and content hash, in sorted
    order. Memoized per file by size and mtime, so repeating it costs stat calls."""
    entries = []
    for path in paths:
        name = path.relative_to(root).as_posix() if root is not None else path.as_posix()
        entries.append(f"{name}\0{_file_sha256(_stat_key(path))}\n")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def sample_mmlu_subjects() -> list[str]:
    """The MMLU subjects the embedded sample has."""
    return local_mmlu_subjects(SAMPLE_DIR)
