"""Errors a user can act on.

Every error the harness raises for bad input names the fix in its message: a researcher
reading a failed sweep log should know what to change without opening the source.
"""

from __future__ import annotations


class NVFP4KVError(Exception):
    """Base class: catch this to handle every harness-specific failure."""


class UnknownFormatError(NVFP4KVError, KeyError):
    """A KV format name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BlockSizeError(NVFP4KVError, ValueError):
    """head_dim (the last dim) is not divisible by the format's block size."""


class NonFiniteKVError(NVFP4KVError, ValueError):
    """K or V holds NaN or Inf; formats have no encoding for them by default."""


class DatasetNotFoundError(NVFP4KVError, FileNotFoundError):
    """A configured local dataset directory or file does not exist."""


class ConfigError(NVFP4KVError, ValueError):
    """An inconsistent or unknown configuration value (a bad Hydra override, say)."""


class BackendUnavailableError(NVFP4KVError, RuntimeError):
    """A kernel backend was asked for on a machine that cannot run it."""


class KVStateError(NVFP4KVError, ValueError):
    """K/V states handed to ``cache.update`` have the wrong shape, dtype or device.

    Raised before the cache changes anything, so a caller that catches it keeps a usable cache.
    """


class MixedRunsError(NVFP4KVError, ValueError):
    """Analysis was asked to pair rows of different runs (different identities) without saying so."""
