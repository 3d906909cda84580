"""The analysis API on a generated results fixture: find runs, load, merge, compare, export, plot.

Expected values are recomputed independently from the fixture's files (cell JSONs, sample
JSONL) rather than copied from the code under test, so a loader that drops rows, a comparison
against the wrong baseline or a CI that ignores the pairing fails here.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from fixtures_results import CONTEXT_LENS, DEPTHS, KVS, MODEL, write_results_fixture
from nvfp4kv import analysis as A
from nvfp4kv import results, stats
from nvfp4kv.analysis.runs import find_repo_root

RUN_A, RUN_B = "20250101-000000-fix0", "20250102-000000-fix1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs of one sweep: A with the derived report files, B cells only (as a resumed run may be)."""
    base = tmp_path_factory.mktemp("runs")
    write_results_fixture(base, run_id=RUN_A, seed=0)
    write_results_fixture(base, run_id=RUN_B, seed=1, with_report=False)
    return base


@pytest.fixture(scope="module")
def run_a(root: Path) -> Path:
    return root / "fixture" / RUN_A


def _cells(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]


def _samples(run_dir: Path, task: str, kv: str) -> list[dict]:
    path = run_dir / "samples" / f"{MODEL}__{task}__{kv}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- finding runs
def test_resolve_run_dirs_accepts_dir_parent_glob_and_list(root: Path, run_a: Path) -> None:
    run_b = root / "fixture" / RUN_B
    assert A.resolve_run_dirs(run_a) == [run_a.resolve()]
    assert A.resolve_run_dirs(root) == [run_a.resolve(), run_b.resolve()]
    assert A.resolve_run_dirs(str(root / "fixture" / "2025010[12]-*")) == [run_a.resolve(), run_b.resolve()]
    assert A.resolve_run_dirs([run_b, run_a, run_a]) == [run_a.resolve(), run_b.resolve()]


def test_missing_results_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"experiments\.run \+sweep=smoke"):
        A.resolve_run_dirs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        A.load_results(tmp_path / "empty")


def test_latest_run_is_the_one_that_wrote_a_cell_last(tmp_path: Path) -> None:
    old = write_results_fixture(tmp_path, run_id="20990101-000000-zzz", with_report=False)  # larger id, older cells
    new = write_results_fixture(tmp_path, run_id="20200101-000000-aaa", with_report=False)
    past = time.time() - 3600
    for p in (old / "cells").glob("*.json"):
        os.utime(p, (past, past))
    assert A.latest_run(tmp_path) == new.resolve()
    # a resumed run that writes a new cell becomes the latest again
    os.utime(next((old / "cells").glob("*.json")), None)
    assert A.latest_run(tmp_path) == old.resolve()


def test_default_results_path_env_override_and_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        run_a: Path) -> None:
    monkeypatch.setenv(A.RESULTS_ENV, str(run_a))
    assert A.default_results_path() == run_a
    monkeypatch.delenv(A.RESULTS_ENV)
    monkeypatch.chdir(tmp_path)  # no repo above, no results/runs
    assert find_repo_root() is None
    assert A.default_results_path(required=False) is None
    with pytest.raises(FileNotFoundError):
        A.default_results_path()


def test_repo_root_found_from_notebooks_dir() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert find_repo_root(repo / "notebooks") == repo


# ---------------------------------------------------------------------------- loading
def test_load_results_is_tidy_and_matches_the_cells(run_a: Path) -> None:
    df = A.load_results(run_a)
    assert list(df.columns[:10]) == ["model", "task", "metric", "kv", "policy", "value", "stderr", "n", "run_id",
                                     "bits_per_element"]
    cells = _cells(run_a)
    assert len(df) == sum(len(c["metrics"]) for c in cells)
    for cell in cells:
        for metric, m in cell["metrics"].items():
            row = df[(df.task == cell["task"]) & (df.kv == cell["kv"]) & (df.metric == metric)]
            assert len(row) == 1
            assert row["value"].item() == pytest.approx(m["value"])
            assert row["bits_per_element"].item() == cell["bits_per_element"]
    assert set(df["policy"]) == {"prefill/serving"}


