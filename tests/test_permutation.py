"""The Feistel permutation behind the training order: a bijection of [0, n) for every n, keyed, vectorised,
and far from the identity or an arithmetic progression."""

from __future__ import annotations

import numpy as np
import pytest

from framework.data.permutation import FeistelPermutation, stream_windows

SMALL = range(1, 258)  # exhaustive: 1, primes (2, 3, 5, ..., 257), powers of two (..., 256), everything between
LARGER = [509, 1021, 1024, 4093, 4096, 65_521, 65_536, 65_537, 1_000_003]


@pytest.mark.parametrize("sizes", [SMALL, LARGER], ids=["1-257", "larger"])
def test_is_a_bijection_of_0_to_n(sizes):
    for n in sizes:
        image = FeistelPermutation(n, seed=n, epoch=3)(np.arange(n))
        assert image.dtype == np.int64 and image.shape == (n,)
        assert np.array_equal(np.sort(image), np.arange(n)), n


def test_scalar_and_array_calls_agree_and_keys_change_the_order():
    perm = FeistelPermutation(1000, seed=1, epoch=0)
    batch = perm(np.arange(1000))
    assert [perm(i) for i in range(0, 1000, 97)] == batch[::97].tolist()
    assert np.array_equal(perm(np.arange(1000).reshape(10, 100)), batch.reshape(10, 100))  # any shape
    others = [FeistelPermutation(1000, seed=2)(np.arange(1000)), FeistelPermutation(1000, seed=1, epoch=1)(np.arange(1000)),
              FeistelPermutation(1000, seed=1, stream=7)(np.arange(1000))]
    for other in others:  # another seed, epoch or stream: an unrelated order (about 1 fixed agreement in 1000)
        assert (other == batch).sum() < 10
    with pytest.raises(IndexError):
        perm(1000)
    with pytest.raises(ValueError, match="at least one element"):
        FeistelPermutation(0, seed=1)


def test_order_looks_random():
    """Not the identity nor a lattice: the steps between consecutive images are spread like a random permutation's."""
    n = 100_003
    image = FeistelPermutation(n, seed=0)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), image)[0, 1]) < 0.02  # a random permutation: ~ 1/sqrt(n) = 0.003
    steps = np.diff(image) % n
    assert len(np.unique(steps)) > 0.5 * n  # an affine map a i + b has ONE step; a random order ~ (1 - 1/e) n
    fixed = int((image == np.arange(n)).sum())
    assert fixed < 10  # a random permutation has Poisson(1) fixed points


def test_stream_windows_walks_epochs_without_gaps():
    n = 37
    positions = np.arange(5 * n)
    windows = stream_windows(positions, n, seed=4)
    epochs = windows.reshape(5, n)
    assert all(np.array_equal(np.sort(e), np.arange(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 5  # every epoch its own order
    shuffled = np.random.default_rng(0).permutation(positions)  # any positions, any order: the same look-up
    assert np.array_equal(stream_windows(shuffled, n, seed=4), windows[shuffled])


def test_large_domains_without_materialising():
    n = 3 * 10**12 + 7  # no array of size n could be built here
    perm = FeistelPermutation(n, seed=9)
    image = perm(np.arange(10**5, dtype=np.int64) * 29_999_999)
    assert image.min() >= 0 and image.max() < n and len(np.unique(image)) == len(image)
