"""Loss-spike guard: skip the optimizer step of a spiking or non-finite batch without touching the weights or the
optimizer state, and record every action.

Before each optimizer step (after backward, before clipping) the guard reads the step's loss (averaged over the
ranks) and the global gradient norm, one host synchronisation per step. The step is a spike when

- the loss or the gradient norm is not finite, or
- the loss exceeds the running mean of the last ``window`` accepted losses by more than ``sigma`` running standard
  deviations (a z-score, as Megatron-LM's and OLMo's spike checks), once ``min_history`` losses are known.

A spike's gradients are dropped (``param.grad = None`` on every rank, so AdamW and Muon skip every parameter: no
update, no moment or step-count change, no weight decay); the LR schedule and the data stream move on, as after
any step. ``max_consecutive`` spikes in a row mean the weights themselves have gone bad: the guard then stops
training and asks for a rollback (``rollback_requested``): ``framework.run`` restarts from the newest checkpoint
before the first spike of the run of spikes and skips the data window the spikes were read from.

Every action is logged (``spike_guard/skipped``, ``spike_guard/zscore``) and appended to
``<run_dir>/spike_guard.jsonl``.

Why not Lightning's ``SpikeDetection`` (``lightning.fabric.utilities.spike``): it is a Fabric callback that runs
after the optimizer step (the weights have already taken the bad update), compares against a relative tolerance of
the running mean instead of its spread, stops with an exception, and records per-rank batch indices, which do
not survive a resume on another number of GPUs. This guard acts before the step and records global sample
positions.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch


class SpikeGuard(L.Callback):
    def __init__(self, run_dir: str | Path, window: int = 100, sigma: float = 6.0, min_history: int = 20,
                 max_consecutive: int = 3) -> None:
        check_settings(window, sigma, min_history, max_consecutive)
        self.log_path = Path(run_dir) / "spike_guard.jsonl"
        self.window, self.sigma, self.min_history, self.max_consecutive = window, sigma, min_history, max_consecutive
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.first_spike: dict | None = None  # the first record of the current run of spikes
        self.rollback_requested: dict | None = None
        self._skipped_this_step = False

    # ------------------------------------------------------------------ detection
    def zscore(self, loss: float) -> float | None:
        if len(self.history) < self.min_history:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        return (loss - mean) / max(std, 1e-12)

    def reason(self, loss: float, grad_norm: float) -> tuple[str | None, float | None]:
        if not math.isfinite(loss):
            return "non-finite loss", None
        if not math.isfinite(grad_norm):
            return "non-finite gradient norm", None
        z = self.zscore(loss)
        if z is not None and z > self.sigma:
            return f"loss {z:.1f} standard deviations above the running mean", z
        return None, z

    # ------------------------------------------------------------------ Lightning hooks
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        loss = getattr(pl_module, "last_loss", None)
        if loss is None:
            return
        params = [p for p in pl_module.parameters() if p.grad is not None]
        grad_norm = _global_grad_norm(params, loss.device)
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.float()])
        if trainer.world_size > 1:  # one decision on every rank: the mean loss (norms are already global)
            values = trainer.strategy.reduce(values, reduce_op="mean")
        loss_value, norm_value = values.tolist()  # the guard's one host synchronisation per step
        reason, z = self.reason(loss_value, norm_value)
        self._skipped_this_step = reason is not None
        if reason is None:
            self.history.append(loss_value)
            self.consecutive, self.first_spike = 0, None
        else:
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change
            record = {"step": int(trainer.global_step), "position": _data_position(trainer), "loss": loss_value,
                      "grad_norm": norm_value, "zscore": z, "reason": reason, "action": "skip", "time": time.time()}
            self.consecutive += 1
            self.first_spike = self.first_spike or record
            if self.consecutive >= self.max_consecutive:
                record["action"] = "rollback"
                self.rollback_requested = {"first_spike_step": self.first_spike["step"],
                                           "first_position": self.first_spike["position"],
                                           "last_position": record["position"], "last_step": record["step"]}
                trainer.should_stop = True
            self._write(trainer, record)
        pl_module.log("spike_guard/skipped", float(self._skipped_this_step), on_step=True, on_epoch=False)
        if z is not None:
            pl_module.log("spike_guard/zscore", float(z), on_step=True, on_epoch=False)

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        if trainer.is_global_zero:
            print(f"spike guard: step {record['step']}: {record['reason']} (loss {record['loss']:.4g}, gradient norm "
                  f"{record['grad_norm']:.4g}); {record['action']}", flush=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive, "first_spike": self.first_spike}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)
        self.consecutive = int(state.get("consecutive", 0))
        self.first_spike = state.get("first_spike")


def _global_grad_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients; FSDP2's sharded (DTensor) gradients give the full norm."""
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _data_position(trainer: L.Trainer) -> int | None:
    """The data stream's position (samples consumed, as the DataModule saves it), for the rollback's skip."""
    dm = getattr(trainer, "datamodule", None)
    state = dm.state_dict() if dm is not None and hasattr(dm, "state_dict") else {}
    for key in ("global_samples_consumed", "samples_consumed"):
        if key in state:
            return int(state[key])
    return None


def check_settings(window: int, sigma: float, min_history: int, max_consecutive: int) -> None:
    if window < 2 or min_history < 2 or min_history > window:
        raise ValueError(f"callbacks.spike_guard needs 2 <= min_history ({min_history}) <= window ({window}).")
    if not sigma > 0:
        raise ValueError(f"callbacks.spike_guard.sigma={sigma} must be positive.")
    if max_consecutive < 1:
        raise ValueError(f"callbacks.spike_guard.max_consecutive={max_consecutive} must be at least 1.")


def check_spike_guard(guard, strategy_name: str, precision: str) -> None:
    """One-sentence ValueError for settings, or a strategy or precision, the guard cannot run with (checked before
    any data is prepared); ``guard``: the ``callbacks.spike_guard`` config."""
    check_settings(guard.window, guard.sigma, guard.min_history, guard.max_consecutive)
    if strategy_name.startswith("deepspeed"):
        raise ValueError(f"callbacks.spike_guard cannot skip steps under strategy={strategy_name}: DeepSpeed's ZeRO "
                         "optimizer keeps its own flat gradient partitions; use ddp or fsdp, or turn the guard off.")
    if precision.startswith("16"):
        raise ValueError("callbacks.spike_guard does not run with fp16: its loss scaler already skips non-finite "
                         "steps and would fail on a step without gradients; use bf16 or turn the guard off.")
