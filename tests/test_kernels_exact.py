"""Triton quantize/dequantize are bit-exact with the PyTorch references.

Runs under the Triton interpreter on CPU (conftest sets ``TRITON_INTERPRET=1`` without CUDA)
and compiled on a GPU. References are always computed on CPU, so a GPU run checks the kernel
against the same definition. Inputs: random data over many magnitudes, every rounding edge
we know (E2M1 ties, saturation, zero and tiny blocks, E4M3 binade carries such as 126.2 and
-7.94 that the interpreter's own fp8 cast gets wrong, MX16's ``log2`` near powers of two),
all three input dtypes, strided inputs and every global-scale granularity.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4kv.formats import fp4_mx_block16 as ref_mx16
from nvfp4kv.formats import fp8_e4m3 as ref_fp8
from nvfp4kv.formats import mxfp4 as ref_mxfp4
from nvfp4kv.formats import nvfp4 as ref_nvfp4
from nvfp4kv.formats.e2m1 import E2M1_BOUNDS
from nvfp4kv.kernels import triton_fp8, triton_mx, triton_nvfp4
from nvfp4kv.kernels.triton_common import e4m3_decode, e4m3_encode_signed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included, -0.0 != +0.0)."""
    a, b = _cpu(a).contiguous(), _cpu(b).contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(width), b.view(width))


