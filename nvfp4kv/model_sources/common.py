"""Shared by the fetch steps: the error type, the file hash, the atomic JSON writer, the logger hook."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from nvfp4kv.errors import NVFP4KVError
from nvfp4kv.results import atomic_write_text

_CHUNK = 8 << 20


class FetchError(NVFP4KVError, RuntimeError):
    """A fetch step failed; the message names the fix (delete a file, check pip, ...)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written with :func:`nvfp4kv.results.atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)
