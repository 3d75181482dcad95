"""Per-sample random numbers as a pure function of (seed, epoch, sample index): a counter-based hash, vectorized.

The DALI backend draws its training augmentation from these instead of DALI's per-pipeline generators, so a
sample's crop and flip do not depend on which rank reads it, in which batch, or from which resume point. No
generator state exists: numbers for any set of samples are computed directly (a few ms for a million samples).

The hash is splitmix64's finalizer over the counter (mixed seed and epoch) + (index · 64 + stream); the top 24 bits
of each 64-bit output become a float32 in [0, 1) (exactly representable, never 1.0).
"""

from __future__ import annotations

import numpy as np

MAX_STREAMS = 64  # random numbers per sample that never overlap another sample's


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _base(seed: int, epoch: int) -> np.uint64:
    """One hashed 64-bit counter origin per (seed, epoch): nearby pairs land far apart."""
    mixed = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    return _splitmix64(mixed ^ np.array([epoch % 2**64], dtype=np.uint64))[0]


def sample_uniforms(seed: int, epoch: int, indices, count: int) -> np.ndarray:
    """float32 array (len(indices), count) of uniforms in [0, 1): row i belongs to sample indices[i] of `epoch`."""
    if not 0 < count <= MAX_STREAMS:
        raise ValueError(f"count must be in [1, {MAX_STREAMS}], got {count}")
    keys = np.asarray(indices, dtype=np.uint64).reshape(-1, 1) * np.uint64(MAX_STREAMS)
    counters = _base(seed, epoch) + keys + np.arange(count, dtype=np.uint64)
    return (_splitmix64(counters) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