def _random_kv(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal data whose per-token magnitude spans many binades (1e-4 .. 1e3), plus outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.logspace(-4, 3, shape[2])[None, None, :, None]
    x[..., ::7] *= 9.0
    return x.to(dtype)


def _adversarial_rows(block: int) -> torch.Tensor:
    """Rows of blocks whose max pins the block scale to 1 (E2M1 values are the data).

    Every E2M1 tie, both neighbours of every tie, exact codes, +-6 and zeros.
    """
    ties = list(E2M1_BOUNDS)
    vals: list[float] = []
    for t in ties:
        vals += [t, math.nextafter(t, 0.0), math.nextafter(t, 10.0)]
    vals += [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    vals += [-v for v in vals]
    per_block = block - 1
    rows = []
    for i in range(0, len(vals), per_block):
        chunk = vals[i : i + per_block]
        chunk += [0.0] * (per_block - len(chunk))
        rows.append([6.0] + chunk)  # block max 6 -> scale exactly 1 (NVFP4 with gs = 1)
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------


def _check_nvfp4(x: torch.Tensor, gs: torch.Tensor, tiny_scale: str = "zero") -> None:
    codes, scales = triton_nvfp4.quantize_nvfp4(_dev(x), _dev(gs), tiny_scale)
    ref_codes, ref_scales = ref_nvfp4.quantize_nvfp4(_cpu(x), _cpu(gs), tiny_scale)
    assert _same_bits(scales, ref_scales), "block scale bytes differ"
    assert _same_bits(codes, ref_codes), "E2M1 code bytes differ"
    for dtype in OUT_DTYPES:
        out = triton_nvfp4.dequantize_nvfp4(codes, scales, _dev(gs), dtype)
        assert _same_bits(out, ref_nvfp4.dequantize_nvfp4(ref_codes, ref_scales, _cpu(gs), dtype)), dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiny_scale", ["zero", "modelopt"])
def test_nvfp4_random_matches_reference(dtype: torch.dtype, tiny_scale: str) -> None:
    x = _random_kv((2, 3, 24, 64), seed=1, dtype=dtype)
    gs = ref_nvfp4.nvfp4_global_scale(x).reshape(1, 1, 1, 1)
    _check_nvfp4(x, gs, tiny_scale)


def test_nvfp4_scale_granularities_and_strided_input() -> None:
    x = _random_kv((2, 4, 10, 32), seed=2)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # HF's key_states layout
    assert not strided.is_contiguous()
    per_head = x.abs().amax(dim=(0, 2, 3), keepdim=True) / (6 * 448)
    per_write = torch.rand(1, 4, 10, 1, generator=torch.Generator().manual_seed(3)) * 0.05
    for gs in (ref_nvfp4.nvfp4_global_scale(x).reshape(1, 1, 1, 1), per_head, per_write):
        _check_nvfp4(strided, gs)


def test_nvfp4_every_e2m1_tie_at_many_block_scales() -> None:
    rows = _adversarial_rows(16)
    # scale the block so the E4M3 block scale is exactly 2^k (k = -9 .. 8) with gs = 1
    x = torch.cat([rows * 2.0**k for k in range(-9, 9)]).reshape(1, 1, -1, 16)
    _check_nvfp4(x, torch.ones(1, 1, 1, 1))
    # ties must really be ties: with s = 1 the reference rounds 2.5 -> 2 and 3.5 -> 4 (RNE)
    codes, _ = ref_nvfp4.quantize_nvfp4(torch.tensor([[6.0, 2.5, 3.5, 0.25] + [0.0] * 12]), torch.ones(1, 1))
    assert codes[0, :2].tolist() == [(4 << 4) | 7, (0 << 4) | 6]


def test_nvfp4_saturation_zero_tiny_and_e4m3_carry_blocks() -> None:
    g = torch.Generator().manual_seed(4)
    gs = torch.full((1, 1, 1, 1), 1.0 / (6 * 448))  # amax 1 maps to block scale 448
    blocks = []
    for ratio in (126.2, 7.94, 0.0, 1e-5, 2.0**-10, 2.0**-10 * 1.5, 2.0**-8, 460.0, 5000.0, 447.9):
        b = torch.randn(16, generator=g)
        b = b / b.abs().max() * ratio * 6 * float(gs)  # block amax / (6 gs) == ratio
        blocks.append(b)
    x = torch.stack(blocks).reshape(1, 1, -1, 16)
    x = torch.cat([x, -x], dim=2)
    for tiny in ("zero", "modelopt"):
        _check_nvfp4(x, gs, tiny)
    _check_nvfp4(torch.zeros(1, 2, 3, 32), torch.zeros(1, 1, 1, 1))  # gs = 0: all scales 0
    # the carry cases really carry (what the interpreter's fp8 cast gets wrong)
    _, scales = ref_nvfp4.quantize_nvfp4(x[0, 0, :2], gs.reshape(1, 1))
    assert ref_nvfp4.e4m3_bits_to_float(scales).flatten().tolist() == [128.0, 8.0]


@settings(max_examples=12, deadline=None)
@given(
    t=st.integers(1, 9),
    heads=st.integers(1, 3),
    d16=st.sampled_from([1, 2, 4, 6]),
    log_scale=st.floats(-12, 12),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_nvfp4_property_random_shapes(t: int, heads: int, d16: int, log_scale: float, dtype: torch.dtype, seed: int) -> None:
    x = (torch.randn(1, heads, t, 16 * d16, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale).to(dtype)
    _check_nvfp4(x, ref_nvfp4.nvfp4_global_scale(x).reshape(1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# fp4_mx_block16 and mxfp4
# ---------------------------------------------------------------------------------------------


def _check_mx16(x: torch.Tensor) -> None:
    codes, scales = triton_mx.quantize_fp4_mx_block16(_dev(x))
    ref_codes, ref_scales = ref_mx16.quantize_fp4_mx_block16(_cpu(x))
    assert _same_bits(scales, ref_scales), "exponent bytes differ"
    assert _same_bits(codes, ref_codes), "code bytes differ"
    for dtype in OUT_DTYPES:
        out = triton_mx.dequantize_fp4_mx_block16(codes, scales, dtype)
        assert _same_bits(out, ref_mx16.dequantize_fp4_mx_block16(ref_codes, ref_scales, dtype)), dtype


def _check_mxfp4(x: torch.Tensor) -> None:
    codes, scales = triton_mx.quantize_mxfp4(_dev(x))
    ref_codes, ref_scales = ref_mxfp4.quantize_mxfp4(_cpu(x))
    assert _same_bits(scales, ref_scales), "E8M0 bytes differ"
    assert _same_bits(codes, ref_codes), "code bytes differ"
    for dtype in OUT_DTYPES:
        out = triton_mx.dequantize_mxfp4(codes, scales, dtype)
        assert _same_bits(out, ref_mxfp4.dequantize_mxfp4(ref_codes, ref_scales, dtype)), dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_mx_formats_random_match_reference(dtype: torch.dtype) -> None:
    x = _random_kv((2, 2, 20, 64), seed=5, dtype=dtype)
    x4 = torch.cat([x, torch.zeros(2, 2, 1, 64, dtype=dtype)], dim=2)  # plus an all-zero token
    _check_mx16(x4)
    _check_mxfp4(x4)
    _check_mx16(x4.transpose(1, 2).contiguous().transpose(1, 2))


# FP16 outputs of 1e30-sized blocks overflow to inf in numpy's cast too (same bits as torch)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_mx_ties_clipping_and_extreme_blocks() -> None:
    rows16 = _adversarial_rows(16)
    rows32 = _adversarial_rows(32)
    x16 = torch.cat([rows16 * 2.0**k for k in (-30, -3, 0, 5, 40)]).reshape(1, 1, -1, 16)
    x32 = torch.cat([rows32 * 2.0**k for k in (-30, 0, 7)]).reshape(1, 1, -1, 32)
    _check_mx16(x16)
    _check_mxfp4(x32)
    # mxfp4 clips block maxima in (6, 8) * 2^X; huge and tiny (FP32 normal) blocks
    clip = torch.linspace(-7.9, 7.9, 32).reshape(1, 1, 1, 32)
    extreme = torch.cat([clip, clip * 1e30, clip * 1e-36, torch.zeros_like(clip)], dim=2)
    _check_mxfp4(extreme)
    _check_mx16(extreme.reshape(1, 1, -1, 16))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_mx16_exponent_near_powers_of_two_is_exact() -> None:
    """Ratios ``amax / 6`` at and a few ulps above ``2^k``: the exponent is exactly ``k`` or ``k+1``.

    (An FP32 ``log2`` would round ``log2(2^k (1 + 2^-23))`` to ``k`` for large ``|k|``; the
    reference and the kernel both take the exact value from the exponent bits.)
    """
    rows, expected = [], []
    for k in range(-33, 127, 4):
        for m in (0, 1, 2, 5, 17):
            amax = torch.tensor(math.ldexp(1.0 + m * 2.0**-23, k), dtype=torch.float32) * 6.0
            ratio = amax / 6.0
            frac, exp = torch.frexp(ratio)
            expected.append(int(exp) - 1 if float(frac) == 0.5 else int(exp))
            row = torch.linspace(-1.0, 1.0, 16) * amax
            row[3] = amax
            rows.append(row)
    x = torch.stack(rows).reshape(1, 1, -1, 16)
    _check_mx16(x)
    _, scales = triton_mx.quantize_fp4_mx_block16(_dev(x))
    assert (_cpu(scales).flatten().long() - 127).tolist() == expected


def test_fp32_subnormal_inputs() -> None:
    """FP32 denormal elements (a GPU flushing denormals would change codes or signs)."""
    tiny = torch.tensor([1e-40, -1e-40, 3e-39, -5e-45] * 8).reshape(1, 1, 1, 32)
    mixed = torch.cat([tiny, tiny * 1e4, tiny * 1e8], dim=2)
    _check_mxfp4(mixed)
    _check_mx16(mixed)
    _check_nvfp4(mixed, ref_nvfp4.nvfp4_global_scale(mixed).reshape(1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# FP8 E4M3
# ---------------------------------------------------------------------------------------------


def _check_fp8(x: torch.Tensor, scale: torch.Tensor | None, per_token: bool = False) -> None:
    codes, token_scale = triton_fp8.quantize_fp8_e4m3(_dev(x), None if scale is None else _dev(scale), per_token=per_token)
    if per_token:
        ref_scale = ref_fp8.fp8_scale_from_amax(_cpu(x).float().abs().amax(dim=-1, keepdim=True))
        assert _same_bits(token_scale, ref_scale), "per-token scales differ"
        scale = ref_scale
    assert scale is not None
    ref_codes = ref_fp8.quantize_fp8_e4m3(_cpu(x), _cpu(scale))
    assert _same_bits(codes, ref_codes), "E4M3 bytes differ"
    for dtype in OUT_DTYPES:
        out = triton_fp8.dequantize_fp8_e4m3(codes, _dev(scale), dtype)
        assert _same_bits(out, ref_fp8.dequantize_fp8_e4m3(ref_codes, _cpu(scale), dtype)), dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_random_all_scalings(dtype: torch.dtype) -> None:
    x = _random_kv((2, 3, 12, 40), seed=6, dtype=dtype)  # D = 40: not a power of two
    amax = x.float().abs()
    _check_fp8(x, (amax.amax() / 448).reshape(1, 1, 1, 1))
    _check_fp8(x, amax.amax(dim=(0, 2, 3), keepdim=True) / 448)
    _check_fp8(x, None, per_token=True)
    _check_fp8(x.transpose(1, 2).contiguous().transpose(1, 2), torch.full((1, 1, 1, 1), 0.01))


def test_fp8_carry_saturation_subnormal_and_zero_scale() -> None:
    vals = [126.2, -7.94, 447.9, 448.0, 460.0, 479.0, 480.0, 1e6, -1e6, 2.0**-10, 2.0**-10 * 1.5,
            2.0**-9 * 0.5, -(2.0**-9) * 0.5, 2.0**-7 * 0.999, -0.0, 0.0, 0.0625, 1e-30]
    x = torch.tensor(vals * 2).reshape(1, 1, 2, -1)
    _check_fp8(x, torch.ones(1, 1, 1, 1))
    _check_fp8(x, torch.zeros(1, 1, 1, 1))  # scale 0 -> code 0 everywhere
    codes = ref_fp8.quantize_fp8_e4m3(torch.tensor([126.2, -7.94]), torch.tensor(1.0))
    assert ref_nvfp4.e4m3_bits_to_float(codes).tolist() == [128.0, -8.0]


# ---------------------------------------------------------------------------------------------
# the integer-arithmetic helpers themselves, over random FP32 bit patterns
# ---------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_roundtrip_kernel(X, C, V, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i)
    c = e4m3_encode_signed(tl.minimum(tl.maximum(x, -448.0), 448.0))
    tl.store(C + i, c.to(tl.uint8))
    tl.store(V + i, e4m3_decode(i % 256))


def test_e4m3_helpers_on_random_bit_patterns() -> None:
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isfinite(x), x, torch.zeros(()))
    x[:8] = torch.tensor([126.2, -7.94, 2.0**-10, -(2.0**-10), 2.0**-6 * 0.99999, 0.0, -0.0, 448.0])
    codes = torch.empty(4096, dtype=torch.uint8, device=DEVICE)
    values = torch.empty(4096, dtype=torch.float32, device=DEVICE)
    _e4m3_roundtrip_kernel[(1,)](_dev(x), codes, values, N=4096)
    assert _same_bits(codes, ref_fp8.float_to_e4m3_bits(x))
    assert _same_bits(values, ref_fp8.e4m3_bits_to_float((torch.arange(4096) % 256).to(torch.uint8)))
