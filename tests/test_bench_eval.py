"""experiments.bench_eval on a tiny slice with the tiny model: the record's structure, the same
requests for stock and ours, ratios computed against stock (no timing assertions: timings are the
benchmark's business)."""

from __future__ import annotations

import json

from experiments import bench_eval


def test_bench_eval_runs_stock_and_ours_side_by_side_on_a_tiny_slice(tmp_path) -> None:
    out = tmp_path / "eval.json"
    bench_eval.main(["--tiny", "--limit", "1", "--subjects", "anatomy", "--max-gen-toks", "3", "--batch-size", "2",
                     "--kv", "bf16", "nvfp4", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["settings"]["batch_size"] == 2 and record["settings"]["model"] == "tiny"
    for task, requests in (("mmlu", 4), ("gsm8k", 1)):  # 1 question x 4 choices; 1 problem
        configs = record["tasks"][task]["configs"]
        assert set(configs) == {"stock", "ours_bf16", "ours_nvfp4"}
        assert configs["stock"]["throughput_vs_stock"] == 1.0
        for row in configs.values():
            assert row["requests"] == requests
            assert row["requests_per_s"] > 0 and row["cpu_s_per_request"] >= 0
            assert row["throughput_vs_stock"] > 0
        assert set(record["tasks"][task]["same_responses_as_stock"]) == {"ours_bf16", "ours_nvfp4"}
    # generations: strings, no log-likelihoods to compare
    assert record["tasks"]["gsm8k"]["max_abs_loglikelihood_diff_vs_stock"]["ours_bf16"] is None
    assert record["tasks"]["mmlu"]["max_abs_loglikelihood_diff_vs_stock"]["ours_bf16"] >= 0
