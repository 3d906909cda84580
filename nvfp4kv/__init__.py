"""nvfp4kv: measure what an LLM loses when its KV cache is stored in NVFP4 (vs FP8 and BF16).

Data flows one way: config -> model + cache -> lm-eval -> records -> tables and plots.

- ``nvfp4kv.formats``: each KV format as pure functions + constants, bit-exact references.
- ``nvfp4kv.cache``: a transformers ``Cache`` that stores K/V really packed.
- ``nvfp4kv.kernels``: Triton (and FlashInfer) kernels, bit-exact with the references.
- ``nvfp4kv.eval``: the lm-eval model class, tasks, data and the sweep runner.
- ``nvfp4kv.metrics`` / ``nvfp4kv.stats``: fidelity diagnostics and paired statistics.
- ``nvfp4kv.analysis``: load any sweep directory as a tidy DataFrame, compare, plot.
"""

__version__ = "0.1.0"
