"""The spike guard's rollback: after ``max_consecutive`` spikes in a row, training restarts from the newest
checkpoint saved before the first of them, and the data stream jumps over the windows those steps read.

- The checkpoints saved after the chosen one (they hold the trajectory that went bad) move to
  ``checkpoints/rolled_back/<n>/``, so ``resume=auto`` cannot pick them again; nothing is deleted.
- The skipped range is recorded in ``<run_dir>/data_skips.json`` as stream positions; every later start of the run
  (this restart, a requeue, a resume) merges it into the DataModule's ``skips`` (also saved in checkpoints), so
  the same windows stay skipped on any number of ranks.
- A run rolls back at most ``MAX_ROLLBACKS`` times; then it stops with one sentence, since the cause is not a
  few bad batches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from framework.data.datamodule import skip_positions
from framework.checkpointing.checkpoints import checkpoint_step
from framework.checkpointing.resume import checkpoint_problem

SKIPS_FILE = "data_skips.json"
MAX_ROLLBACKS = 3


def load_skips(run_dir: Path) -> tuple[tuple[int, int], ...]:
    path = Path(run_dir) / SKIPS_FILE
    if not path.exists():
        return ()
    return tuple(tuple(s) for s in json.loads(path.read_text())["skips"])


def rollback_target(run_dir: Path, request: dict) -> Path:
    """The checkpoint to restart from: the newest complete one saved before the first spike (ValueError when
    there is none, or when the run has rolled back ``MAX_ROLLBACKS`` times already). Every rank calls it."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    state = json.loads((run_dir / SKIPS_FILE).read_text()) if (run_dir / SKIPS_FILE).exists() else {"skips": [],
                                                                                                     "rollbacks": []}
    if len(state["rollbacks"]) >= MAX_ROLLBACKS:
        raise ValueError(f"the spike guard rolled back {MAX_ROLLBACKS} times and the loss still spikes (see "
                         f"{run_dir / 'spike_guard.jsonl'}); lower optim.lr or check the data before resuming.")
    candidates = sorted((checkpoint_step(p), p) for p in ckpt_dir.glob("step*.ckpt")
                        if 0 <= checkpoint_step(p) <= request["first_spike_step"] and checkpoint_problem(p)[0] is None)
    if not candidates:
        raise ValueError(f"the spike guard asked for a rollback at step {request['last_step']}, but no checkpoint "
                         f"precedes the first spike (step {request['first_spike_step']}); lower "
                         "callbacks.checkpoint_every_n_steps or optim.lr and start again.")
    return candidates[-1][1]


def apply_rollback(run_dir: Path, request: dict, target: Path, samples_per_step: int) -> None:
    """Record the skipped stream range and set later checkpoints aside (global rank 0 only)."""
    run_dir, target_step = Path(run_dir), checkpoint_step(target)
    ckpt_dir = run_dir / "checkpoints"
    state = json.loads((run_dir / SKIPS_FILE).read_text()) if (run_dir / SKIPS_FILE).exists() else {"skips": [],
                                                                                                     "rollbacks": []}
    skips = tuple(tuple(s) for s in state["skips"])
    first = int(skip_positions(_array(request["first_position"] - samples_per_step), skips)[0])
    last = int(skip_positions(_array(request["last_position"] - 1), skips)[0]) + 1
    state["skips"].append([first, last - first])
    state["rollbacks"].append({**request, "restart_step": target_step, "checkpoint": target.name,
                               "skipped_stream_positions": [first, last]})
    aside = ckpt_dir / "rolled_back" / str(len(state["rollbacks"]))
    aside.mkdir(parents=True, exist_ok=True)
    for path in list(ckpt_dir.iterdir()):
        later = path.name.startswith("step") and checkpoint_step(path) > target_step
        if later or path.name.startswith("last"):
            shutil.move(str(path), aside / path.name)
    (run_dir / SKIPS_FILE).write_text(json.dumps(state, indent=2))


def _array(value: int):
    import numpy as np

    return np.array([value], dtype=np.int64)
