"""Whether a run directory holds a finished run, so that running its command again changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from framework.checkpointing.checkpoints import checkpoint_step, find_resume_checkpoint

FINAL_METRICS = "final_metrics.json"


def finished_metrics(run_dir: str | Path, max_steps: int) -> dict | None:
    """The final metrics of a run that is finished at ``max_steps``, else None. Finished: the newest complete
    checkpoint is at ``max_steps`` and ``final_metrics.json`` (written last, after the final evaluation)
    reports that step. A run stopped early, or asked for more steps than it ran, is not finished."""
    run_dir = Path(run_dir)
    if max_steps <= 0:
        return None
    try:
        metrics = json.loads((run_dir / FINAL_METRICS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or metrics.get("step") != max_steps:
        return None
    newest = find_resume_checkpoint(run_dir / "checkpoints")
    return metrics if newest is not None and checkpoint_step(newest) == max_steps else None


def run_is_finished(run_dir: str | Path, max_steps: int) -> bool:
    return finished_metrics(run_dir, max_steps) is not None


def finished_message(run_dir: str | Path, metrics: dict) -> str:
    run_dir = Path(run_dir)
    return (f"run in {run_dir} is already finished (step {metrics['step']}, validation loss "
            f"{metrics.get('val_loss_nats', float('nan')):.4f} nats/token); results: {run_dir / FINAL_METRICS}. "
            "Nothing was changed: raise trainer.max_steps to train further, or pick a new name= for a new run.")