def test_load_results_agrees_with_the_runners_results_csv(run_a: Path) -> None:
    """results.csv is checked against the cell JSONs themselves (both it and ``load_results`` come
    from ``tidy_frame``, so comparing the two alone would compare that function with itself)."""
    csv = pd.read_csv(run_a / "results.csv")
    key = ["task", "metric", "kv"]
    expected = pd.DataFrame([
        {"task": c["task"], "metric": metric, "kv": c["kv"], "run_id": c["run_id"], "model": c["model"],
         "k_format": c["kv_config"]["k_format"], "v_format": c["kv_config"]["v_format"],
         "bits_per_element": c["bits_per_element"], "value": m["value"], "stderr": m["stderr"], "n": m["n"]}
        for c in _cells(run_a) for metric, m in c["metrics"].items()
    ])
    merged = expected.merge(csv, on=key, suffixes=("", "_csv"), validate="one_to_one")
    assert len(merged) == len(csv) == len(expected)  # one row per cell x metric, none extra
    for column in ("run_id", "model", "k_format", "v_format"):
        assert merged[column].tolist() == merged[f"{column}_csv"].tolist(), column
    for column in ("bits_per_element", "value", "stderr", "n"):
        np.testing.assert_allclose(merged[f"{column}_csv"].to_numpy(float), merged[column].to_numpy(float),
                                   err_msg=column)  # null in JSON, empty in CSV: both NaN
    df = A.load_results(run_a)  # and the loader reads the same numbers back
    np.testing.assert_allclose(csv.merge(df, on=key, suffixes=("_csv", ""))["value"], csv["value"])


def test_load_results_merges_runs(root: Path) -> None:
    df = A.load_results(root)
    one = A.load_results(root / "fixture" / RUN_A)
    assert sorted(df["run_id"].unique()) == [RUN_A, RUN_B]
    assert len(df) == 2 * len(one)


