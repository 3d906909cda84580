"""Signal-to-quantization-noise ratio, the one-number fidelity summary of a format."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``10 log10(sum x^2 / sum (x - x_hat)^2)`` in float64; ``inf`` for an exact copy.

    Float64 so that a BF16-level error on millions of elements is not lost in the sum.
    """
    x = reference.double()
    noise = (x - approximation.double()).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
