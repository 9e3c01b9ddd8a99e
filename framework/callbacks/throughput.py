"""Throughput, achieved FLOP/s, model FLOPs utilization (MFU) and compute spent, logged to every logger.

FLOPs of one training micro-batch are *measured*, once, with ``torch.utils.flop_counter.FlopCounterMode``
on a meta-device copy of the LightningModule (no memory, no compute): the objective's own ``compute_loss``
runs forward on a meta copy of the first real batch, then ``backward``. So the count follows the actual
architecture and objective (decoder, encoder, encoder-decoder; full-vocabulary or masked-only heads)
instead of the ``6 N D`` rule of thumb. The counter sees matrix multiplies only (linear layers, attention
scores and values, the LM head, and their gradients); elementwise work (norms, softmax, SiLU, rotary,
the loss) is not counted, which is the convention MFU uses (PaLM, Chowdhery et al. 2022, Appendix B).
Causal attention is counted over the full T x T score matrix, as FlopCounterMode does for every SDPA
kernel. On meta tensors attention runs as plain matmuls, so recomputation is not counted: neither activation
checkpointing (the meta copy does not checkpoint) nor the flash-attention backward's recomputation of Q K^T
(FlopCounterMode around a real H100 step counts 0.5 x the forward attention FLOPs more: +2.4% for a
GPT-2-small shape at T = 1024). The ratio is therefore *model* FLOPs utilization, not hardware FLOPs
utilization.

    MFU = F_step / (t_step * P * N)

F_step: FLOPs of one optimizer step = FLOPs per micro-batch x accumulate_grad_batches x N;
t_step: wall-clock seconds per optimizer step, averaged over a sliding window (validation time excluded);
P: the peak dense FLOP/s of one device for the run's precision (``framework.scaling.hardware``, or
``callbacks.peak_flops_per_device``); N: the number of devices (``trainer.world_size``).
Compute spent is the running sum of F over all steps, also in PF-days (1 PF-day = 1e15 FLOP/s x 86,400 s
= 8.64e19 FLOPs, Kaplan et al. 2020, section 1.3); it is saved in checkpoints, so it survives resume.

No host-device synchronisation per step: metrics are computed and logged only on the steps Lightning
writes to the loggers (every ``trainer.log_every_n_steps``); on those steps the callback waits for the GPU
(``torch.cuda.synchronize``) and reads the clock, so every rate is measured between two synchronised edges,
over the last ``window`` micro-batches, or the last logging interval when that is longer. Between them
the host runs ahead of the GPU as it would without the callback.

``throughput/data_wait_fraction``: seconds the training process spent blocked in the loader's ``next()``
(counted by ``framework.data.datamodule.TimedDataLoader``: reading and collating the batch with
``num_workers=0``, waiting for a worker's batch otherwise) over the wall-clock seconds of the same window.
Only reported when the training loader is a ``TimedDataLoader``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from framework.catalogue import PF_DAY_FLOPS, pf_days  # noqa: F401  (FLOPs in one petaFLOP/s-day)


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the peak FLOP/s of all devices (a fraction in [0, 1])."""
    return flops_per_step / step_time_s / (peak_flops_per_device * devices)


def logs_this_step(trainer: Any, step: int | None = None) -> bool:
    """Whether Lightning writes logged metrics to the loggers after the training step now running: optimizer step
    ``step + 1`` is a multiple of ``trainer.log_every_n_steps``, or the trainer is stopping (Lightning's rule).
    ``step``: the optimizer steps completed before it (``trainer.global_step`` until its optimizer step runs, so
    a callback's ``on_train_batch_end`` passes the value it read in ``on_train_batch_start``). True without a
    trainer."""
    if trainer is None:
        return True
    every = trainer.log_every_n_steps
    if not every:
        return False
    step = trainer.global_step if step is None else step
    return (step + 1) % every == 0 or bool(trainer.should_stop)


