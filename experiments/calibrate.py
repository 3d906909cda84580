"""Calibrate static KV scales: ``python -m experiments.calibrate model=<model> [kv=<kv>] [overrides]``.

Examples::

    python -m experiments.calibrate                                   # embedded SmolLM2, 64 GSM8K-train texts
    python -m experiments.calibrate model=qwen25_coder_1p5b model.name_or_path=offline:qwen2.5-coder-1.5b-instruct \\
        model.dtype=float32 n_samples=32 max_length=1024
    python -m experiments.run +sweep=mmlu kvs.nvfp4.scale_policy=static kvs.nvfp4.static_scales_file=<printed path>

Writes the scales file (configs/calibrate.yaml says where) and prints its path and the per-layer
scales the selected KV config would use. Exit codes as experiments.run: 2 for a user error.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import nvfp4kv.config  # noqa: F401  (registers the schemas configs/calibrate.yaml starts from, and the resolvers)
from nvfp4kv.errors import NVFP4KVError

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "configs")


def default_output(model_label: str, dataset: str, n: int, max_length: int, seed: int) -> Path:
    name = Path(dataset).stem if dataset.endswith(".jsonl") else dataset
    return Path("results") / "scales" / model_label / f"{name}-n{n}-L{max_length}-s{seed}.json"


def run(cfg: DictConfig) -> Path:
    """Validate the KV config and the data first (seconds), then load the model and calibrate."""
    from nvfp4kv.cache import KVCacheConfig
    from nvfp4kv.cache.config import decode_scale_from_amax
    from nvfp4kv.calibration import write_scales_file
    from nvfp4kv.calibration.collect import calibrate
    from nvfp4kv.calibration.texts import calibration_texts
    from nvfp4kv.eval.loaded_model import get_model
    from nvfp4kv.eval.plan import _model_spec

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(plain, dict)
    kv = KVCacheConfig.from_dict(plain["kv"])
    model_cfg = dict(plain["model"])
    if model_cfg.get("device") in (None, "auto"):
        model_cfg["device"] = plain["device"]
    spec = _model_spec(model_cfg)  # unknown keys and a missing local model refused before loading
    texts, origin = calibration_texts(str(plain["dataset"]), plain["data_dir"], int(plain["n_samples"]), int(plain["seed"]))
    bundle = get_model(spec)
    scales = calibrate(bundle, texts, max_length=int(plain["max_length"]), progress=bool(plain["progress"]),
                       data={"dataset": plain["dataset"], "source": origin, "n_samples": len(texts), "seed": plain["seed"]})
    out = Path(plain["output"]) if plain["output"] else default_output(
        bundle.name, str(plain["dataset"]), int(plain["n_samples"]), int(plain["max_length"]), int(plain["seed"]))
    write_scales_file(out, scales)
    k_fmt, v_fmt = kv.build_format("k"), kv.build_format("v")
    print(f"calibrated {bundle.name} on {origin}: {len(texts)} texts, {scales.data['windows']} windows, "
          f"{scales.data['tokens']} tokens")
    print(f"scales for kv={kv.label} (layer: k_scale v_scale):")
    for i, (k_amax, v_amax) in scales.amax_pairs().items():
        print(f"  {i:3d}: {decode_scale_from_amax(k_fmt, k_amax):.6g} {decode_scale_from_amax(v_fmt, v_amax):.6g}")
    print(f"use it: scale_policy=static static_scales_file={out}")
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="calibrate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = run(cfg)
    except NVFP4KVError as err:
        if cfg.get("debug", False):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"scales file: {out}")


if __name__ == "__main__":
    main()