def test_load_samples_long_and_paired(run_a: Path) -> None:
    samples = A.load_samples(run_a, task="gsm8k")
    assert set(samples["task"]) == {"gsm8k"}
    assert set(samples["metric"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    per_kv = samples[samples.metric == "exact_match,strict-match"].groupby("kv")["doc_id"].apply(sorted)
    assert per_kv["bf16"] == per_kv["nvfp4"] == per_kv["fp8_e4m3"] == list(range(40))
    raw = _samples(run_a, "gsm8k", "nvfp4")
    got = samples[(samples.kv == "nvfp4") & (samples.metric == "exact_match,strict-match")].sort_values("doc_id")
    assert got["value"].tolist() == [s["metrics"]["exact_match,strict-match"] for s in raw]
    passkey = A.load_samples(run_a, task="passkey", kv="bf16")
    assert set(passkey["context_len"]) == set(CONTEXT_LENS) and set(passkey["depth"]) == set(DEPTHS)


def test_load_grid_and_per_layer(run_a: Path) -> None:
    grid = A.load_grid(run_a)
    assert len(grid) == len(KVS) * len(CONTEXT_LENS) * len(DEPTHS)
    cell = json.loads((run_a / "cells" / f"{MODEL}__passkey__nvfp4.json").read_text())
    expected = {(g["context_len"], g["depth"]): g["acc"] for g in cell["extra"]["grid"]}
    got = grid[grid.kv == "nvfp4"].set_index(["context_len", "depth"])["acc"].to_dict()
    assert got == expected
    layers = A.load_per_layer(run_a)
    assert set(layers["kind"]) == {"k", "v"}
    assert layers[layers.kv == "bf16"]["sqnr_db"].isna().all()  # lossless: stored as null
    assert layers[layers.kv == "nvfp4"]["sqnr_db"].notna().all()


# ---------------------------------------------------------------------------- compare
def _row(cmp: pd.DataFrame, run: str, task: str, metric: str, kv: str) -> pd.Series:
    sel = cmp[(cmp.run_id == run) & (cmp.task == task) & (cmp.metric == metric) & (cmp.kv == kv)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_compare_paired_ci_is_stats_paired_deltas_on_the_raw_samples(root: Path, run_a: Path) -> None:
    df, samples = A.load_results(root), A.load_samples(root)
    cmp = A.compare(df, samples=samples, n_boot=500, seed=3)
    metric = "exact_match,strict-match"
    row = _row(cmp, RUN_A, "gsm8k", metric, "nvfp4")
    base = _row(cmp, RUN_A, "gsm8k", metric, "bf16")
    expected = stats.paired_deltas(_samples(run_a, "gsm8k", "bf16"), _samples(run_a, "gsm8k", "nvfp4"), metric,
                                   n_boot=500, seed=3)
    assert row["delta"] == pytest.approx(row["value"] - base["value"])
    assert row["delta"] == pytest.approx(expected["delta"])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected["ci_low"], expected["ci_high"]))
    assert row["p_mcnemar"] == pytest.approx(expected["p_mcnemar"])
    assert row["ci_method"] == "paired-bootstrap" and row["n_paired"] == 40
    assert base["delta"] == 0 and math.isnan(base["ci_low"])


def test_compare_uses_each_runs_own_baseline(root: Path) -> None:
    cmp = A.compare(A.load_results(root))
    for run in (RUN_A, RUN_B):
        row = _row(cmp, run, "mmlu", "acc,none", "nvfp4")
        assert row["baseline_value"] == _row(cmp, run, "mmlu", "acc,none", "bf16")["value"]


def test_compare_without_samples_falls_back_to_unpaired_and_pairing_is_tighter(run_a: Path) -> None:
    df = A.load_results(run_a)
    unpaired = _row(A.compare(df), RUN_A, "passkey", "acc", "nvfp4")
    base = _row(df, RUN_A, "passkey", "acc", "bf16")
    half = 1.959963984540054 * math.hypot(unpaired["stderr"], base["stderr"])
    assert unpaired["ci_method"] == "unpaired-normal"
    assert (unpaired["ci_low"], unpaired["ci_high"]) == pytest.approx((unpaired["delta"] - half, unpaired["delta"] + half))
    paired = _row(A.compare(df, samples=A.load_samples(run_a)), RUN_A, "passkey", "acc", "nvfp4")
    # the fixture's formats share most outcomes, as real formats do: pairing removes that variance
    assert paired["ci_high"] - paired["ci_low"] < unpaired["ci_high"] - unpaired["ci_low"]


def test_compare_leaves_rows_without_finite_baseline_empty(run_a: Path) -> None:
    cmp = A.compare(A.load_results(run_a))
    sqnr = _row(cmp, RUN_A, "fidelity", "sqnr_db_k", "nvfp4")  # BF16 has no SQNR (lossless)
    assert math.isnan(sqnr["delta"]) and pd.isna(sqnr["ci_method"])


def test_paired_by_context_length(run_a: Path) -> None:
    samples = A.load_samples(run_a)
    by_len = A.paired_by(samples, "context_len", task="passkey", metric="acc", n_boot=200)
    assert sorted(by_len["context_len"].unique()) == list(CONTEXT_LENS)
    assert set(by_len["kv"]) == {"fp8_e4m3", "nvfp4"}
    base, nv = _samples(run_a, "passkey", "bf16"), _samples(run_a, "passkey", "nvfp4")
    for length in CONTEXT_LENS:
        a = [s["metrics"]["acc"] for s in base if s["context_len"] == length]
        b = [s["metrics"]["acc"] for s in nv if s["context_len"] == length]
        row = by_len[(by_len.kv == "nvfp4") & (by_len.context_len == length)].iloc[0]
        assert row["n"] == len(a) == len(DEPTHS) * 4
        assert row["delta"] == pytest.approx(np.mean(b) - np.mean(a))


def _write_cell(run_dir: Path, kv: str, values: list[int], task: str = "mmlu") -> None:
    """A cell whose samples carry a string field besides the metric (which is not a metric)."""
    cell = {"cell_id": results.cell_id("m", task, kv), "run_id": "r", "model": "m", "task": task, "kv": kv,
            "metrics": {"acc,none": {"value": float(np.mean(values)), "stderr": None, "n": len(values)}}}
    results.write_cell(run_dir, cell, [{"doc_id": i, "task": task, "kv": kv, "metrics": {"acc,none": v, "note": "x"}}
                                       for i, v in enumerate(values)])


def test_compare_pairs_the_samples_of_a_run_directory(tmp_path: Path) -> None:
    _write_cell(tmp_path, "bf16", [1, 1, 1, 1, 1, 0, 0, 1])
    _write_cell(tmp_path, "nvfp4", [0, 0, 0, 0, 0, 0, 0, 1])
    _write_cell(tmp_path, "fp8_e4m3", [1, 1, 1, 1, 1, 0, 0, 1])
    _write_cell(tmp_path, "nvfp4", [1, 0], task="other")  # no bf16 cell for this task: nothing to pair with
    samples = A.load_samples(tmp_path)
    assert set(samples["metric"]) == {"acc,none"}  # the string field is not a metric
    cmp = A.compare(A.load_results(tmp_path), samples=samples, n_boot=500)
    paired = cmp[cmp["ci_method"] == "paired-bootstrap"].set_index("kv")
    assert sorted(paired.index) == ["fp8_e4m3", "nvfp4"] and set(paired["task"]) == {"mmlu"}
    assert paired.loc["nvfp4", "paired_delta"] == pytest.approx(-5 / 8) == paired.loc["nvfp4", "delta"]
    assert paired.loc["nvfp4", "p_mcnemar"] == pytest.approx(0.0625) and paired.loc["nvfp4", "n_paired"] == 8
    fp8 = paired.loc["fp8_e4m3"]
    assert A.format_delta(fp8["paired_delta"], fp8["ci_low"], fp8["ci_high"]) == "+0.000 [+0.000, +0.000]"


def test_format_delta() -> None:
    assert A.format_delta(-0.0214, -0.05, 0.008) == "-0.021 [-0.050, +0.008]"
    assert A.format_delta(math.nan, math.nan, math.nan) == "n/a"


# ---------------------------------------------------------------------------- selection & tables
@pytest.mark.parametrize(("metric", "expected"), [
    ("exact_match,strict-match", True), ("acc,none", True), ("acc@2048", True),
    ("top1_agree", False), ("kl_mean", False), ("sqnr_db_k", False), ("attn_rel_err_v", False),
])
def test_accuracy_metrics(metric: str, expected: bool) -> None:
    assert A.is_accuracy_metric(metric) is expected


def test_headline_table_one_primary_metric_per_task(root: Path, run_a: Path) -> None:
    cmp = A.compare(A.load_results(run_a), samples=A.load_samples(run_a), n_boot=200)
    table = A.headline_table(cmp)
    assert list(table[["task", "metric"]].drop_duplicates().itertuples(index=False, name=None)) == [
        ("gsm8k", "exact_match,strict-match"), ("mmlu", "acc,none"), ("passkey", "acc")]
    assert table.groupby("task")["kv"].apply(list).tolist() == [["bf16", "fp8_e4m3", "nvfp4"]] * 3
    delta_col = "Δ vs bf16 (points) [95% CI]"
    assert (table[table.kv == "bf16"][delta_col] == "(baseline)").all()
    nv = cmp[(cmp.task == "passkey") & (cmp.metric == "acc") & (cmp.kv == "nvfp4")].iloc[0]
    shown = table[(table.task == "passkey") & (table.kv == "nvfp4")][delta_col].item()
    assert shown == A.format_delta(100 * nv["delta"], 100 * nv["ci_low"], 100 * nv["ci_high"], 1)
    assert "run_id" not in table
    assert "run_id" in A.headline_table(A.compare(A.load_results(root)))


def test_exports_markdown_csv_latex(run_a: Path, tmp_path: Path) -> None:
    cmp = A.compare(A.load_results(run_a), samples=A.load_samples(run_a), n_boot=200)
    table = A.headline_table(cmp)
    md = A.to_markdown(table, tmp_path / "t.md")
    lines = md.strip().splitlines()
    assert len(lines) == len(table) + 2 and lines[0].startswith("| model")
    assert (tmp_path / "t.md").read_text() == md
    csv = A.to_csv(table, tmp_path / "t.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False),
                                  table.astype(str), check_dtype=False)
    assert csv == (tmp_path / "t.csv").read_text()
    tex = A.to_latex(table, tmp_path / "t.tex", caption="KV formats", label="tab:kv")
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\label{tab:kv}" in tex
    assert r"exact\_match" in tex and r"$\Delta$ vs bf16" in tex and r"$\pm$" in tex
    assert "Δ" not in tex and "±" not in tex


# ---------------------------------------------------------------------------- plots
def _images(fig: Figure) -> list[np.ndarray]:
    return [np.asarray(im.get_array(), dtype=float) for ax in fig.axes for im in ax.get_images()]


def test_plot_accuracy_bars_are_the_values(run_a: Path) -> None:
    df = A.load_results(run_a)
    fig = A.plot_accuracy(df)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 3  # gsm8k, mmlu, passkey; fidelity is not an accuracy
    heights = [round(p.get_height(), 6) for p in panels[2].patches]
    passkey = df[(df.task == "passkey") & (df.metric == "acc")].set_index("kv")["value"]
    assert heights == [round(passkey[kv], 6) for kv in ("bf16", "fp8_e4m3", "nvfp4")]


def test_plot_delta_vs_bits_points(run_a: Path) -> None:
    cmp = A.compare(A.load_results(run_a), samples=A.load_samples(run_a), n_boot=200)
    fig = A.plot_delta_vs_bits(cmp)
    ax = fig.axes[0]
    ys = sorted(round(float(y), 6) for bars in ax.containers for y in bars.lines[0].get_ydata())
    rows = A.primary_rows(A.accuracy_rows(cmp))
    assert ys == sorted(round(100 * d, 6) for d in rows["delta"])
    assert ax.get_xscale() == "log"


def test_plot_retrieval_heatmaps_show_the_grid(run_a: Path) -> None:
    grid = A.load_grid(run_a)
    fig = A.plot_retrieval_heatmaps(grid)
    images = _images(fig)
    assert len(images) == len(KVS)
    expected = grid[grid.kv == "nvfp4"].pivot_table(index="depth", columns="context_len", values="acc").to_numpy()
    np.testing.assert_array_equal(images[2], expected)  # panels in display order: bf16, fp8, nvfp4
    # by length: one line per format in display order, the accuracy pooled over depths (weighted by
    # trials), recomputed from the cells' own grids
    lines = A.plot_retrieval_by_length(grid).axes[0].get_lines()
    assert [line.get_label() for line in lines] == list(KVS)
    for kv, line in zip(KVS, lines):
        cell_grid = json.loads((run_a / "cells" / f"{MODEL}__passkey__{kv}.json").read_text())["extra"]["grid"]
        pooled = [sum(g["acc"] * g["n"] for g in cell_grid if g["context_len"] == L)
                  / sum(g["n"] for g in cell_grid if g["context_len"] == L) for L in sorted(CONTEXT_LENS)]
        assert line.get_xdata().tolist() == sorted(CONTEXT_LENS), kv
        np.testing.assert_allclose(line.get_ydata(), pooled, err_msg=kv)


def test_plot_score_by_length_pools_split_cells_and_ruler_partial_scores() -> None:
    """Pass-key split into per-length cells and RULER partial scores: one line per format, the
    per-length mean of the samples, one panel per model x task kind."""
    rows = []
    for kv, hits in (("bf16", [1, 1, 1, 0]), ("nvfp4", [1, 0, 0, 0])):
        for i, acc in enumerate(hits):
            task, length = ("passkey_4k", 4096) if i < 2 else ("passkey_8k", 8000)
            rows.append({"model": "m", "task": task, "kv": kv, "metric": "acc", "value": float(acc),
                         "context_len": length, "doc_id": i})
        for i, score in enumerate([1.0, 0.5, 0.25, 0.0] if kv == "bf16" else [0.5, 0.5, 0.0, 0.0]):
            rows.append({"model": "m", "task": "ruler_4k" if i < 2 else "ruler_8k", "kv": kv, "metric": "score",
                         "value": score, "context_len": 4096 if i < 2 else 8192, "doc_id": i})
    fig = A.plot_score_by_length(pd.DataFrame(rows))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in panels] == ["pass-key accuracy", "RULER score"]
    passkey, ruler = ([c.lines[0] for c in ax.containers] for ax in panels)  # errorbar: the data line
    assert [c.get_label().split(" ")[0] for c in panels[0].containers] == ["bf16", "nvfp4"]
    np.testing.assert_allclose(passkey[0].get_ydata(), [1.0, 0.5])
    np.testing.assert_allclose(passkey[1].get_ydata(), [0.5, 0.0])
    np.testing.assert_allclose(passkey[0].get_xdata(), [4096, 8000], rtol=0.05)  # formats side by side
    np.testing.assert_allclose(ruler[0].get_ydata(), [0.75, 0.125])
    np.testing.assert_allclose(ruler[1].get_ydata(), [0.5, 0.0])


