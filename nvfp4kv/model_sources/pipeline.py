"""``fetch(name)``: download, assemble, verify, convert and record, each step skipping done work."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from nvfp4kv.model_sources.assembly import assemble
from nvfp4kv.model_sources.cache import converted_dir, is_complete, model_cache_dir
from nvfp4kv.model_sources.common import FetchError, _atomic_write_json, _say, sha256_file
from nvfp4kv.model_sources.convert import Converter, convert_gguf
from nvfp4kv.model_sources.download import Downloader, download_wheels, pip_download
from nvfp4kv.model_sources.gguf_inspect import check_against_gguf, inspect_gguf
from nvfp4kv.model_sources.provenance import HF_PROVENANCE_FILE, PROVENANCE_FILE, _versions, read_provenance
from nvfp4kv.model_sources.registry import describe_weight_types, get_source


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
