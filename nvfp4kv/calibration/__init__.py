"""Calibrated static KV scales: collect per-layer K/V amax on a calibration set, write them to a
scales file with provenance, and turn them into each format's decode scales.

Why a package of its own: engines that serve FP8/NVFP4 KV (TensorRT-LLM/ModelOpt, vLLM and
SGLang with checkpoint scales) use *static* per-tensor scales fixed before serving, not the
per-request amax our ``prefill`` policy takes. A number measured with per-request scales is an
upper bound no engine reaches; these modules produce the scales an engine would run with.

- :mod:`~nvfp4kv.calibration.scales_file`: the file format (JSON), torch-free, and its checks
- :mod:`~nvfp4kv.calibration.collect`: run a model over texts and record K/V amax per layer/head
- :mod:`~nvfp4kv.calibration.texts`: the calibration texts (a training split, never evaluation data)
- :mod:`~nvfp4kv.calibration.checkpoint`: ``k_scale``/``v_scale`` tensors read from a checkpoint
"""

from nvfp4kv.calibration.scales_file import ScalesFile, load_scales_file, write_scales_file

__all__ = ["ScalesFile", "load_scales_file", "write_scales_file"]