def test_wilson_interval_by_hand() -> None:
    from nvfp4kv.analysis.plots import _wilson

    hits, n = np.array([0.0, 3.0, 20.0, 1.0]), np.array([20.0, 20.0, 20.0, 0.0])
    z2 = 1.959963984540054**2
    centre = (hits[:3] + z2 / 2) / (n[:3] + z2)
    half = math.sqrt(z2) / (n[:3] + z2) * np.sqrt(hits[:3] * (n[:3] - hits[:3]) / n[:3] + z2 / 4)
    low, high = _wilson(hits, n)
    np.testing.assert_allclose(low[:3], centre - half, atol=1e-12)
    np.testing.assert_allclose(high[:3], centre + half, atol=1e-12)
    assert math.isnan(low[3]) and math.isnan(high[3])  # no trials: no interval


def test_plot_layer_sqnr_panels_and_lossless_note(run_a: Path) -> None:
    per_layer = A.load_per_layer(run_a)
    fig = A.plot_layer_sqnr(per_layer)
    images = _images(fig)
    assert len(images) == 4  # fp8 and nvfp4, K and V; BF16 has no finite SQNR
    nv_k = per_layer[(per_layer.kv == "nvfp4") & (per_layer.kind == "k")]
    np.testing.assert_allclose(images[2], nv_k.pivot_table(index="layer", columns="head", values="sqnr_db").to_numpy())
    assert "bf16" in fig._suptitle.get_text()


