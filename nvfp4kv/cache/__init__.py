"""A transformers ``Cache`` that stores K/V really packed (codes + scale bytes), per KV format.

- :class:`KVCacheConfig`: formats, scale policy, full-precision windows, read mode (config.py)
- :class:`QuantizedKVCache`, :func:`make_cache`, :func:`cache_kwarg_name` (cache.py)
- :class:`PackedKVLayer`: one layer under transformers' layer contract (layer.py), built on
  :class:`PackedStream` (stream.py: what K or V of a layer stores) and parts.py (the format
  contract's concat/slice rules)
- memory.py: bytes actually held, per layer

Which code encodes/decodes (torch references, Triton, FlashInfer) is the one backend
abstraction of :mod:`nvfp4kv.kernels.backend`; ``KVCodec`` / ``TorchCodec`` / ``resolve_codec``
are its earlier names here, kept as aliases.
"""

from nvfp4kv.cache.cache import QuantizedKVCache, cache_kwarg_name, make_cache
from nvfp4kv.cache.config import BACKENDS, READ_MODES, SCALE_POLICIES, KVCacheConfig
from nvfp4kv.cache.layer import PackedKVLayer
from nvfp4kv.cache.stream import PackedStream
from nvfp4kv.kernels.backend import KernelBackend as KVCodec
from nvfp4kv.kernels.backend import TorchBackend as TorchCodec
from nvfp4kv.kernels.backend import resolve_backend as resolve_codec

__all__ = [
    "BACKENDS",
    "KVCacheConfig",
    "KVCodec",
    "PackedKVLayer",
    "PackedStream",
    "QuantizedKVCache",
    "READ_MODES",
    "SCALE_POLICIES",
    "TorchCodec",
    "cache_kwarg_name",
    "make_cache",
    "resolve_codec",
]
