"""Speed and memory of the training order (framework/data/permutation.py) against ``torch.randperm``.

    python3 bench/permutation_speed.py

Per corpus size n (windows): milliseconds to map one million indices through ``FeistelPermutation`` (one
vectorised call), milliseconds per million samples drawn through ``MixtureSampler`` (one source of weight 1, rank 3 of 8,
micro-batch 4: positions, epochs, the permutation and the Python ints it yields), the sampler's peak traced
memory while drawing 3 chunks (tracemalloc; numpy's allocations are traced), and what one epoch's
``torch.randperm(n)`` (the former order) holds: 8 n bytes per rank.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc

import numpy as np

from framework.data.datamodule import MixtureSampler
from framework.data.permutation import FeistelPermutation

SIZES = [10**3, 10**6, 10**9, 10**12]  # windows: 10^9 windows of 1,024 tokens ~ a trillion tokens
MILLION = 10**6


def best_of(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"{'windows n':>16} {'permutation ms/M':>17} {'sampler ms/M':>13} {'sampler peak MiB':>17} "
          f"{'randperm MiB/epoch':>19}")
    for n in SIZES:
        perm = FeistelPermutation(n, seed=0, epoch=1)
        indices = np.arange(MILLION, dtype=np.int64) % n
        perm_s = best_of(lambda: perm(indices))
        sampler = MixtureSampler(["one"], [1.0], [n], seed=0, rank=3, world_size=8, micro_batch_size=4, streams=[0])
        sampler_s = best_of(lambda: sum(1 for _ in itertools.islice(iter(sampler), MILLION)), repeats=1)
        tracemalloc.start()
        list(itertools.islice(iter(sampler), 3 * MixtureSampler.CHUNK))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{n:>16,} {perm_s * 1e3:>17.1f} {sampler_s * 1e3:>13.1f} {peak / 2**20:>17.2f} "
              f"{8 * n / 2**20:>19,.0f}")


if __name__ == "__main__":
    main()
