"""The analysis notebooks run top to bottom on a generated results fixture, in this interpreter.

The notebooks are plain ``.ipynb`` files, edited directly (Jupyter, VS Code) and committed
without outputs; there is no generator. Each is executed with nbclient in a fresh kernel. The kernel must be *this* Python (CI
builds a fresh ``.venv``; a ``python3`` kernelspec elsewhere on the machine, e.g. in
``~/.local/share/jupyter``, could point at another interpreter without nvfp4kv), so a
kernelspec whose argv is ``sys.executable`` is written to a temporary ``JUPYTER_PATH``, which
Jupyter searches before the user and system locations, and the first test checks that the kernel
really runs ``sys.prefix``. ``$NVFP4KV_RESULTS`` points the notebooks at the fixture.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from fixtures_results import write_results_fixture

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for kernels: this interpreter's kernelspec first, repo importable, fixture results."""
    base = tmp_path_factory.mktemp("nb")
    spec_dir = base / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (nvfp4kv tests)", "language": "python",
    }))
    run_dir = write_results_fixture(base / "runs", with_report=False)
    return {
        "JUPYTER_PATH": os.pathsep.join([str(base / "jupyter"), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "NVFP4KV_RESULTS": str(run_dir),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }


def execute(nb: nbformat.NotebookNode, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run every cell in a fresh ``python3`` kernel (cwd = notebooks/); raises on the first error."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode, output_type: str | None = None) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if output_type is None or o.output_type == output_type]


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def test_kernel_is_this_interpreter(kernel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys, nvfp4kv; print(sys.prefix); print(nvfp4kv.__file__)"))
    text = outputs(execute(nb, kernel_env, monkeypatch), "stream")[0]["text"].splitlines()
    assert text[0] == sys.prefix
    assert Path(text[1]).resolve().is_relative_to(REPO)


#: every committed notebook -> the test that executes it (a new notebook must get one)
EXECUTED_BY = {
    "01_overview.ipynb": "test_overview_notebook_runs_on_fixture",
    "02_error_anatomy.ipynb": "test_error_anatomy_notebook_runs_on_the_embedded_model",
    "03_long_context.ipynb": "test_long_context_notebook_runs_on_fixture",
}


def test_committed_notebooks_are_valid_without_outputs_and_each_is_executed() -> None:
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(EXECUTED_BY), "a notebook without an execution test (add it to EXECUTED_BY)"
    assert all(callable(globals().get(test)) for test in EXECUTED_BY.values())
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), f"{name}: clear its outputs before committing"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "parameters" in first_code.metadata.get("tags", []), f"{name}: tag the first code cell 'parameters'"


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_overview_notebook_runs_on_fixture(kernel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute(_read("01_overview.ipynb"), kernel_env, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert kernel_env["NVFP4KV_RESULTS"] in text  # the parameter cell picked the fixture up
    markdown = [o["data"]["text/markdown"] for o in outputs(nb) if "text/markdown" in o.get("data", {})]
    assert any("Δ vs bf16" in m and "nvfp4" in m for m in markdown)
    assert images(nb) == 2  # accuracy per format, accuracy vs memory


def test_long_context_notebook_runs_on_fixture(kernel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute(_read("03_long_context.ipynb"), kernel_env, monkeypatch)
    assert images(nb) == 2  # heatmaps, accuracy vs length
    markdown = [o["data"]["text/markdown"] for o in outputs(nb) if "text/markdown" in o.get("data", {})]
    assert any("context_len" in m for m in markdown)


@pytest.mark.slow
def test_error_anatomy_notebook_runs_on_the_embedded_model(kernel_env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from nvfp4kv.models import embedded_model_dir

    embedded_model_dir()  # convert once here (CI's first use), so the kernel only loads it
    nb = execute(_read("02_error_anatomy.ipynb"), kernel_env, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "30 layers" in text and "nvfp4" in text
    assert images(nb) >= 6  # error histograms, SQNR heatmaps, SQNR by layer, channels, |K|/|V|, sweep SQNR
