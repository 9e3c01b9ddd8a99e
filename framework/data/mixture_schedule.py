"""The mixture's sampling schedule: which source each global sample position draws from.

Every window has the same length, so a share of windows is a share of tokens. Position ``n`` goes to a source by
Tijdeman's rule for the chairman assignment problem (R. Tijdeman, "The chairman assignment problem", Discrete
Mathematics 32, 1980), which keeps every source within ``1 - 1/(2k - 2)`` windows of ``w_i n`` at every prefix
(see framework/data/mixture.py's docstring). Weights are integers over ``WEIGHT_RESOLUTION``, so the rule runs in
exact integer arithmetic, the same on every rank, and the sequence is periodic: any position is an O(1) look-up.
"""

from __future__ import annotations

import functools
import math

import numpy as np

WEIGHT_RESOLUTION = 10**6  # the schedule's weights are integers over this (then reduced): exact on every rank


def quantise_weights(weights: list[float]) -> list[int]:
    """Normalised weights as integers summing to ``WEIGHT_RESOLUTION`` (largest remainders: each within 1e-6,
    exact for weights with at most six decimals), divided by their greatest common divisor."""
    scaled = [w * WEIGHT_RESOLUTION for w in weights]
    out = [int(x) for x in scaled]
    for i in sorted(range(len(out)), key=lambda i: out[i] - scaled[i])[: WEIGHT_RESOLUTION - sum(out)]:
        out[i] += 1
    tiny = [i for i, (w, q) in enumerate(zip(weights, out)) if w > 0 and q == 0]
    if tiny:
        raise ValueError(f"mixture weights {[weights[i] for i in tiny]} are below the schedule's resolution of "
                         f"1/{WEIGHT_RESOLUTION:,}; give those sources 0 or at least 1e-6.")
    divisor = math.gcd(*out)
    return [q // divisor for q in out]


def tijdeman_sequence(quanta: list[int], length: int) -> list[int]:
    """The source of each of the first ``length`` positions for weights ``quanta / sum(quanta)`` (integers).

    Tijdeman's rule: at position n (1-based), with c_i windows given so far, the sources whose deficit
    w_i n - c_i >= delta = 1/(2k - 2) are eligible; the one with the earliest deadline (c_i + 1 - delta) / w_i
    (when its deficit would reach 1 - delta) is chosen, the lowest index on a tie. In integers, T = sum(quanta),
    m = 2k - 2: eligible iff m (q_i n - c_i T) >= T; deadline order = order of ((c_i + 1) m - 1) / q_i."""
    total = sum(quanta)
    active = [i for i, q in enumerate(quanta) if q > 0]
    m = max(1, 2 * len(active) - 2)
    counts, out = [0] * len(quanta), []
    for n in range(1, length + 1):
        best, best_num, best_q = active[0], None, 1
        for i in active:
            q, c = quanta[i], counts[i]
            if len(active) > 1 and m * (q * n - c * total) < total:
                continue
            num = (c + 1) * m - 1
            if best_num is None or num * best_q < best_num * q:
                best, best_num, best_q = i, num, q
        counts[best] += 1
        out.append(best)
    return out


@functools.lru_cache(maxsize=8)
def _period(quanta: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _build_period(list(quanta))


def _build_period(quanta: list[int]) -> tuple[np.ndarray, np.ndarray]:
    sources = np.asarray(tijdeman_sequence(quanta, sum(quanta)), dtype=np.int64)  # (T,)
    before = np.zeros((len(sources) + 1, len(quanta)), dtype=np.int64)  # (T + 1, k): counts before each offset
    np.add.at(before, (np.arange(1, len(sources) + 1), sources), 1)
    return sources, before.cumsum(0)


class MixtureSchedule:
    """Which source each global sample position draws from, and how many windows each source has had.

    With integer weights q_i / T the sequence is periodic with period T: after T positions every deficit
    w_i T - c_i = q_i - c_i is an integer of magnitude < 1, so zero, and the rule depends on the deficits only.
    One period is computed once (about 1-3 us per position; T <= 10^6) and any position is looked up in
    O(1): a resumed run needs only its stream position."""

    def __init__(self, weights: list[float]) -> None:
        self.quanta = quantise_weights(weights)  # (k,) integers, q_i / T = w_i
        self.period = sum(self.quanta)  # T
        self.sources_in_period, self.before = _period(tuple(self.quanta))  # (T,) source per offset, (T + 1, k)
        self.quanta_array = np.asarray(self.quanta, dtype=np.int64)

    def source(self, position: int) -> tuple[int, int]:
        """(source, its draw index j: the j-th window this source gives) at global ``position`` (0-based)."""
        cycle, offset = divmod(position, self.period)
        source = int(self.sources_in_period[offset])
        return source, cycle * self.quanta[source] + int(self.before[offset, source])

    def sources(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``source`` for an int64 array of positions at once: (sources, draw indices), each int64 of its shape."""
        cycle, offset = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        source = self.sources_in_period[offset]
        draw = cycle * self.quanta_array[source] + self.before[offset, source]
        return source, draw

    def counts(self, position: int) -> list[int]:
        """Windows given to each source by the first ``position`` positions."""
        cycle, offset = divmod(position, self.period)
        return [cycle * q + int(b) for q, b in zip(self.quanta, self.before[offset])]


def tolerance_windows(weights: list[float]) -> float:
    """The bound on |c_i(n) - w_i n| at every prefix n (Tijdeman 1980): 1 - 1/(2k - 2) for k >= 2 sources of
    positive weight (plus n x the weights' quantisation error, below 1e-6 and 0 for six-decimal weights)."""
    k = sum(1 for w in weights if w > 0)
    return 0.0 if k <= 1 else 1.0 - 1.0 / (2 * k - 2)
