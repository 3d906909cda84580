"""Test-session environment: offline hub, Triton interpreter on CPU, local data.

Set here (before any test module imports triton or datasets) so that the README's test
command is just ``python -m pytest -q`` and behaves the same in CI and on a laptop.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # Triton kernels run under the interpreter whenever there is no GPU (CI, laptops).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("NVFP4KV_DATA_DIR", str(SHARED_DATA))


# ---------------------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def bundle():
    """The embedded offline model (SmolLM2-135M-Instruct) on the CPU, loaded once per module."""
    from nvfp4kv.models import load_model

    return load_model({"device": "cpu"})


@pytest.fixture(scope="module")
def lm(bundle):
    """Our lm-eval model over ``bundle`` with BF16 KV."""
    from nvfp4kv.eval.lm import KVQuantLM

    return KVQuantLM.from_bundle(bundle, "bf16", progress=False)
