"""One side (K or V) of a packed cache layer, as the fused decode kernel reads it.

The kernel knows *encodings*, not formats: how an element is stored and how its scale is
built. A format whose parts fit one of them gets the fused decode by declaring a
``fused_decode`` builder (:class:`~nvfp4kv.formats.base.FormatKernels`) that returns a
:class:`PackedOperand`; nothing here or in the kernel names a format.

================================  =============================================  ===========
encoding                          element value                                   formats
================================  =============================================  ===========
:data:`ENC_E2M1_E4M3_GLOBAL`      ``e2m1(q) * (e4m3(s) * gs)``, ``s`` per block   nvfp4
:data:`ENC_E2M1_POW2`             ``e2m1(q) * 2^(byte - 127)`` per block          fp4_mx_block16, mxfp4
:data:`ENC_E4M3_ROWSCALE`         ``e4m3(q) * scale`` per token row               fp8_e4m3
================================  =============================================  ===========

FP4 encodings take ``block`` (elements per scale byte: 16 or 32) from the operand.
This module imports neither Triton nor transformers, so the cache and the attention
function's fallback checks can use it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4kv.formats.base import KVFormat, Parts

#: E2M1 nibbles, E4M3 block-scale bytes, FP32 global scale per row (the kernel's kind 0)
ENC_E2M1_E4M3_GLOBAL = 0
#: E2M1 nibbles, power-of-two block-scale bytes ``2^(byte-127)`` (the kernel's kind 1)
ENC_E2M1_POW2 = 1
#: one E4M3 byte per element, FP32 scale per row (the kernel's kind 3)
ENC_E4M3_ROWSCALE = 3
ENCODINGS: tuple[int, ...] = (ENC_E2M1_E4M3_GLOBAL, ENC_E2M1_POW2, ENC_E4M3_ROWSCALE)


@dataclass(frozen=True)
class PackedOperand:
    """One side (K or V) of a packed cache layer, in the layout the kernel reads.

    ``kind``: one of :data:`ENCODINGS`. ``codes``: uint8 ``[B, H, T, D/2]`` (FP4 encodings)
    or ``[B, H, T, D]`` (E4M3 bytes); ``scales``: uint8 ``[B, H, T, D/block]`` or None
    (E4M3); ``global_scale``: FP32 broadcastable to ``[B, H, T, 1]``, or None when the
    encoding has none; ``block``: elements per scale byte (FP4 encodings).
    """

    kind: int
    codes: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    block: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ENCODINGS:
            raise ValueError(f"unknown packed encoding {self.kind}; use one of {ENCODINGS}")

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    @property
    def is_fp4(self) -> bool:
        """Two E2M1 codes per byte (otherwise one E4M3 byte per element)."""
        return self.kind != ENC_E4M3_ROWSCALE

    def head_dim(self) -> int:
        return int(self.codes.shape[-1]) * (2 if self.is_fp4 else 1)


def packed_operand(fmt: KVFormat, parts: Parts, global_scale: torch.Tensor | None) -> PackedOperand | None:
    """The kernel's view of one side stored in ``fmt``, or None when the kernel cannot read it.

    Asks the format (its declared ``fused_decode`` builder); formats that declare none, and
    formats whose scales span several tokens (``token_group > 1``), are not readable.
    """
    if not fused_reads_format(fmt):
        return None
    build = fmt.kernels.load("fused_decode")
    return build(fmt, parts, global_scale)


def fused_reads_format(fmt: KVFormat) -> bool:
    """Whether the fused kernel can read a layer stored in ``fmt`` (imports nothing)."""
    return fmt.kernels.has("fused_decode") and fmt.token_group == 1
