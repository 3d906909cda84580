"""The results directory of a sweep run: atomic writes, cell records, tidy CSV, table, plots.

Layout (RESULTS_LAYOUT.md; read by stats, the gate and the analysis notebooks)::

    <run_dir>/sweep.yaml               resolved sweep config
    <run_dir>/cells/<cell_id>.json     one per finished (model, task, kv) cell
    <run_dir>/samples/<cell_id>.jsonl  one line per evaluated sample
    <run_dir>/results.csv              tidy: one row per model x task x metric x kv
    <run_dir>/table.md                 Markdown, with delta vs the BF16 baseline (+ paired CI)
    <run_dir>/plots/*.png              accuracy per format, retrieval and per-layer heatmaps

Why atomic writes: a sweep is resumed by skipping cells whose JSON exists, so a cell JSON must
never exist half-written (a killed job would otherwise be "resumed" from garbage). Every file is
written to a temporary sibling and ``os.replace``\\ d into place, and a cell's samples are written
*before* its JSON: the JSON is the commit marker of the cell.

Everything derived (CSV, table, plots) is rebuilt from the cell files alone, so it is always
consistent with what is on disk, whichever runs (or resumed runs) produced the cells.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

#: the columns of results.csv, in order (RESULTS_LAYOUT)
TIDY_COLUMNS = [
    "run_id", "model", "task", "metric", "kv", "k_format", "v_format", "policy",
    "bits_per_element", "value", "stderr", "n",
]
#: metric names that are not rates even when their values fall in [0, 1]
_NOT_RATE_MARKERS = ("kl", "nll", "ppl", "perplexity", "err", "sqnr", "loss", "bits", "mse", "entropy")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._=+-]+")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# ---------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    The temporary file lives in the same directory (``os.replace`` is only atomic within one
    filesystem) and is removed if anything fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch scalars become numbers, tuples lists, NaN/Inf ``None``.

    JSON has no NaN or Infinity; Python's ``json`` would write them anyway and produce files
    other readers reject, so non-finite floats become ``null`` (meaning "not available").
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    text = json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    lines = [json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------- cells
def safe_id(text: str) -> str:
    """A filesystem-safe version of a model/task/kv name (``/`` and spaces become ``-``)."""
    return _SAFE_ID.sub("-", str(text)).strip("-") or "x"


def cell_id(model: str, task: str, kv: str) -> str:
    """``<model>__<task>__<kv>`` with each part made filesystem-safe (RESULTS_LAYOUT)."""
    return "__".join(safe_id(part).replace("__", "_") for part in (model, task, kv))


def cell_path(run_dir: str | os.PathLike[str], cid: str) -> Path:
    return Path(run_dir) / "cells" / f"{cid}.json"


def samples_path(run_dir: str | os.PathLike[str], cid: str) -> Path:
    return Path(run_dir) / "samples" / f"{cid}.jsonl"


def write_cell(run_dir: str | os.PathLike[str], cell: Mapping[str, Any],
               samples: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write one finished cell: samples first, then the cell JSON (the commit marker)."""
    cid = cell["cell_id"]
    atomic_write_jsonl(samples_path(run_dir, cid), samples)
    return atomic_write_json(cell_path(run_dir, cid), cell)


