"""The CPU references give the same bits on CUDA (skipped without a GPU).

Kernels are checked against the references on whatever device they run on, so the references
themselves must not depend on the device. The risky spots: FP32 ``log2`` in
``fp4_mx_block16`` near powers of two, and torch's float8 cast vs our integer E4M3 rounding.
"""

from __future__ import annotations

import pytest
import torch

from nvfp4kv.formats import get_format
from nvfp4kv.formats.e4m3 import float_to_e4m3_bits, float_to_e4m3_bits_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIGS: list[tuple[str, dict]] = [
    ("bf16", {}),
    ("fp8_e4m3", {}),
    ("fp8_e4m3", {"scaling": "head"}),
    ("fp8_e4m3", {"scaling": "token"}),
    ("nvfp4", {}),
    ("nvfp4", {"tiny_scale": "modelopt"}),
    ("fp4_mx_block16", {}),
    ("mxfp4", {}),
    ("int4", {"axis": "token", "group_size": 32}),
    ("int4", {"axis": "channel", "group_size": 32}),
    ("int2", {"axis": "token", "group_size": 32}),
    ("int2", {"axis": "channel", "group_size": 32}),
]


def test_integer_e4m3_rounding_matches_the_cuda_cast() -> None:
    gen = torch.Generator().manual_seed(5)
    patterns = torch.randint(-(2**31), 2**31 - 1, (4_000_000,), generator=gen, dtype=torch.int64)
    x = patterns.to(torch.int32).view(torch.float32)
    x = x[~torch.isnan(x)]
    cpu = float_to_e4m3_bits(x)
    assert torch.equal(float_to_e4m3_bits(x.cuda()).cpu(), cpu)
    assert torch.equal(float_to_e4m3_bits_torch(x.cuda()).cpu(), cpu)


def near_power_of_two_blocks() -> torch.Tensor:
    """Blocks whose amax / 6 sits on or one to three ulps above a power of two (log2 edge)."""
    rows = []
    for k in range(-30, 31):
        for ulps in range(4):
            amax = torch.tensor(6.0 * 2.0**k, dtype=torch.float32)
            for _ in range(ulps):
                amax = torch.nextafter(amax, torch.tensor(float("inf")))
            row = torch.linspace(-1, 1, 64) * amax
            row[0] = amax
            rows.append(row)
    return torch.stack(rows).reshape(1, 1, -1, 64)


def inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(2, 4, 256, 64, generator=gen)
    heavy = base * torch.exp(2 * torch.randn(2, 4, 256, 1, generator=gen))
    edge = near_power_of_two_blocks()
    edge = edge[:, :, : edge.shape[2] // 32 * 32]
    return [base.to(torch.bfloat16), heavy, edge]


@pytest.mark.parametrize(("name", "options"), CONFIGS)
def test_reference_is_bit_identical_on_cpu_and_cuda(name: str, options: dict) -> None:
    fmt = get_format(name, **options)
    for x in inputs():
        x_gpu = x.cuda()
        gs = fmt.global_scale(x) if fmt.uses_global_scale else None
        gs_gpu = fmt.global_scale(x_gpu) if fmt.uses_global_scale else None
        if gs is not None:  # dynamic scales are computed on each device, and must agree
            assert torch.equal(gs_gpu.cpu(), gs), (name, options)
        cpu = fmt.quantize(x, gs)
        gpu = fmt.quantize(x_gpu, gs_gpu)
        for key, part in cpu.items():
            assert torch.equal(gpu[key].cpu(), part), (name, options, key)
        decoded = fmt.dequantize(cpu, gs, torch.float32)
        assert torch.equal(fmt.dequantize(gpu, gs_gpu, torch.float32).cpu(), decoded)


def test_scale_conventions_agree_on_cuda() -> None:
    from nvfp4kv.formats.conventions import (
        available_conventions,
        from_decode_scale,
        to_decode_scale,
    )

    gs = torch.rand(10_000, generator=torch.Generator().manual_seed(2)) + 1e-3
    for name in available_conventions():
        value = from_decode_scale(gs, name)
        assert torch.equal(from_decode_scale(gs.cuda(), name).cpu(), value), name
        back = to_decode_scale(value.cuda(), name).cpu()
        assert torch.equal(back, to_decode_scale(value, name)), name
