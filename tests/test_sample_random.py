"""The per-sample uniforms behind the DALI backend's augmentation: a pure function of (seed, epoch, index)."""

import numpy as np
import pytest

from fastfit.data.sample_random import MAX_STREAMS, sample_uniforms


def test_rows_depend_only_on_their_own_key():
    all_rows = sample_uniforms(5, 2, np.arange(1000), 5)
    picked = [999, 3, 3, 0, 512]
    assert np.array_equal(sample_uniforms(5, 2, picked, 5), all_rows[picked])  # any subset, order or repeat
    assert np.array_equal(sample_uniforms(5, 2, picked, 2), all_rows[picked, :2])  # fewer streams: a prefix
    assert all_rows.dtype == np.float32 and all_rows.shape == (1000, 5)
    for seed, epoch in ((6, 2), (5, 3), (-5, 2)):
        other = sample_uniforms(seed, epoch, np.arange(1000), 5)
        assert (other != all_rows).all(axis=1).all()  # another seed or epoch: every number of every row differs


def test_uniforms_are_uniform_and_independent():
    u = sample_uniforms(0, 0, np.arange(200_000), 5).astype(np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    # Standard error of a mean of 200k uniforms ≈ 0.00065; of a correlation ≈ 0.0022.
    assert np.abs(u.mean(axis=0) - 0.5).max() < 0.004
    assert np.abs(u.var(axis=0) - 1 / 12).max() < 0.002
    correlations = np.corrcoef(np.concatenate([u[:-1], u[1:]], axis=1).T)  # across streams and neighbouring keys
    assert np.abs(correlations - np.eye(10)).max() < 0.015
    counts = np.histogram(u[:, 0], bins=20, range=(0, 1))[0]
    assert np.abs(counts - 10_000).max() < 500  # ≈ 5 standard deviations of a bin count
    assert abs((u[:, 4] < 0.5).mean() - 0.5) < 0.004  # the flip: about half


def test_stream_count_is_bounded():
    with pytest.raises(ValueError, match=f"count must be in \\[1, {MAX_STREAMS}\\], got 0"):
        sample_uniforms(0, 0, [1], 0)
