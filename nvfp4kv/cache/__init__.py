"""A transformers ``Cache`` that stores K/V really packed (codes + scale bytes), per KV format.

- :class:`KVCacheConfig`: formats, scale policy, full-precision windows, read mode (config.py)
- :class:`QuantizedKVCache`, :func:`make_cache`, :func:`cache_kwarg_name` (cache.py)
- :class:`PackedKVLayer`: one layer under transformers' layer contract (layer.py), built on
  :class:`PackedStream` (stream.py: what K or V of a layer stores) and parts.py (the format
  contract's concat/slice rules)
- memory.py: bytes actually held, per layer; backend.py: torch references or kernel backends
"""

from nvfp4kv.cache.backend import KVCodec, TorchCodec, resolve_codec
from nvfp4kv.cache.cache import QuantizedKVCache, cache_kwarg_name, make_cache
from nvfp4kv.cache.config import BACKENDS, READ_MODES, SCALE_POLICIES, KVCacheConfig
from nvfp4kv.cache.layer import PackedKVLayer
from nvfp4kv.cache.stream import PackedStream

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
