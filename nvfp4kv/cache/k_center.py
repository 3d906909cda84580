"""Key centering (``k_center``): store ``K - m`` where ``m`` is each sequence's per-channel key mean.

Why: attention is unchanged when one vector is subtracted from every key of a sequence, since
``q . (k_n - m) = q . k_n - q . m`` shifts all of a query's logits by the same amount and softmax
ignores a common shift. Some models' keys are mostly such a shift: Qwen2's k_proj bias makes a few
channels of layers 0-1 of Qwen2.5-Coder-1.5B ~300 times their spread across tokens
(``python -m experiments.k_offset``). A per-token or per-block scale then spends the format's whole
range on the shift, and the per-key rounding error of the shift (a few % of ~300 for FP8, more for
FP4) becomes per-key noise in the logits that swamps what the keys actually say. Subtracting the
mean first (SageAttention's "smooth K", applied here to the stored cache) leaves the format only the
part that varies. No serving engine does this for its KV cache today: it is a research option, and
``engines.py`` says so.

What ``m`` is: the mean over the *first write's* real tokens (the prompt; left pads excluded), per
batch row, KV head and channel, in FP32, frozen for the rest of the sequence, so decode steps need
no new statistics and a row's ``m`` never depends on the other rows (batch invariance). It costs
``4 * head_dim`` bytes per KV head per sequence per layer, counted in ``nbytes``. A row whose first
write holds no real token gets ``m = 0`` (no centering). The cache returns the centered keys: what
attention computes from them equals what it computes from the raw keys, up to float rounding.
"""

from __future__ import annotations

import torch


def key_offset(keys: torch.Tensor, pads: tuple[int, ...] | None, n_before: int) -> torch.Tensor:
    """``m`` ``[B, H, 1, D]`` (FP32): the mean of each row's real keys of this write.

    ``keys`` ``[B, H, t, D]`` start at position ``n_before``; row ``b``'s first ``pads[b]``
    positions are left pads, which the mean leaves out. Each row's mean is taken over a contiguous
    copy of its real tokens alone, so it is bit-identical to the mean of that row written alone.
    """
    x = keys.float()
    if pads is None:
        return x.mean(dim=2, keepdim=True)
    rows = []
    for b, pad in enumerate(pads):
        real = x[b : b + 1, :, max(pad - n_before, 0) :].contiguous()
        rows.append(real.mean(dim=2, keepdim=True) if real.shape[2] else torch.zeros_like(x[b : b + 1, :, :1]))
    return torch.cat(rows)


def center_keys(keys: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``keys - offset`` computed in FP32 and returned in the keys' dtype.

    Pad positions (zeros) become ``-offset``; the caller zeroes them again, as for any write.
    """
    return (keys.float() - offset).to(keys.dtype)
