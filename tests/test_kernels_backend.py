"""Backend selection: names, bit-exactness through the codec interface, and clear errors."""

from __future__ import annotations

import types

import pytest
import torch

from nvfp4kv.errors import BackendUnavailableError, ConfigError
from nvfp4kv.formats import get_format
from nvfp4kv.kernels import available_backends, get_backend
from nvfp4kv.kernels.backend import AutoBackend, TorchBackend, TritonBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

FORMATS = [
    ("nvfp4", {}),
    ("nvfp4", {"tiny_scale": "modelopt"}),
    ("fp4_mx_block16", {}),
    ("mxfp4", {}),
    ("fp8_e4m3", {}),
    ("fp8_e4m3", {"scaling": "head"}),
    ("fp8_e4m3", {"scaling": "token"}),
    ("bf16", {}),
    ("int4", {"axis": "token"}),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(width), b.view(width))


@pytest.mark.parametrize(("name", "options"), FORMATS)
def test_triton_backend_is_bit_exact_through_the_codec_interface(name: str, options: dict) -> None:
    fmt = get_format(name, **options)
    x = torch.randn(2, 2, 8, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as transformers passes K/V
    backend = get_backend("triton")
    gs = fmt.global_scale(x) if fmt.uses_global_scale else None
    parts = backend.quantize(fmt, x.to(DEVICE), None if gs is None else gs.to(DEVICE))
    ref_parts = fmt.quantize(x, gs)
    assert parts.keys() == ref_parts.keys()
    for key in parts:
        assert _same(parts[key], ref_parts[key]), key
    # dynamic global scale computed inside the backend, like the reference does
    if gs is not None:
        dyn = backend.quantize(fmt, x.to(DEVICE))
        for key in dyn:
            assert _same(dyn[key], ref_parts[key]), key
    for dtype in (torch.bfloat16, torch.float32):
        out = backend.dequantize(fmt, parts, None if gs is None else gs.to(DEVICE), dtype)
        assert _same(out, fmt.dequantize(ref_parts, gs, dtype))


@pytest.mark.parametrize("name", ["nvfp4", "fp8_e4m3", "mxfp4"])
def test_nonfinite_map_goes_through_the_reference_with_same_bits(name: str) -> None:
    fmt = get_format(name, nonfinite="map")
    x = torch.randn(1, 1, 2, 32, generator=torch.Generator().manual_seed(2))
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    parts = get_backend("triton").quantize(fmt, x.to(DEVICE))
    ref = fmt.quantize(x)
    assert all(_same(parts[k], ref[k]) for k in ref)
    with pytest.raises(Exception, match="NaN/Inf"):
        get_backend("triton").quantize(get_format(name), x.to(DEVICE))


def test_backend_names_and_unknown_name() -> None:
    assert isinstance(get_backend("torch"), TorchBackend)
    assert isinstance(get_backend("triton"), TritonBackend)
    assert isinstance(get_backend("auto"), AutoBackend)
    with pytest.raises(ConfigError, match="Known: torch, triton, flashinfer, auto"):
        get_backend("cuda")
    status = available_backends()
    assert status["torch"] == "ok" and set(status) == {"torch", "triton", "flashinfer", "auto"}


def test_auto_routes_by_device_and_reports_its_pick() -> None:
    auto = get_backend("auto")
    fmt = get_format("nvfp4")
    x = torch.randn(1, 1, 4, 32)
    parts = auto.quantize(fmt, x)
    assert auto.picked["cpu"] == "torch"  # CPU tensors always get the references
    assert all(torch.equal(parts[k], fmt.quantize(x)[k]) for k in parts)
    if torch.cuda.is_available():
        auto.quantize(fmt, x.cuda())
        assert auto.picked["cuda"] == "triton"


def test_triton_backend_refuses_tensors_it_cannot_run_on() -> None:
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        get_backend("triton").quantize(get_format("nvfp4"), torch.zeros(1, 1, 1, 32, device="meta"))


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10,
    reason="on sm_100+ with flashinfer installed the backend can run; see the sm_100 test",
)
def test_flashinfer_unavailable_error_names_reason_and_fix() -> None:
    with pytest.raises(BackendUnavailableError) as err:
        get_backend("flashinfer")
    message = str(err.value)
    assert "flashinfer" in message and "backend='triton'" in message
    assert "flashinfer" in available_backends()["flashinfer"]


