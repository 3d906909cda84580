"""A run dir: its records (nvfp4kv.results: atomic writes, cell and sample files) and the report
built from them (nvfp4kv.analysis: the tidy frame, results.csv, table.md's deltas, plots)."""

from __future__ import annotations

import json
import math
import os

import pytest

from nvfp4kv import analysis as A
from nvfp4kv import results
from nvfp4kv.analysis import report
from nvfp4kv.analysis.load import policy_label


def make_cell(kv: str, fmt: str, value: float, *, task: str = "gsm8k", metric: str = "exact_match,strict-match",
              bits: float = 16.0, stderr: float | None = 0.02, n: int = 50, extra: dict | None = None, **kv_fields) -> dict:
    kv_config = {"k_format": fmt, "v_format": fmt, "scale_policy": "prefill", "read_mode": "serving",
                 "residual_length": 0, "sink_tokens": 0, "skip_layers": [], **kv_fields}
    return {"cell_id": results.cell_id("m", task, kv), "run_id": "r1", "model": "m", "task": task, "kv": kv,
            "kv_config": kv_config, "bits_per_element": bits,
            "metrics": {metric: {"value": value, "stderr": stderr, "n": n}}, "extra": extra or {}}


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    results.atomic_write_json(path, {"x": 1})
    results.atomic_write_json(path, {"x": 2, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"x": 2, "nan": None}  # JSON has no NaN: written as null
    assert os.listdir(path.parent) == ["a.json"]


def test_failed_atomic_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    results.atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failed_serialisation_writes_nothing(tmp_path):
    path = tmp_path / "cell.jsonl"

    class Exploding:
        def tolist(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        results.atomic_write_jsonl(path, [{"ok": 1}, {"bad": Exploding()}])
    assert not path.exists() and os.listdir(tmp_path) == []


def test_write_cell_writes_samples_before_the_commit_marker(tmp_path, monkeypatch):
    order = []
    real = results.atomic_write_text
    monkeypatch.setattr(results, "atomic_write_text", lambda p, t: (order.append(os.path.basename(p)), real(p, t))[1])
    cell = make_cell("bf16", "bf16", 0.5)
    results.write_cell(tmp_path, cell, [{"doc_id": 0, "metrics": {"acc": 1.0}}])
    assert order == [f"{cell['cell_id']}.jsonl", f"{cell['cell_id']}.json"]
    assert results.read_cells(tmp_path) == [json.loads(json.dumps(cell))]
    assert results.read_samples(tmp_path, cell["cell_id"]) == [{"doc_id": 0, "metrics": {"acc": 1.0}}]


def test_read_cells_ignores_temporary_files(tmp_path):
    results.write_cell(tmp_path, make_cell("bf16", "bf16", 0.5))
    (tmp_path / "cells" / ".x.json.abc.tmp").write_text("{partial")
    assert [c["kv"] for c in results.read_cells(tmp_path)] == ["bf16"]


def test_cell_ids_are_filesystem_safe():
    assert results.cell_id("meta-llama/Llama-3.1-8B", "mmlu", "k-fp8_e4m3/v-nvfp4+res128") == \
        "meta-llama-Llama-3.1-8B__mmlu__k-fp8_e4m3-v-nvfp4+res128"
    assert "/" not in results.cell_id("a b/c", "t:x", "kv")


# ---------------------------------------------------------------------------- tidy frame (nvfp4kv.analysis)
def test_tidy_frame_has_the_layout_columns_and_one_row_per_metric():
    cells = [make_cell("bf16", "bf16", 0.5), make_cell("nvfp4", "nvfp4", 0.4, bits=4.5, residual_length=128)]
    cells[1]["metrics"]["exact_match,flexible-extract"] = {"value": 0.45, "stderr": None, "n": 50}
    frame = A.tidy_frame(cells)
    assert set(report.CSV_COLUMNS) <= set(frame.columns)
    assert len(frame) == 3
    row = frame[(frame.kv == "nvfp4") & (frame.metric == "exact_match,strict-match")].iloc[0]
    assert (row.k_format, row.policy, row.bits_per_element, row.value, row.n) == ("nvfp4", "prefill/serving+res128", 4.5, 0.4, 50)
    assert math.isnan(frame[frame.metric == "exact_match,flexible-extract"].iloc[0].stderr)


def test_policy_label_spells_out_windows_and_reads():
    assert policy_label({"scale_policy": "dynamic", "read_mode": "quantized", "sink_tokens": 4,
                         "residual_length": 64, "skip_layers": [0, 1]}) == "dynamic/quantized+sink4+res64+skip0,1"


def test_kv_order_puts_the_baseline_first_then_by_bits():
    frame = A.tidy_frame([make_cell("nvfp4", "nvfp4", 0.4, bits=4.5), make_cell("fp8", "fp8_e4m3", 0.5, bits=8),
                          make_cell("bf16", "bf16", 0.5)])
    assert A.kv_order(frame) == ["bf16", "fp8", "nvfp4"]
    assert report.display_order(frame)["kv"].tolist() == ["bf16", "fp8", "nvfp4"]


# ---------------------------------------------------------------------------- table.md (nvfp4kv.analysis.report)
def test_markdown_table_deltas_vs_bf16_in_points():
    frame = A.tidy_frame([make_cell("nvfp4", "nvfp4", 0.42, bits=4.5, stderr=0.031),
                          make_cell("bf16", "bf16", 0.5, stderr=0.025),
                          make_cell("fp8", "fp8_e4m3", 0.515, bits=8.0)])
    table = A.markdown_table(A.compare(frame), baseline="bf16")
    rows = [line for line in table.splitlines() if line.startswith("| m |")]
    assert [r.split(" | ")[3] for r in rows] == ["bf16", "fp8", "nvfp4"]
    assert "| 50.0 ± 2.5 | (baseline) |" in rows[0]
    assert "| 51.5 ± 2.0 | +1.5 |" in rows[1]
    assert "| 42.0 ± 3.1 | -8.0 | 50 |" in rows[2]


def test_markdown_table_keeps_units_of_non_rate_metrics():
    frame = A.tidy_frame([make_cell("bf16", "bf16", 0.0, metric="kl", stderr=None),
                          make_cell("nvfp4", "nvfp4", 0.0123, metric="kl", bits=4.5, stderr=None)])
    assert "| 0.0123 | +0.0123 |" in A.markdown_table(A.compare(frame))


def test_markdown_table_without_baseline_leaves_delta_empty():
    frame = A.tidy_frame([make_cell("nvfp4", "nvfp4", 0.4, bits=4.5)])
    row = [line for line in A.markdown_table(A.compare(frame)).splitlines() if line.startswith("| m |")][0]
    assert "| 40.0 ± 2.0 |  | 50 |" in row


def test_markdown_table_adds_paired_ci_columns_from_stats(tmp_path):
    """With per-sample files, compare() adds a paired CI (nvfp4kv.stats); checked against a hand count."""
    base = [{"doc_id": i, "task": "gsm8k", "metrics": {"acc": 1.0 if i < 10 else 0.0}} for i in range(20)]
    worse = [{"doc_id": i, "task": "gsm8k", "metrics": {"acc": 1.0 if i < 6 else 0.0}} for i in range(20)]
    results.write_cell(tmp_path, make_cell("bf16", "bf16", 0.5, metric="acc", n=20), base)
    results.write_cell(tmp_path, make_cell("nvfp4", "nvfp4", 0.3, metric="acc", bits=4.5, n=20), worse)
    cmp = A.compare(A.load_results(tmp_path), "bf16", samples=A.load_samples(tmp_path))
    assert (cmp["ci_method"] == "paired-bootstrap").any()
    table = A.markdown_table(cmp, "bf16")
    assert "paired Δ [95% CI]" in table
    row = [line for line in table.splitlines() if "| nvfp4 |" in line][0]
    assert "| -20.0 [" in row  # 4 of 20 samples flipped 1 -> 0
    assert "| 0.125 |" in row  # exact McNemar, b=4, c=0: 2 * 0.5**4


# ---------------------------------------------------------------------------- plots and report
def test_write_report_writes_csv_table_and_png_plots(tmp_path):
    grid = [{"context_len": L, "depth": d, "acc": 1.0 - d / 2, "n": 2} for L in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    per_layer = [{"layer": l, "head": h, "kind": k, "sqnr_db": 20.0 + l, "attn_rel_err": 0.01}
                 for l in range(3) for h in range(2) for k in ("k", "v")]
    for kv, fmt, bits, value in (("bf16", "bf16", 16.0, 0.9), ("nvfp4", "nvfp4", 4.5, 0.7)):
        results.write_cell(tmp_path, make_cell(kv, fmt, value, task="passkey", metric="acc", bits=bits, extra={"grid": grid}))
        results.write_cell(tmp_path, make_cell(kv, fmt, 0.01, task="fidelity", metric="kl", bits=bits,
                                               extra={"per_layer": per_layer}))
    written = A.write_report(tmp_path, title="unit")
    assert set(written) == {"csv", "table", "accuracy", "retrieval", "layers"}
    for key in ("accuracy", "retrieval", "layers"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[key].stat().st_size > 1000
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == ",".join(report.CSV_COLUMNS)
    assert (tmp_path / "table.md").read_text().startswith("# unit")


def test_report_of_an_empty_run_is_still_written(tmp_path):
    written = A.write_report(tmp_path)
    assert "no finished cells" in written["table"].read_text()
    assert written["accuracy"].is_file()


def test_report_reads_the_shared_results_fixture(tmp_path):
    """The analysis/gate fixture is written with write_cell; the report must digest it."""
    fixtures = pytest.importorskip("fixtures_results")
    run_dir = fixtures.write_results_fixture(tmp_path)
    frame = A.tidy_frame(results.read_cells(run_dir))
    assert set(frame.kv) >= {"bf16", "nvfp4"} and frame["value"].notna().all()
    assert "Δ vs bf16" in (run_dir / "table.md").read_text()


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    path = results.atomic_write_text(tmp_path / "table.md", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~results._UMASK
