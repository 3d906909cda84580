"""Analysis API: load any sweep directory as a tidy DataFrame, compare with BF16, plot, export.

Typical use (a notebook, a paper script)::

    from nvfp4kv import analysis as A
    df = A.load_results("results/runs")                 # every run beneath, merged
    cmp = A.compare(df, baseline="bf16", samples=A.load_samples("results/runs"))
    A.to_markdown(A.headline_table(cmp))
    A.plot_delta_vs_bits(cmp).savefig("acc_vs_memory.png")

Modules: :mod:`.runs` (finding run dirs), :mod:`.load` (tidy frames), :mod:`.compare` (Δ and
paired CIs), :mod:`.select` (headline metric and format order), :mod:`.plots`, :mod:`.export`.
"""

from nvfp4kv.analysis.compare import compare, paired_by
from nvfp4kv.analysis.export import headline_table, to_csv, to_latex, to_markdown
from nvfp4kv.analysis.load import load_cells, load_grid, load_per_layer, load_results, load_samples
from nvfp4kv.analysis.plots import (
    plot_accuracy,
    plot_delta_vs_bits,
    plot_layer_sqnr,
    plot_retrieval_by_length,
    plot_retrieval_heatmaps,
)
from nvfp4kv.analysis.runs import RESULTS_ENV, default_results_path, latest_run, resolve_run_dirs
from nvfp4kv.analysis.select import accuracy_rows, is_accuracy_metric, kv_order, primary_rows

__all__ = [
    "RESULTS_ENV",
    "accuracy_rows",
    "compare",
    "default_results_path",
    "headline_table",
    "is_accuracy_metric",
    "kv_order",
    "latest_run",
    "load_cells",
    "load_grid",
    "load_per_layer",
    "load_results",
    "load_samples",
    "paired_by",
    "plot_accuracy",
    "plot_delta_vs_bits",
    "plot_layer_sqnr",
    "plot_retrieval_by_length",
    "plot_retrieval_heatmaps",
    "primary_rows",
    "resolve_run_dirs",
    "to_csv",
    "to_latex",
    "to_markdown",
]
