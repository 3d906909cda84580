"""experiments.bench_decode on the tiny model: the record's structure and identical outputs
across dequant_cache modes (no timing assertions: timings are the benchmark's business)."""

from __future__ import annotations

import json

from experiments import bench_decode
from nvfp4kv.testing import tiny_llama


def test_bench_decode_record_structure_and_identical_outputs(tmp_path) -> None:
    record = bench_decode.run_bench(tiny_llama(), prompt_len=24, new_tokens=4, repeats=1,
                                    growth_contexts=(8, 24), growth_steps=2)
    configs = record["configs"]
    assert {"dynamic", *bench_decode.OURS} <= set(configs)
    assert configs["dynamic"]["ratio_to_dynamic"] == 1.0
    for label, c in configs.items():
        assert len(c["tokens"]) == 4, label
        assert c["median_s"] > 0 and len(c["times_s"]) == 1
        assert 0.0 <= c["agreement_with_dynamic"] <= 1.0
        assert set(record["per_step_growth"][label]["step_ms"]) == {"8", "24"}
    assert set(record["outputs_identical_across_dequant_cache"]) == {f"{a}=={b}" for a, b in bench_decode.SAME_OUTPUT_PAIRS}
    assert all(record["outputs_identical_across_dequant_cache"].values())
    assert configs["dynamic"]["agreement_with_dynamic"] == 1.0
    json.dumps(record, allow_nan=False)  # JSON-ready


def test_bench_decode_main_writes_json(tmp_path) -> None:
    out = tmp_path / "decode.json"
    bench_decode.main(["--tiny", "--prompt-len", "16", "--new-tokens", "2", "--repeats", "1",
                       "--growth-steps", "1", "--only", "ours_fp8", "ours_fp8_dequant_cache", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {"dynamic", "ours_fp8", "ours_fp8_dequant_cache"}
    assert data["outputs_identical_across_dequant_cache"] == {"ours_fp8==ours_fp8_dequant_cache": True}
