"""Render the README figures from a sweep run: ``python -m experiments.make_figures [RUN_DIR] [--out DIR]``.

Writes into ``results/figures/`` (by default):

- ``accuracy.png``: accuracy per KV format per task, 95% error bars;
- ``accuracy_vs_memory.png``: Δ accuracy vs BF16 over KV bits per element, paired 95% CIs;
- ``retrieval_heatmap.png``: pass-key retrieval over context length x needle depth per format;
- ``accuracy_by_length.png``: pass-key and RULER accuracy vs context length per format (long-context runs);
- ``layer_sqnr.png``: per-layer, per-KV-head SQNR of K and V per format (fidelity task).

``RUN_DIR`` may be a run dir, a parent of runs (merged) or a glob; default: the newest run under
``results/runs``. A figure whose data the run lacks (no passkey grid, no fidelity task) is
skipped with a note; the exit status is 1 only when nothing could be drawn. The figures are
:func:`nvfp4kv.analysis.figures` (the same functions as the run dir's ``plots/`` and the notebooks);
this script only names their files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nvfp4kv import analysis as A
from nvfp4kv.analysis.runs import find_repo_root

#: the README's figure folder, wherever the script is started from inside the repo
DEFAULT_OUT = (find_repo_root() or Path.cwd()) / "results" / "figures"
#: standard figure (nvfp4kv.analysis.report.FIGURES) -> README file name
FILES = {"accuracy": "accuracy.png", "delta_vs_bits": "accuracy_vs_memory.png",
         "retrieval": "retrieval_heatmap.png", "by_length": "accuracy_by_length.png", "layers": "layer_sqnr.png"}


def make_figures(spec: str | Path, out: Path = DEFAULT_OUT, *, baseline: str = "bf16", n_boot: int = 2000,
                 dpi: int = 150) -> dict[str, Path]:
    """Draw every figure the run has data for into ``out``; returns {file name: path written}."""
    drawn = A.figures(A.load_cells(spec), FILES, baseline=baseline, n_boot=n_boot)
    written: dict[str, Path] = {}
    for name, file_name in FILES.items():
        if name not in drawn:
            print(f"skipped {file_name}: no data for it in {spec}", file=sys.stderr)
            continue
        written[file_name] = A.save_figure(drawn[name], out / file_name, dpi=dpi)
        print(f"wrote {written[file_name]}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="run dir, parent of runs, or glob (default: newest run under results/runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--baseline", default="bf16", help="KV label the Δ is measured against")
    parser.add_argument("--n-boot", type=int, default=2000, help="paired-bootstrap resamples")
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args(argv)
    spec = args.run_dir or A.default_results_path()
    written = make_figures(spec, args.out, baseline=args.baseline, n_boot=args.n_boot, dpi=args.dpi)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