def _fake_flashinfer(calls: list) -> types.ModuleType:
    """Stands in for flashinfer to test the bridge's plumbing (shapes, scale convention)."""
    from nvfp4kv.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4

    mod = types.ModuleType("flashinfer")

    def nvfp4_kv_quantize(x, global_scale):
        calls.append(("q", tuple(x.shape), x.is_contiguous(), global_scale.clone()))
        return quantize_nvfp4(x, global_scale.reshape(1, 1))

    def nvfp4_kv_dequantize(codes, scales, global_scale, output_dtype=torch.bfloat16):
        calls.append(("dq", tuple(codes.shape), global_scale.clone()))
        return dequantize_nvfp4(codes, scales, global_scale.reshape(1, 1), output_dtype)

    mod.nvfp4_kv_quantize = nvfp4_kv_quantize
    mod.nvfp4_kv_dequantize = nvfp4_kv_dequantize
    return mod


def test_flashinfer_bridge_plumbing_with_a_fake_module() -> None:
    from nvfp4kv.kernels.backend import FlashInferBackend

    calls: list = []
    backend = FlashInferBackend(module=_fake_flashinfer(calls))
    fmt = get_format("nvfp4")
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).transpose(1, 2)
    gs = fmt.global_scale(x)
    parts = backend.quantize(fmt, x, gs)
    assert calls[0][1] == (2 * 5 * 3, 32) and calls[0][2]  # flattened to [M, K], contiguous
    assert float(calls[0][3]) == float(gs)  # FlashInfer's KV functions take the decode scale
    assert parts["codes"].shape == (2, 5, 3, 16) and parts["scales"].shape == (2, 5, 3, 2)
    out = backend.dequantize(fmt, parts, gs, torch.bfloat16)
    assert out.shape == x.shape
    with pytest.raises(BackendUnavailableError, match="bf16/fp16"):
        backend.quantize(fmt, x.float(), gs)
    with pytest.raises(BackendUnavailableError, match="only implements nvfp4"):
        backend.quantize(get_format("mxfp4"), x, None)
    with pytest.raises(BackendUnavailableError, match="one global scale per tensor"):
        backend.quantize(fmt, x, torch.ones(1, 5, 1, 1))
    assert backend.bit_exact is False


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10),
    reason="needs an sm_100+ (Blackwell) GPU with flashinfer installed; cannot run here",
)
def test_flashinfer_agreement_on_sm100() -> None:  # pragma: no cover - no Blackwell in CI
    backend = get_backend("flashinfer")
    fmt = get_format("nvfp4")
    x = torch.randn(4, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    gs = fmt.global_scale(x)
    parts = backend.quantize(fmt, x, gs)
    ref = fmt.quantize(x.cpu(), gs.cpu())
    agree = (parts["codes"].cpu() == ref["codes"]).float().mean().item()
    assert agree > 0.999, f"FlashInfer codes agree with the reference on only {agree:.4%} of bytes"


def test_flashinfer_bridge_saturates_like_the_reference() -> None:
    """FlashInfer's dequantize overflows to Inf past FP16's max; the backend saturates (F9)."""
    from nvfp4kv.kernels.backend import FlashInferBackend

    backend = FlashInferBackend(module=_fake_flashinfer([]))
    fmt = get_format("nvfp4")
    x = torch.full((1, 1, 2, 32), 1.0, dtype=torch.bfloat16)
    x[0, 0, 0, :16] = 65504.0
    gs = fmt.global_scale(x) * 1.01  # a calibrated scale a little above this data's: decodes past 65504
    parts = fmt.quantize(x, gs)
    out = backend.dequantize(fmt, parts, gs, torch.float16)
    assert torch.isfinite(out).all() and out.max().item() == 65504.0
    assert torch.equal(out, fmt.dequantize(parts, gs, torch.float16))


# ---------------------------------------------------------------- a format owns its kernels
def test_a_format_declared_outside_the_package_gets_kernels_backends_and_fused_decode(monkeypatch) -> None:
    """Adding a format is its module (+ kernels it declares): no table in nvfp4kv.kernels or
    nvfp4kv.cache names it. A subclass registered under a new name, declaring nvfp4's kernels,
    is served by the Triton backend, the fused decode operand and the cache config as is; one
    declaring no kernels falls back to its reference and is not fused."""
    from dataclasses import dataclass, field

    from nvfp4kv.cache import KVCacheConfig, QuantizedKVCache
    from nvfp4kv.formats import FormatKernels
    from nvfp4kv.formats import base as formats_base
    from nvfp4kv.formats.nvfp4 import NVFP4Format
    from nvfp4kv.kernels.packed_operand import packed_operand

    @dataclass(frozen=True)
    class DemoFormat(NVFP4Format):
        name: str = field(default="demo_nvfp4", init=False)

    @dataclass(frozen=True)
    class PlainFormat(NVFP4Format):
        kernels = FormatKernels()
        name: str = field(default="demo_plain", init=False)

    monkeypatch.setitem(formats_base._REGISTRY, "demo_nvfp4", DemoFormat)
    monkeypatch.setitem(formats_base._REGISTRY, "demo_plain", PlainFormat)
    x = torch.randn(1, 2, 4, 32, generator=torch.Generator().manual_seed(4))
    backend = get_backend("triton")
    for name in ("demo_nvfp4", "demo_plain"):
        fmt = get_format(name)
        gs = fmt.global_scale(x)
        parts = backend.quantize(fmt, x.to(DEVICE), gs.to(DEVICE))
        ref = fmt.quantize(x, gs)
        assert all(_same(parts[k], ref[k]) for k in ref)
        assert _same(backend.dequantize(fmt, parts, gs.to(DEVICE), torch.float16), fmt.dequantize(ref, gs, torch.float16))
        assert (packed_operand(fmt, ref, gs) is not None) == (name == "demo_nvfp4")
    cfg = KVCacheConfig(k_format="demo_nvfp4", v_format="demo_plain", backend="triton", scale_policy="static",
                        static_scales={0: (0.1, 0.1)}, scale_convention="trtllm_xqa")  # nvfp4's conventions
    cache = QuantizedKVCache(cfg)
    k_out, _ = cache.update(x.to(DEVICE), x.to(DEVICE), 0)
    assert k_out.shape == x.shape and cache.layers[0].k_format.name == "demo_nvfp4"


def test_no_module_in_kernels_or_cache_branches_on_a_format_name() -> None:
    """The invariant behind "a format owns its kernels": no ``== "nvfp4"``, ``in ("mxfp4", ...)``
    or dict keyed by a format name in nvfp4kv/kernels or nvfp4kv/cache."""
    import re
    from pathlib import Path

    import nvfp4kv
    from nvfp4kv.formats import available_formats

    names = "|".join(re.escape(n) for n in available_formats())
    quoted = rf"""["'](?:{names})["']"""
    patterns = [
        re.compile(rf"(?:==|!=)\s*{quoted}"),  # name == "nvfp4"
        re.compile(rf"{quoted}\s*(?:==|!=)"),  # "nvfp4" == name
        re.compile(rf"\bin\s*[\(\[\{{]\s*{quoted}"),  # name in ("nvfp4", ...)
        re.compile(rf"^\s*{quoted}\s*:", re.MULTILINE),  # {"nvfp4": ...} table entries
        re.compile(rf"[\(\[\{{,]\s*{quoted}\s*,\s*{quoted}"),  # tuples/lists of format names
    ]
    root = Path(nvfp4kv.__file__).parent
    offenders = []
    for package in ("kernels", "cache"):
        for path in sorted((root / package).glob("*.py")):
            text = path.read_text()
            offenders += [f"{path.name}: {m.group(0)!r}" for p in patterns for m in p.finditer(text)]
    assert not offenders, offenders
