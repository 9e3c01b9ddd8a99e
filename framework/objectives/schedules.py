"""Learning-rate schedules, as multipliers on the peak LR (``torch.optim.lr_scheduler.LambdaLR``).

- ``cosine``: linear warmup, then a cosine from 1 to ``min_lr_ratio`` over the rest of the run
  (Loshchilov & Hutter 2017; the Chinchilla recipe, Hoffmann et al. 2022, sets the cosine length to the run).
- ``wsd`` (warmup-stable-decay): linear warmup, the peak held constant, then a decay over the last
  ``decay_fraction`` of the steps (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations", sec. 3 and eq. 1 for ``1-sqrt``). With ``p`` the fraction of the decay done,
  ``linear``: 1 - p; ``cosine``: (1 + cos(pi p)) / 2; ``1-sqrt``: 1 - sqrt(p); each rescaled to end at
  ``min_lr_ratio`` instead of 0 (set it to 0 for the paper's decay to zero).

Because the constant phase does not depend on the run's length, a checkpoint of that phase can start a decay
of any length as its own run (a cooldown branch, ``branch_from``): one long run yields many token budgets.
"""

from __future__ import annotations

import math

from framework.objectives.config import decay_start

DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2, decay_shape: str = "1-sqrt") -> float:
    """Multiplier on the peak LR at optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "wsd":
        start = decay_start(total_steps, decay_fraction)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return min_lr_ratio + (1.0 - min_lr_ratio) * DECAY_SHAPES[decay_shape](progress)
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * DECAY_SHAPES["cosine"](progress)
