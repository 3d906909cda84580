"""Run-directory housekeeping: an exclusive lock, and ``run.log``, the run's own account of itself.

Why a lock: cluster jobs (``hydra/launcher=submitit_slurm``, one job per shard of cells) write
into one run directory at once. Cells are one file each, written atomically, so they never
collide; the two steps that read-modify-write shared files (creating the identity, rebuilding
the report) hold this lock. It is a ``flock`` on the directory itself, so taking it creates
no file: a refused run leaves the directory byte for byte as it was.

Why our own log file rather than Hydra's: Hydra opens its job log in the output directory
before any check has run, so a refused resume would still append to it. ``run.log`` is opened
only once the run is accepted, and records each cell's start, end and duration and why the run
stopped (finished, failed, interrupted, refused), with the command that resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "run.log"
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (which must exist) for the ``with`` body."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[logging.Logger]:
    """Append every ``nvfp4kv`` log record to ``run_dir/run.log`` for the ``with`` body."""
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("nvfp4kv")
    previous_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()
