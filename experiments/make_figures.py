"""Render the README figures from a sweep run: ``python -m experiments.make_figures [RUN_DIR] [--out DIR]``.

Writes into ``results/figures/`` (by default):

- ``accuracy.png``: accuracy per KV format per task, 95% error bars;
- ``accuracy_vs_memory.png``: Δ accuracy vs BF16 over KV bits per element, paired 95% CIs;
- ``retrieval_heatmap.png``: pass-key retrieval over context length x needle depth per format;
- ``layer_sqnr.png``: per-layer, per-KV-head SQNR of K and V per format (fidelity task).

``RUN_DIR`` may be a run dir, a parent of runs (merged) or a glob; default: the newest run under
``results/runs``. A figure whose data the run lacks (no passkey grid, no fidelity task) is
skipped with a note; the exit status is 1 only when nothing could be drawn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from nvfp4kv import analysis as A
from nvfp4kv.analysis.runs import find_repo_root
from nvfp4kv.results import save_figure

#: the README's figure folder, wherever the script is started from inside the repo
DEFAULT_OUT = (find_repo_root() or Path.cwd()) / "results" / "figures"


def figure_builders(spec: str | Path, baseline: str, n_boot: int) -> dict[str, Callable[[], Figure | None]]:
    """File name -> a function drawing it (``None`` when the run has no data for it)."""
    df = A.load_results(spec)

    def accuracy() -> Figure | None:
        return A.plot_accuracy(df) if not A.primary_rows(A.accuracy_rows(df)).empty else None

    def accuracy_vs_memory() -> Figure | None:
        cmp = A.compare(df, baseline=baseline, samples=A.load_samples(spec), n_boot=n_boot)
        rows = A.primary_rows(A.accuracy_rows(cmp))
        return A.plot_delta_vs_bits(cmp, baseline=baseline) if rows["delta"].notna().any() else None

    def retrieval_heatmap() -> Figure | None:
        grid = A.load_grid(spec)
        return A.plot_retrieval_heatmaps(grid) if not grid.empty else None

    def layer_sqnr() -> Figure | None:
        per_layer = A.load_per_layer(spec)
        return A.plot_layer_sqnr(per_layer) if per_layer["sqnr_db"].notna().any() else None

    return {
        "accuracy.png": accuracy,
        "accuracy_vs_memory.png": accuracy_vs_memory,
        "retrieval_heatmap.png": retrieval_heatmap,
        "layer_sqnr.png": layer_sqnr,
    }


def make_figures(spec: str | Path, out: Path = DEFAULT_OUT, *, baseline: str = "bf16", n_boot: int = 2000,
                 dpi: int = 150) -> dict[str, Path]:
    """Draw every figure the run has data for into ``out``; returns {file name: path written}."""
    written: dict[str, Path] = {}
    for name, build in figure_builders(spec, baseline, n_boot).items():
        fig = build()
        if fig is None:
            print(f"skipped {name}: no data for it in {spec}", file=sys.stderr)
            continue
        written[name] = save_figure(fig, out / name, dpi=dpi)
        print(f"wrote {written[name]}")
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
