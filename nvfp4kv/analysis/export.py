"""Tables for papers and READMEs: a readable headline table and Markdown / CSV / LaTeX writers.

The writers take any frame (the tidy one, :func:`compare`'s, or :func:`headline_table`'s) and
return the text, writing it to ``path`` too when one is given, so a notebook can both show and
save a table with one call.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from nvfp4kv.analysis.select import accuracy_rows, kv_order, primary_rows
from nvfp4kv.results import atomic_write_text
from nvfp4kv.stats import Z95

PathLike = str | os.PathLike[str]


def format_delta(delta: float, low: float, high: float, digits: int = 3) -> str:
    """``"-0.021 [-0.050, +0.008]"``: the cell text of a Δ column (``n/a`` when there is no Δ)."""
    if math.isnan(delta):
        return "n/a"
    return f"{delta:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def headline_table(cmp: pd.DataFrame, *, baseline: str = "bf16", digits: int = 1,
                   all_metrics: bool = False) -> pd.DataFrame:
    """One readable row per (model, task, metric, kv): accuracy in %, Δ vs baseline in points, p.

    Takes :func:`compare`'s output; keeps task accuracies (one primary metric per task unless
    ``all_metrics``), formats in display order. ``±`` is the 95% half-width (1.96 stderr) of the
    accuracy itself; the Δ interval is paired when per-sample records exist, and the ``CI``
    column says which (``paired-bootstrap`` or the ``unpaired-normal`` fallback). A ``run_id``
    column is added when the frame holds several runs.
    """
    delta_col = f"Δ vs {baseline} (points) [95% CI]"
    columns = ["model", "task", "metric", "kv", "bits", "accuracy % (± 95% CI)", delta_col, "p (McNemar)", "n", "CI"]
    rows = accuracy_rows(cmp) if all_metrics else primary_rows(accuracy_rows(cmp))
    if rows.empty:
        return pd.DataFrame(columns=columns)
    order = {kv: i for i, kv in enumerate(kv_order(rows, baseline))}
    rows = rows.assign(_order=rows["kv"].map(order)).sort_values(["model", "task", "metric", "run_id", "_order"])
    several_runs = rows["run_id"].nunique() > 1
    out = []
    for _, r in rows.iterrows():
        value = 100 * float(r["value"])
        stderr = float(r["stderr"]) if pd.notna(r["stderr"]) else math.nan
        shown = f"{value:.{digits}f}" + (f" ± {100 * Z95 * stderr:.{digits}f}" if math.isfinite(stderr) else "")
        is_base = r["kv"] == baseline
        has_ci = pd.notna(r["ci_low"]) and math.isfinite(float(r["ci_low"]))
        if is_base:
            delta = "(baseline)"
        elif has_ci:
            delta = format_delta(100 * float(r["delta"]), 100 * float(r["ci_low"]), 100 * float(r["ci_high"]), digits)
        elif pd.notna(r["delta"]):
            delta = f"{100 * float(r['delta']):+.{digits}f}"
        else:
            delta = "n/a"
        p = r.get("p_mcnemar")
        out.append({
            **({"run_id": r["run_id"]} if several_runs else {}),
            "model": r["model"], "task": r["task"], "metric": r["metric"], "kv": r["kv"],
            "bits": "" if pd.isna(r["bits_per_element"]) else f"{float(r['bits_per_element']):g}",
            "accuracy % (± 95% CI)": shown, delta_col: delta,
            "p (McNemar)": "" if is_base or p is None or pd.isna(p) else f"{float(p):.3g}",
            "n": "" if pd.isna(r["n"]) else str(int(r["n"])),
            "CI": "" if is_base or pd.isna(r.get("ci_method")) else str(r["ci_method"]),
        })
    return pd.DataFrame(out)


def _write(text: str, path: PathLike | None) -> str:
    if path is not None:
        atomic_write_text(path, text)
    return text


def to_markdown(df: pd.DataFrame, path: PathLike | None = None, *, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table of any frame (no index); NaN shown empty.

    For the sweep's own Δ table of a run see ``table.md`` (:func:`nvfp4kv.analysis.report.markdown_table`);
    this writer renders whatever frame a notebook built, e.g. :func:`headline_table`.
    """
    shown = df.copy()
    for column in shown.columns:  # format floats here; strings (e.g. "+1.2 [-0.5, +3.0]") stay as written
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = [("" if pd.isna(v) else format(v, floatfmt)) for v in shown[column]]
    text = shown.to_markdown(index=False, missingval="", disable_numparse=True)
    return _write(text + "\n", path)


def to_csv(df: pd.DataFrame, path: PathLike | None = None) -> str:
    """CSV text with a header and no index."""
    return _write(df.to_csv(index=False), path)


def to_latex(df: pd.DataFrame, path: PathLike | None = None, *, caption: str | None = None,
             label: str | None = None, float_format: str = "{:.3f}") -> str:
    """A LaTeX ``tabular`` (booktabs rules), special characters escaped, ``Δ`` as ``$\\Delta$``.

    pandas renders it through its Styler, which needs jinja2 (a dependency of torch and
    lm-eval, so always present where nvfp4kv is installed).
    """
    text = df.to_latex(index=False, escape=True, caption=caption, label=label,
                       float_format=float_format.format, na_rep="")
    text = text.replace("Δ", r"$\Delta$").replace("±", r"$\pm$")
    return _write(text, path)