def read_cell(run_dir: str | os.PathLike[str], cid: str) -> dict[str, Any] | None:
    path = cell_path(run_dir, cid)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_cells(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished cell of a run, sorted by cell id (temporary files are ignored)."""
    cell_dir = Path(run_dir) / "cells"
    if not cell_dir.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(cell_dir.glob("*.json"))
            if not p.name.startswith(".")]


def read_samples(run_dir: str | os.PathLike[str], cid: str) -> list[dict[str, Any]]:
    path = samples_path(run_dir, cid)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------- tidy frame
def policy_label(kv_config: Mapping[str, Any]) -> str:
    """Short description of how the cache treats scales and windows: ``prefill/serving+res128``."""
    if not kv_config:
        return ""
    text = f"{kv_config.get('scale_policy', '?')}/{kv_config.get('read_mode', '?')}"
    if kv_config.get("sink_tokens"):
        text += f"+sink{kv_config['sink_tokens']}"
    if kv_config.get("residual_length"):
        text += f"+res{kv_config['residual_length']}"
    if kv_config.get("skip_layers"):
        text += "+skip" + ",".join(str(i) for i in kv_config["skip_layers"])
    return text


def tidy_frame(cells: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per model x task x metric x kv, columns :data:`TIDY_COLUMNS`.

    Row order: cells as given (the runner sorts them), metrics in the order the task reported them.
    """
    rows = []
    for cell in cells:
        kv_config = cell.get("kv_config") or {}
        for metric, m in (cell.get("metrics") or {}).items():
            rows.append({
                "run_id": cell.get("run_id"), "model": cell.get("model"), "task": cell.get("task"),
                "metric": metric, "kv": cell.get("kv"),
                "k_format": kv_config.get("k_format"), "v_format": kv_config.get("v_format"),
                "policy": policy_label(kv_config), "bits_per_element": cell.get("bits_per_element"),
                "value": m.get("value"), "stderr": m.get("stderr"), "n": m.get("n"),
            })
    frame = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    for column in ("bits_per_element", "value", "stderr"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    return frame


def kv_order(df: pd.DataFrame, baseline: str = "bf16") -> list[str]:
    """KV labels in display order: baseline first, then by bits per element (descending), name."""
    labels = list(dict.fromkeys(df["kv"].dropna()))
    bits = df.groupby("kv")["bits_per_element"].max().to_dict() if len(df) else {}

    def key(label: str) -> tuple[int, float, str]:
        b = bits.get(label)
        return (0 if label == baseline else 1, -(b if b is not None and not math.isnan(b) else -1.0), label)

    return sorted(labels, key=key)


def is_rate(metric: str, values: Iterable[float]) -> bool:
    """Whether a metric is a proportion (accuracy, exact match, retrieval) shown in percent.

    Decided from the values (all within [0, 1]) and the name (KL, NLL, errors, SQNR are not rates
    even when small), so new tasks need no registration.
    """
    name = metric.split(",")[0].lower()
    if any(marker in name for marker in _NOT_RATE_MARKERS):
        return False
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return bool(finite) and all(0.0 <= v <= 1.0 for v in finite)


# ---------------------------------------------------------------------------- Markdown table
def _fmt(value: float | None, scale: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"


def paired_ci_frame(run_dir: str | os.PathLike[str] | None, baseline: str) -> pd.DataFrame | None:
    """Paired Δ and CI per (model, task, metric, kv) from :mod:`nvfp4kv.stats`, when available.

    Optional: the table works without it (only the unpaired Δ column), so a missing or failing
    stats module never blocks writing results.
    """
    if run_dir is None:
        return None
    try:
        from nvfp4kv.stats import paired_table
    except ImportError:
        return None
    frame = paired_table(run_dir, baseline=baseline)
    return frame if len(frame) else None


def markdown_table(df: pd.DataFrame, baseline: str = "bf16", paired: pd.DataFrame | None = None,
                   title: str | None = None) -> str:
    """Markdown table: value ± stderr per format and Δ vs ``baseline`` of the same model/task/metric.

    Rates (accuracy-like metrics) are shown in percent and their Δ in percentage points; other
    metrics in their own units. ``paired`` (from :func:`paired_ci_frame`) adds the paired-bootstrap
    "Δ [95% CI]" and the exact McNemar p-value, matched on (model, task, metric, kv).
    """
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    if df.empty:
        return "\n".join(lines + ["(no finished cells yet)", ""])
    paired_index: dict[tuple[str, str, str, str], Mapping[str, Any]] = {}
    if paired is not None:
        for row in paired.to_dict("records"):
            paired_index[(row["model"], row["task"], row["metric"], row["kv"])] = row
    header = ["model", "task", "metric", "kv", "bits", "policy", "value ± stderr", f"Δ vs {baseline}", "n"]
    if paired_index:
        header[8:8] = ["paired Δ [95% CI]", "p (McNemar)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    order = {label: i for i, label in enumerate(kv_order(df, baseline))}
    for (model, task, metric), group in df.groupby(["model", "task", "metric"], sort=False):
        rate = is_rate(metric, group["value"].tolist())
        scale, digits = (100.0, 1) if rate else (1.0, 4)
        base_rows = group[group["kv"] == baseline]
        base_value = float(base_rows["value"].iloc[0]) if len(base_rows) else None
        for _, row in group.sort_values("kv", key=lambda s: s.map(order)).iterrows():
            value = _fmt(row["value"], scale, digits)
            stderr = _fmt(row["stderr"], scale, digits)
            shown = f"{value} ± {stderr}" if stderr else value
            if row["kv"] == baseline:
                delta = "(baseline)"
            elif base_value is None:
                delta = ""
            else:
                delta = _fmt(row["value"] - base_value, scale, digits, signed=True)
            bits = "" if pd.isna(row["bits_per_element"]) else f"{row['bits_per_element']:g}"
            cells = [str(model), str(task), str(metric), str(row["kv"]), bits, str(row["policy"]), shown, delta,
                     "" if pd.isna(row["n"]) else str(int(row["n"]))]
            if paired_index:
                p = paired_index.get((model, task, metric, row["kv"]))
                ci = ""
                pval = ""
                if p is not None and p.get("n"):
                    ci = (f"{_fmt(p['delta'], scale, digits, True)} "
                          f"[{_fmt(p['ci_low'], scale, digits, True)}, {_fmt(p['ci_high'], scale, digits, True)}]")
                    if p.get("p_mcnemar") is not None and not pd.isna(p.get("p_mcnemar")):
                        pval = f"{p['p_mcnemar']:.3g}"
                cells[8:8] = [ci, pval]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        f"Rates (accuracy, exact match, retrieval) in %, Δ in percentage points vs `{baseline}` on the same "
        "model, task and samples; other metrics in their own units. ± is the standard error the task "
        "reports (lm-eval's; the sample standard error of the trials for pass-key).",
    ]
    if paired_index:
        lines.append("Paired Δ: mean per-sample difference with a seeded paired-bootstrap 95% CI; "
                     "p: exact two-sided McNemar test on 0/1 outcomes (nvfp4kv.stats).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: CI, clusters; respects an already-chosen backend
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, n: int, width: float = 4.2, height: float = 3.4, ncols: int = 3) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_accuracy(df: pd.DataFrame, baseline: str = "bf16") -> Any:
    """One panel per (task, metric): value per KV format with ±1 stderr bars, one series per model.

    The baseline's value is drawn as a dashed line so a drop reads at a glance.
    """
    plt = _pyplot()
    panels = list(df.groupby(["task", "metric"], sort=False)) if len(df) else []
    fig, axes = _grid(plt, max(1, len(panels)))
    if not panels:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    order = kv_order(df, baseline)
    for ax, ((task, metric), group) in zip(axes, panels):
        rate = is_rate(metric, group["value"].tolist())
        scale = 100.0 if rate else 1.0
        labels = [k for k in order if k in set(group["kv"])]
        x_of = {k: i for i, k in enumerate(labels)}
        models = list(dict.fromkeys(group["model"]))
        width = 0.8 / max(1, len(models))
        for j, model in enumerate(models):
            sub = group[group["model"] == model]
            xs = [x_of[k] - 0.4 + width * (j + 0.5) for k in sub["kv"]]
            err = (sub["stderr"].fillna(0.0) * scale).tolist()
            ax.errorbar(xs, (sub["value"] * scale).tolist(), yerr=err, fmt="o", capsize=3,
                        label=model if len(models) > 1 else None)
            base = sub[sub["kv"] == baseline]
            if len(base):
                ax.axhline(float(base["value"].iloc[0]) * scale, ls="--", lw=0.8, color="grey")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_ylabel(f"{metric.split(',')[0]} (%)" if rate else metric.split(",")[0], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if len(models) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_retrieval_heatmaps(cells: Iterable[Mapping[str, Any]]) -> Any | None:
    """Depth x context-length retrieval accuracy, one panel per (model, task, kv) with a grid.

    Reads ``extra.grid`` rows ``{context_len, depth, acc, n}`` (the passkey task's). ``None`` when
    no cell has a grid.
    """
    with_grid = [c for c in cells if (c.get("extra") or {}).get("grid")]
    if not with_grid:
        return None
    plt = _pyplot()
    ncols = 4
    fig, axes = _grid(plt, len(with_grid), width=3.8, height=3.2, ncols=ncols)
    image = None
    for index, (ax, cell) in enumerate(zip(axes, with_grid)):
        grid = pd.DataFrame(cell["extra"]["grid"])
        table = grid.pivot_table(index="depth", columns="context_len", values="acc", aggfunc="mean")
        image = ax.imshow(table.values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(table.columns)))
        ax.set_xticklabels([str(c) for c in table.columns], fontsize=8)
        ax.set_yticks(range(len(table.index)))
        ax.set_yticklabels([f"{d:g}" for d in table.index], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        if index % ncols == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(f"{cell.get('task')} [{cell.get('kv')}]\n{cell.get('model')}", fontsize=9)
        for (i, j), value in pd.DataFrame(table.values).stack().items():
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.5 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="retrieval accuracy")
    return fig


def plot_layer_heatmaps(cells: Iterable[Mapping[str, Any]], value: str = "sqnr_db") -> Any | None:
    """Layer x KV-head heatmaps of a per-layer fidelity value (``extra.per_layer``), K and V panels.

    ``None`` when no cell carries a per-layer table. Missing values (e.g. SQNR of an exact BF16
    round trip, stored as null) are left blank.
    """
    with_layers = [c for c in cells if (c.get("extra") or {}).get("per_layer")]
    if not with_layers:
        return None
    panels = []
    for cell in with_layers:
        frame = pd.DataFrame(cell["extra"]["per_layer"])
        if value not in frame:
            continue
        for kind in ("k", "v"):
            sub = frame[frame["kind"] == kind]
            table = sub.pivot_table(index="layer", columns="head", values=value, aggfunc="mean") if len(sub) else None
            if table is not None and table.notna().to_numpy().any():  # all-null (exact BF16): nothing to draw
                panels.append((cell, kind, table))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), width=3.2, height=4.0, ncols=4)
    for ax, (cell, kind, table) in zip(axes, panels):
        image = ax.imshow(table.values.astype(float), cmap="magma", aspect="auto")
        ax.set_title(f"{cell.get('kv')} {kind.upper()}: {value}", fontsize=9)
        ax.set_xlabel("kv head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render to PNG in memory, write atomically, and close the figure (frees memory in long sweeps)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------- report
def sort_cells(cells: list[dict[str, Any]], baseline: str = "bf16") -> list[dict[str, Any]]:
    """Cells in display order: model, task (first-seen), then the KV order of :func:`kv_order`."""
    frame = pd.DataFrame([{"kv": c.get("kv"), "bits_per_element": c.get("bits_per_element")} for c in cells],
                         columns=["kv", "bits_per_element"])
    frame["bits_per_element"] = pd.to_numeric(frame["bits_per_element"], errors="coerce")
    order = {label: i for i, label in enumerate(kv_order(frame, baseline))} if len(frame) else {}
    models = {m: i for i, m in enumerate(dict.fromkeys(c.get("model") for c in cells))}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(c.get("task") for c in cells))}
    return sorted(cells, key=lambda c: (models[c.get("model")], tasks[c.get("task")], order.get(c.get("kv"), 0)))


def write_report(run_dir: str | os.PathLike[str], baseline: str = "bf16", title: str | None = None) -> dict[str, Path]:
    """Rebuild results.csv, table.md and plots/*.png from the run's cell files; returns the paths."""
    run_dir = Path(run_dir)
    cells = sort_cells(read_cells(run_dir), baseline)
    frame = tidy_frame(cells)
    written: dict[str, Path] = {}
    written["csv"] = atomic_write_text(run_dir / "results.csv", frame.to_csv(index=False))
    paired = paired_ci_frame(run_dir, baseline) if cells else None
    written["table"] = atomic_write_text(run_dir / "table.md", markdown_table(frame, baseline, paired, title))
    plots = run_dir / "plots"
    written["accuracy"] = save_figure(plot_accuracy(frame, baseline), plots / "accuracy.png")
    retrieval = plot_retrieval_heatmaps(cells)
    if retrieval is not None:
        written["retrieval"] = save_figure(retrieval, plots / "retrieval_heatmaps.png")
    layers = plot_layer_heatmaps(cells)
    if layers is not None:
        written["layers"] = save_figure(layers, plots / "fidelity_layers.png")
    return written