def test_plots_on_empty_frames_say_what_is_missing(tmp_path: Path) -> None:
    for fig in (A.plot_retrieval_heatmaps(pd.DataFrame(columns=["kv"])),
                A.plot_layer_sqnr(pd.DataFrame(columns=["kv", "kind", "sqnr_db"]))):
        assert isinstance(fig, Figure)
        assert any("No" in t.get_text() for ax in fig.axes for t in ax.texts)
        fig.savefig(tmp_path / "empty.png")


# ---------------------------------------------------------------------------- figure script
def test_make_figures_writes_the_readme_figures(run_a: Path, tmp_path: Path) -> None:
    from experiments.make_figures import main

    assert main([str(run_a), "--out", str(tmp_path), "--n-boot", "200", "--dpi", "60"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["accuracy.png", "accuracy_by_length.png", "accuracy_vs_memory.png", "layer_sqnr.png",
                     "retrieval_heatmap.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_figures_skips_what_the_run_lacks(tmp_path: Path) -> None:
    from experiments.make_figures import main

    run = write_results_fixture(tmp_path / "runs", with_report=False)
    for p in (run / "cells").glob("*.json"):
        if "__gsm8k__" not in p.name:
            p.unlink()
    out = tmp_path / "figs"
    assert main([str(run), "--out", str(out), "--n-boot", "100", "--dpi", "50"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "accuracy_vs_memory.png"]
