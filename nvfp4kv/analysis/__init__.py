"""Analysis API: the only code that turns sweep records into tables and figures.

One data flow, one way: records (``cells/*.json``, ``samples/*.jsonl``, written and read by
:mod:`nvfp4kv.results`) -> :mod:`.load` (tidy frames) -> :mod:`.compare` (Δ and paired CIs) ->
:mod:`.export` / :mod:`.plots` (tables, figures). The run dir's own report (``results.csv``,
``table.md``, ``plots/``: :mod:`.report`), ``experiments.make_figures`` and the notebooks all go
this way. Typical use (a notebook, a paper script)::

    from nvfp4kv import analysis as A
    df = A.load_results("results/runs")                 # every run beneath, merged
    cmp = A.compare(df, baseline="bf16", samples=A.load_samples("results/runs"))
    A.to_markdown(A.headline_table(cmp))
    A.save_figure(A.plot_delta_vs_bits(cmp), "acc_vs_memory.png")

Modules: :mod:`.runs` (finding run dirs), :mod:`.load` (tidy frames), :mod:`.compare` (Δ and
paired CIs), :mod:`.select` (rates, headline metric, format order), :mod:`.plots`, :mod:`.export`,
:mod:`.report` (the run-dir report and the standard figures), :mod:`.same_records`.
"""

from nvfp4kv.analysis.compare import compare, paired_by
from nvfp4kv.analysis.export import format_delta, headline_table, to_csv, to_latex, to_markdown
from nvfp4kv.analysis.load import (
    load_cells,
    load_grid,
    load_per_layer,
    load_results,
    load_samples,
    tidy_frame,
)
from nvfp4kv.analysis.plots import (
    plot_accuracy,
    plot_delta_vs_bits,
    plot_layer_sqnr,
    plot_retrieval_by_length,
    plot_score_by_length,
    plot_retrieval_heatmaps,
    save_figure,
)
from nvfp4kv.analysis.report import figures, markdown_table, write_report
from nvfp4kv.analysis.runs import RESULTS_ENV, default_results_path, latest_run, resolve_run_dirs
from nvfp4kv.analysis.select import accuracy_rows, is_accuracy_metric, is_rate, kv_order, primary_rows

__all__ = [
    "RESULTS_ENV",
    "accuracy_rows",
    "compare",
    "default_results_path",
    "figures",
    "format_delta",
    "headline_table",
    "is_accuracy_metric",
    "is_rate",
    "kv_order",
    "latest_run",
    "load_cells",
    "load_grid",
    "load_per_layer",
    "load_results",
    "load_samples",
    "markdown_table",
    "paired_by",
    "plot_accuracy",
    "plot_delta_vs_bits",
    "plot_layer_sqnr",
    "plot_retrieval_by_length",
    "plot_score_by_length",
    "plot_retrieval_heatmaps",
    "primary_rows",
    "resolve_run_dirs",
    "save_figure",
    "tidy_frame",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_report",
]
