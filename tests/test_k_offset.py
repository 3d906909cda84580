"""The K-offset diagnostic (nvfp4kv.metrics.k_offset, experiments.k_offset): its statistics on hand-made
keys, and the experiment end to end on the embedded model."""

from __future__ import annotations

import json

import torch

from nvfp4kv.formats import get_format
from nvfp4kv.metrics.capture import AttentionInputs
from nvfp4kv.metrics.k_offset import key_attention_error, offset_report, offset_stats


def _inputs(offset: float, seed: int = 0, t: int = 64, d: int = 32) -> AttentionInputs:
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(1, 2, 1, d)
    shift[..., :2] = offset
    k = torch.randn(1, 2, t, d, generator=g) + shift
    return AttentionInputs(q=torch.randn(1, 4, t, d, generator=g), k=k, v=torch.randn(1, 2, t, d, generator=g),
                           scaling=d**-0.5)


def test_offset_stats_hand_cases():
    constant = torch.ones(1, 1, 8, 4) * 3.0
    constant[..., 0, :] += 1e-3  # a tiny spread, so the ratio is finite
    stats = offset_stats(constant)
    assert stats["offset_share"] > 0.999 and stats["offset_to_spread"] > 1e3 and stats["amax"] > 3.0
    balanced = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 4, 1)
    assert offset_stats(balanced)["offset_share"] == 0.0


def test_offset_dominated_keys_lose_most_of_their_error_under_centering():
    rec = _inputs(offset=300.0)
    for name in ("fp8_e4m3", "nvfp4", "mxfp4"):
        fmt = get_format(name)
        raw, centered = key_attention_error(rec, fmt, False), key_attention_error(rec, fmt, True)
        assert centered < raw / 5, (name, raw, centered)
    plain = _inputs(offset=0.0)
    fmt = get_format("nvfp4")
    raw, centered = key_attention_error(plain, fmt, False), key_attention_error(plain, fmt, True)
    assert 0.5 < centered / raw < 2.0, "no offset: centering neither helps nor hurts much"


def test_offset_report_rows():
    rows = offset_report({0: _inputs(300.0), 1: _inputs(0.0)}, {"nvfp4": get_format("nvfp4")})
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["offset_share"] > 0.9 > rows[1]["offset_share"]
    assert {"attn_err_nvfp4", "attn_err_nvfp4_centered"} <= rows[0].keys()


def test_experiment_runs_on_the_embedded_model(tmp_path):
    from experiments.k_offset import main

    out = tmp_path / "k.json"
    main(["--model", "embedded:smollm2-135m-instruct", "--tokens", "64", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert len(payload["rows"]) == 30 and payload["tokens"] == 64
    assert all(0.0 <= r["offset_share"] <= 1.0 for r in payload["rows"])
    assert out.with_suffix(".md").read_text().startswith("# K offset")