def loader_wait_seconds(trainer: Any) -> float | None:
    """Seconds the training loader's iterators have spent in ``next()`` so far (a ``TimedDataLoader``), or None."""
    try:
        loader = trainer.train_dataloader
    except Exception:  # no fit loop yet
        return None
    wait = getattr(loader, "wait_s", None)
    return float(wait) if wait is not None else None


def _to_cpu(x: Any) -> Any:
    return x.detach().to("cpu") if isinstance(x, torch.Tensor) else x


_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}


class _MetaWithRealBatch(TorchDispatchMode):
    """Ops on CPU tensors alone run for real (the batch's masks and counts keep their values); an op that mixes
    them with meta tensors gets its CPU inputs as meta tensors, except indices, which fix the output's shape."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if func not in _INDEX_OPS and any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
            args, kwargs = tree_map(
                lambda t: t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta else t, (args, kwargs))
        return func(*args, **kwargs)


def measure_training_flops(module: L.LightningModule, batch: Any) -> int:
    """FLOPs of forward + backward of ``module.compute_loss(batch)`` for one micro-batch.

    Runs on a meta-device copy built from the module's hyperparameters (plain dicts): the weights and
    activations are meta tensors (no memory, no compute). The batch itself (B x T integers) is kept as real
    CPU tensors, so data-dependent steps of an objective still see real values: the masked-LM head runs on
    the N positions this batch selects (N varies by a few percent between batches; this batch's N is used).
    """
    with torch.device("meta"):
        meta_module = type(module)(**module.hparams)
    meta_module.train()
    cpu_batch = tree_map(_to_cpu, batch)
    counter = FlopCounterMode(display=False)
    with counter, _MetaWithRealBatch():
        loss, _ = meta_module.compute_loss(cpu_batch)
        loss.backward()
    return int(counter.get_total_flops())


def resolve_peak_flops(accelerator: str | None, precision: str, override: float = 0.0) -> tuple[float | None, str]:
    """(peak dense FLOP/s of one device, where it came from); None when unknown (CPU, a GPU not in the table)."""
    if override > 0:
        return float(override), "callbacks.peak_flops_per_device"
    if accelerator is None:
        return None, "no GPU from the peak table (framework/scaling/hardware.py) is in use"
    from framework.scaling.hardware import PRECISION_DTYPE, peak_flops

    dtype = PRECISION_DTYPE.get(str(precision), str(precision))
    if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":
        dtype = "tf32"  # fp32 matmuls run on tensor cores as TF32
    try:
        return peak_flops(accelerator, dtype), f"{accelerator} {dtype} peak"
    except ValueError as err:
        return None, str(err)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise TypeError(f"cannot find the batch size of a {type(batch).__name__} batch")


class ThroughputMonitor(L.Callback):
    """Logs ``throughput/*`` (tokens/s, samples/s, FLOP/s, MFU, data-wait fraction) and ``compute/*`` (FLOPs,
    PF-days) on every logging step.

    Rates are global (all ranks), measured between synchronised edges (see the module docstring) over the
    last ``window`` micro-batches, or the last logging interval when that is longer.
    """

    def __init__(self, window: int = 20, peak_flops_per_device: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"callbacks.throughput_window={window} must be at least 1.")
        self.window = window
        self.peak_override = peak_flops_per_device
        self.clock = clock
        self.flops_per_micro_batch: int | None = None  # one rank's forward+backward of one micro-batch
        self.cumulative_flops = 0.0  # all ranks, all steps, restored on resume
        self.peak: float | None = None
        # synchronised edges: (seconds, micro-batches, tokens_seen, samples, flops, data-wait seconds or None)
        self._edges: deque = deque()
        self._micro_batches = 0
        self._step = 0  # optimizer steps completed when the running micro-batch started (``logs_this_step``)
        self._samples = 0
        self._paused_s = 0.0
        self._pause_start: float | None = None

    # ------------------------------------------------------------------ setup
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from framework.scaling.hardware import detect_accelerator

        accel = detect_accelerator() if pl_module.device.type == "cuda" else None
        self.peak, source = resolve_peak_flops(accel, trainer.precision, self.peak_override)
        if self.peak is None:
            rank_zero_info(f"throughput: MFU is not reported ({source}); set callbacks.peak_flops_per_device "
                           "to the device's peak FLOP/s to report it.")
        else:
            rank_zero_info(f"throughput: MFU against {self.peak:.4g} FLOP/s per device ({source}) x "
                           f"{trainer.world_size} device(s)")
        self._edges.clear()

    def _now(self, pl_module: L.LightningModule) -> float:
        """The clock after the GPU finished the work queued so far (called on logging steps only)."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return self.clock() - self._paused_s

    def _edge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple:
        return (self._now(pl_module), self._micro_batches, float(getattr(pl_module, "tokens_seen", 0)),
                self._samples, self.cumulative_flops, loader_wait_seconds(trainer))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        if self.flops_per_micro_batch is None:
            try:
                self.flops_per_micro_batch = measure_training_flops(pl_module, batch)
                rank_zero_info(f"throughput: {self.flops_per_micro_batch:.4g} FLOPs per micro-batch per device "
                               "(forward + backward, measured on a meta-device copy)")
            except Exception as err:  # an objective with data-dependent shapes cannot run on meta tensors
                self.flops_per_micro_batch = 0
                rank_zero_warn(f"throughput: could not measure FLOPs on the meta device ({err}); "
                               "FLOP/s, MFU and compute are not reported.")
        if not self._edges:  # the first edge (its batch is already fetched: time and wait both start here)
            self._edges.append(self._edge(trainer, pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        world = trainer.world_size
        self._micro_batches += 1
        self._samples += _batch_size(batch) * world
        self.cumulative_flops += float(self.flops_per_micro_batch or 0) * world
        if not logs_this_step(trainer, self._step):
            return
        edge = self._edge(trainer, pl_module)
        # the base: the oldest edge within the last ``window`` micro-batches, else the previous edge
        base = self._edges[-1]
        for old in self._edges:
            if edge[1] - old[1] <= self.window:
                base = old
                break
        self._edges.append(edge)
        while len(self._edges) > 1 and self._edges[0] is not base:
            self._edges.popleft()
        metrics = self._metrics(base, edge, trainer, world)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def _metrics(self, base: tuple, edge: tuple, trainer: L.Trainer, world: int) -> dict[str, float]:
        (t0, n0, tok0, s0, f0, w0), (t1, n1, tok1, s1, f1, w1) = base, edge
        elapsed, micro_batches = t1 - t0, n1 - n0
        metrics: dict[str, float] = {}
        if self.flops_per_micro_batch:
            metrics["compute/flops"] = self.cumulative_flops
            metrics["compute/pf_days"] = pf_days(self.cumulative_flops)
        if elapsed > 0 and micro_batches > 0:
            metrics["throughput/tokens_per_sec"] = (tok1 - tok0) / elapsed
            metrics["throughput/samples_per_sec"] = (s1 - s0) / elapsed
            metrics["throughput/step_time_s"] = elapsed / micro_batches * trainer.accumulate_grad_batches
            if w0 is not None and w1 is not None:
                metrics["throughput/data_wait_fraction"] = min(1.0, max(0.0, (w1 - w0) / elapsed))
            if self.flops_per_micro_batch:
                achieved = (f1 - f0) / elapsed  # FLOP/s over all devices
                metrics["throughput/flops_per_sec"] = achieved
                if self.peak:
                    metrics["throughput/mfu"] = achieved / (self.peak * world)
        return metrics

    # ------------------------------------------------------------------ validation is not training time
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside fit; a standalone validate() has no training after it
            self._pause_start = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pause_start is not None:
            self._paused_s += self.clock() - self._pause_start
            self._pause_start = None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"cumulative_flops": self.cumulative_flops, "flops_per_micro_batch": self.flops_per_micro_batch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.cumulative_flops = float(state_dict.get("cumulative_flops", 0.0))
