"""What the cache checks on K/V before storing them, and the NaN/Inf policy it applies.

Every check here runs *before* the cache changes anything, so an error leaves it exactly as it
was (the layer additionally rolls back if something fails later, see
:meth:`~nvfp4kv.cache.layer.PackedKVLayer.update`). Each message names the problem and the fix.

NaN/Inf policy (``KVCacheConfig.nonfinite``), applied once to the incoming K and V, so that
every path that reads them (the raw prefill chunk of ``serving`` reads, sink and residual
windows, packed tokens, the fused decode view) sees the same values:

- ``"raise"`` (default): :class:`~nvfp4kv.errors.NonFiniteKVError` naming the layer, K or V,
  the position and the fix.
- ``"map"``: NaN -> 0 and +-Inf -> +-(the largest finite ``|x|`` of that write of K or V, per
  batch row, so that a row's values never depend on its neighbours).
  The limit is the data's, not the dtype's (FP32 3.4e38 in a key would overflow ``q . k`` to
  Inf and turn the softmax into NaN, the failure the policy exists to prevent); it is also
  what the formats with a data-derived limit (NVFP4/FP8 with a dynamic or prefill scale, the
  block-FP4 formats, KIVI) map Inf to, so packed and raw reads agree.
- ``"keep"``: nothing is checked or mapped (a research option: see what NaN/Inf do). Raw
  reads pass them through; what packed tokens hold is whatever the format's arithmetic gives.
"""

from __future__ import annotations

import torch

from nvfp4kv.errors import KVStateError, NonFiniteKVError
from nvfp4kv.formats.numerics import finite_abs, has_nonfinite, map_nonfinite

#: dtypes a model runs attention in; anything else is refused before it reaches a format
MODEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LAYOUT = "[batch, kv_heads, tokens, head_dim]"


def check_kv_states(key: torch.Tensor, value: torch.Tensor, where: str) -> None:
    """Refuse K/V that no layer could store: not 4-D, not a model dtype, K/V of different
    batch, heads or tokens, or K and V on different devices (``where`` names the layer)."""
    for name, t in (("key_states", key), ("value_states", value)):
        if not isinstance(t, torch.Tensor):
            raise KVStateError(f"{where}: {name} must be a torch.Tensor {_LAYOUT}; got {type(t).__name__}.")
        if t.dim() != 4:
            raise KVStateError(
                f"{where}: {name} must be 4-D {_LAYOUT}; got shape {tuple(t.shape)}. Reshape it "
                f"(e.g. x.view(batch, kv_heads, tokens, head_dim)) before cache.update."
            )
        if t.dtype not in MODEL_DTYPES:
            raise KVStateError(
                f"{where}: {name} must be floating point in a model dtype "
                f"({', '.join(str(d).removeprefix('torch.') for d in MODEL_DTYPES)}); got {t.dtype}. "
                f"Cast it to the model's dtype (e.g. x.to(torch.bfloat16))."
            )
    if key.shape[:3] != value.shape[:3]:
        raise KVStateError(
            f"{where}: K {tuple(key.shape)} and V {tuple(value.shape)} must have equal batch, kv heads and "
            f"tokens (only head_dim may differ). Pass the K and V of the same tokens in one update."
        )
    if key.device != value.device:
        raise KVStateError(
            f"{where}: K is on {key.device} but V on {value.device}. Move both to the device the model "
            f"runs on before cache.update."
        )


def check_against_stored(
    key: torch.Tensor,
    value: torch.Tensor,
    where: str,
    *,
    head_dims: tuple[int, int] | None,
    stored: torch.Tensor | None,
) -> None:
    """Refuse K/V that do not continue what a layer holds: another head_dim (``head_dims``,
    once known), batch, kv heads or device (``stored``: any tensor the layer stores)."""
    if head_dims is not None and (key.shape[-1], value.shape[-1]) != head_dims:
        raise KVStateError(
            f"{where}: this layer's head_dim is {head_dims[0]} for K and {head_dims[1]} for V; got "
            f"{key.shape[-1]} and {value.shape[-1]}. Pass this layer's K/V (check layer_idx), or build a "
            f"fresh cache for a different model."
        )
    if stored is None:
        return
    if key.shape[:2] != stored.shape[:2]:
        raise KVStateError(
            f"{where}: the layer holds batch {stored.shape[0]} x {stored.shape[1]} kv heads; got "
            f"{key.shape[0]} x {key.shape[1]}. A cache continues one batch of sequences: make a fresh cache "
            f"per call (make_cache), or change the batch with reorder_cache / batch_select_indices."
        )
    if key.device != stored.device:
        raise KVStateError(
            f"{where}: the layer stores K/V on {stored.device}; got {key.device}. Keep the model on one "
            f"device for the whole generation, or build a fresh cache after moving it."
        )


def first_nonfinite(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, kv head, token) of the first NaN/Inf in ``x`` ``[B, H, T, D]``, or None."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    b, h, t, _ = bad.nonzero()[0].tolist()
    return b, h, t


def raise_if_nonfinite(x: torch.Tensor, where: str, which: str, first_token: int) -> None:
    """The ``"raise"`` policy: NonFiniteKVError naming layer, K or V, position and the fix."""
    found = first_nonfinite(x)
    if found is None:
        return
    b, h, t = found
    raise NonFiniteKVError(
        f"{where} {which} holds NaN/Inf (first at batch {b}, kv head {h}, token {first_token + t}); "
        f"the KV formats cannot encode them. Fix the model's numerics (e.g. run it in bfloat16 or float32 "
        f"rather than float16), or set nonfinite='map' (NaN -> 0, +-Inf -> +-largest finite value), or "
        f"nonfinite='keep' to pass them through (research only)."
    )


def map_nonfinite_write(x: torch.Tensor) -> torch.Tensor:
    """The ``"map"`` policy on one write of K or V: NaN -> 0, +-Inf -> +-(largest finite
    ``|x|`` in that batch row of ``x``), in ``x``'s dtype (the limit is one of its values, so
    exact). Per row, so a row's mapped values do not depend on its batch neighbours."""
    if not has_nonfinite(x):
        return x
    limit = finite_abs(x).amax(dim=(1, 2, 3), keepdim=True) if x.dim() == 4 else finite_abs(x).amax()
    return map_nonfinite(x, limit).to(x.dtype)
