"""Cooldown branches: start the decay of a warmup-stable-decay schedule from a checkpoint of its constant phase.

``fw-train name=<new> branch_from=<ckpt> optim.schedule=wsd trainer.max_steps=<T>`` resumes the full training
state of ``<ckpt>`` (weights, optimizer moments, step, data position, RNG: unlike ``init_from``, which keeps only
the weights) into a new run directory, and trains to step ``T`` with the decay over its last
``optim.decay_fraction``. The LR before the decay is the peak in both runs, so a branch from step ``k`` equals the
same schedule run straight through from step 0 (Hägele et al. 2024, sec. 4: one constant-LR run, many cooldowns).
Once the new run has checkpoints of its own, ``resume=auto`` resumes those and ``branch_from`` is ignored.
"""

from __future__ import annotations

from pathlib import Path

from framework.checkpointing.checkpoints import LIGHTNING_META, checkpoint_step, safe_load
from framework.checkpointing.resume import checkpoint_problem
from framework.objectives.config import OptimConfig, decay_start


def resolve_branch(branch_from: str, optim: OptimConfig, max_steps: int) -> str:
    """The checkpoint path to start ``fit`` from, after one-sentence checks (ValueError / FileNotFoundError)."""
    path = Path(branch_from).expanduser()
    if optim.schedule != "wsd":
        raise ValueError(f"branch_from={branch_from} starts a cooldown, which needs optim.schedule=wsd "
                         f"(got {optim.schedule!r}).")
    if not path.exists():
        raise FileNotFoundError(f"branch_from={branch_from}: no such checkpoint; give a step*.ckpt of a wsd run's "
                                "constant phase.")
    problem, _ = checkpoint_problem(path)  # completeness, checksum, a weights-only load
    if problem:
        raise ValueError(f"branch_from={branch_from} is an incomplete or corrupt checkpoint ({problem}); pick another "
                         "one.")
    step = checkpoint_step(path)
    start = decay_start(max_steps, optim.decay_fraction)
    if step < 0:
        raise ValueError(f"branch_from={branch_from}: cannot read its step; give a checkpoint written by fw-train.")
    if step > start:
        raise ValueError(f"branch_from={branch_from} is at step {step}, past the start of this run's decay (step "
                         f"{start} = trainer.max_steps {max_steps} - decay_fraction {optim.decay_fraction}); raise "
                         "trainer.max_steps or lower optim.decay_fraction.")
    ratio = _lr_ratio(path)
    if ratio is not None and abs(ratio - 1.0) > 1e-6:
        raise ValueError(f"branch_from={branch_from} was saved at {ratio:.4g} x the peak learning rate, outside the "
                         "constant phase of its run (warmup or decay); branch from a checkpoint of the constant phase.")
    return str(path)


def _lr_ratio(path: Path) -> float | None:
    """The source run's LR multiplier when the checkpoint was saved (None when its trainer state is not readable
    without loading the sharded model)."""
    state_file = path / LIGHTNING_META if path.is_dir() else path
    if not state_file.is_file():
        return None  # DeepSpeed directories keep the schedule inside the engine's files
    schedulers = safe_load(state_file, mmap=True).get("lr_schedulers") or []
    if not schedulers:
        return None
    last, base = schedulers[0].get("_last_lr"), schedulers[0].get("base_lrs")
    return float(last[0]) / float(base[0]) if last and base else None
