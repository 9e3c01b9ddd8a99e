"""A seeded permutation of ``[0, n)`` computed per index, in O(1) memory: the training order at any corpus size.

``torch.randperm(n)`` holds n int64s (8 GB per rank for 10^9 windows, i.e. about a trillion tokens of 1k-token
windows) and must be rebuilt for every epoch. ``FeistelPermutation`` instead maps an index to its image with a
few integer operations, so the order of window ``i`` of epoch ``e`` costs the same at any ``n``, a resumed run
needs no state beyond its position, and a batch of indices is one vectorised numpy call.

Construction (Black & Rogaway, "Ciphers with Arbitrary Finite Domains", CT-RSA 2002, sec. 3 "cycle walking"):
a balanced Feistel network on ``2h``-bit integers, ``4^h`` the smallest power of four >= n, is a bijection of
``[0, 4^h)`` for ANY round function (Luby & Rackoff 1988); the image of ``i < n`` is found by applying it
repeatedly until the value falls back into ``[0, n)``. That walk stays on the cycle through ``i``, so it is a
bijection of ``[0, n)``; since ``4^h < 4n``, it takes fewer than 4 applications on average. The round function
is the SplitMix64 finaliser (Steele, Lea & Flood, OOPSLA 2014) of the right half plus a round key; the round keys
are BLAKE2b of (seed, epoch, stream), so the order is the same on every rank, platform and Python process.
``ROUNDS = 6``: four rounds already make a Feistel network indistinguishable from a random permutation when the
round function is (Luby-Rackoff); two more cover tiny halves (a few bits) where one round mixes little.

Why not an affine map ``a i + b mod n`` (gcd(a, n) = 1): it is cheaper, but consecutive indices stay
``a`` apart, so the order has a lattice structure (every epoch visits windows in arithmetic progressions, and
neighbouring windows of one document come at fixed distances). Feistel rounds destroy that structure.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6
_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _round_keys(seed: int, epoch: int, stream: int, rounds: int) -> np.ndarray:
    """(rounds,) uint64 keys: BLAKE2b of the three integers, so every process derives the same keys."""
    message = f"{seed & _MASK64}:{epoch & _MASK64}:{stream & _MASK64}".encode()
    digest = hashlib.blake2b(message, digest_size=8 * rounds, person=b"fw-order").digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64 -> uint64, wrapping): a bijection whose output bits all depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _half_bits(n: int) -> int:
    """h: the network permutes [0, 4^h), the smallest power of four >= n (at least 4)."""
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: int) -> np.ndarray:
    """One pass of the network over ``[0, 4^h)``: (L, R) -> (R, L xor F_k(R)) per round. ``keys``: (rounds,) for
    all elements, or (len(x), rounds), one key schedule per element."""
    shift, mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
    left, right = x >> shift, x & mask
    for r in range(keys.shape[-1]):
        left, right = right, left ^ (_mix(right * _GOLDEN + keys[..., r]) & mask)
    return (left << shift) | right


def _permute(offsets: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of ``offsets`` (int64, 1-D, all in [0, n)) under the cycle-walked network."""
    half_bits = _half_bits(n)
    out = _feistel(offsets.astype(np.uint64), keys, half_bits)
    outside = np.flatnonzero(out >= np.uint64(n))
    while outside.size:  # cycle walking: only the elements still outside [0, n) take another pass
        out[outside] = _feistel(out[outside], keys if keys.ndim == 1 else keys[outside], half_bits)
        outside = outside[out[outside] >= np.uint64(n)]
    return out.astype(np.int64)


class FeistelPermutation:
    """A bijection of ``[0, n)`` keyed by (seed, epoch, stream); ``perm(i)`` for an int or an integer array.

    ``stream`` separates orders that share a seed and epoch (the sources of a mixture)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, stream: int = 0, rounds: int = ROUNDS) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got n={n}.")
        self.n = int(n)
        self.keys = _round_keys(seed, epoch, stream, rounds)

    def __call__(self, index):
        scalar = np.ndim(index) == 0
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"indices must lie in [0, {self.n}).")
        out = _permute(x.reshape(-1), self.n, self.keys).reshape(x.shape)
        return int(out) if scalar else out


def stream_windows(positions: np.ndarray, num_windows: int, seed: int, stream: int = 0) -> np.ndarray:
    """The window read at each position of an endless stream of epochs: epoch ``e = p // n`` visits every window
    once, in ``FeistelPermutation(n, seed, e, stream)`` order. ``positions``: int64 array, any shape; one
    vectorised pass however many epochs they span (each element carries its epoch's key schedule)."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions.reshape(-1), num_windows)
    unique, which = np.unique(epochs, return_inverse=True)
    schedules = np.stack([_round_keys(seed, int(e), stream, ROUNDS) for e in unique])  # (epochs, rounds)
    return _permute(offsets, num_windows, schedules[which]).reshape(positions.shape)
