"""One training run from a typed config: validate -> prepare data -> objective, DataModule, trainer -> fit -> final
evaluation, metrics and model card.

    from framework.config import compose
    from framework.run import run
    metrics = run(compose(["trainer.max_steps=20"]), "runs/example")

``build_run`` builds what ``fit`` needs (recipes and benches start there); ``run`` holds the run directory's lock,
resumes, handles a spike-guard rollback and a stop signal, and writes ``final_metrics.json``. The console command
around it (Hydra, the one-line errors) is ``framework.commands.train``. Every rank runs this; data preparation is
guarded by a file lock, so ranks share one copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import shutil
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from framework.adapt import load_init_weights
from framework.branch import resolve_branch
from framework.tracking.model_card import run_card_info, write_model_card
from framework.callbacks.preemption import PreemptionCallback
from framework.callbacks.rollback import apply_rollback, load_skips, rollback_target
from framework.callbacks.spike_guard import SpikeGuard
from framework.callbacks.throughput import ThroughputMonitor, pf_days
from framework.config import TrainConfig, resolve_model
from framework.data.datamodule import PretrainDataModule
from framework.data.mixture import prepare_sources
from framework.data.position import check_resume_world_size
from framework.data.source_metrics import SourceTokensLogger, source_metrics
from framework.checkpointing.checkpoints import (CheckpointWriteError, ResumeStateCallback, checkpoint_plugins,
                                               checkpoint_wandb_id, resolve_resume)
from framework.checkpointing.sharded_checksums import ShardedChecksums
from framework.distributed.parallelize import Parallelizer
from framework.checkpointing.run_lock import RunDirectoryBusy, run_directory_lock
from framework.distributed.strategies import build_strategy
from framework.objectives import objective_class
from framework.objectives.base import module_kwargs
from framework.tracking.loggers import build_loggers, finish_wandb
from framework.tracking.metrics_log import MetricsLogCallback
from framework.tracking.run_state import finished_message, finished_metrics
from framework.validate import ConfigurationError, validate

RUN_DIR_ENV = "FRAMEWORK_RUN_DIR"  # set by rank 0 so processes it launches share its directory


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 and int(
        os.environ.get("LOCAL_RANK", "0")) == 0


def _cluster_plugins() -> list:
    """Under srun: Lightning's SLURM environment with its in-handler auto-requeue off (PreemptionCallback does it)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_run(cfg: TrainConfig, run_dir: Path, resume_from: str | None = None):
    """Everything ``fit`` needs, built from the typed config: (trainer, module, datamodule, prepared).
    ``resume_from``: the checkpoint ``fit`` will resume from (its wandb run id is continued)."""
    validate(cfg)  # every cross-field check, before any data is read (recipes and benches start here)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    # one source, or several sampled by weight (framework.data.mixture): one DataModule either way
    prepared = prepare_sources(cfg.data, progress=is_global_zero())

    model_config = resolve_model(cfg.model).replace(vocab_size=prepared.vocab_size)
    module = objective_class(cfg.objective.name)(**module_kwargs(model_config, cfg.optim, cfg.objective,
                                                                 prepared.special_ids(), cfg.trainer.max_steps))
    if cfg.init_from:  # continued pretraining: the model's weights, not the optimizer, schedule or step
        load_init_weights(module.model, model_config, cfg.init_from, prepared.meta["tokenizer_hash"])
    module.parallelizer = Parallelizer(cfg.strategy, cfg.precision.mode)  # applied in configure_model
    module.optimizer_under_deepspeed = cfg.strategy.name == "deepspeed"
    datamodule = PretrainDataModule.for_objective(
        prepared, cfg.objective, cfg.data.seq_len, cfg.data.micro_batch_size, document_mask=cfg.data.document_mask,
        vocab_size=model_config.vocab_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
        val_windows=cfg.data.val_windows)
    datamodule.skips = load_skips(run_dir)  # windows a spike-guard rollback skipped (merged with the checkpoint's)
    module.val_sources = datamodule.val_sources  # val/<source>/loss and their weighted mean, val/loss

    ckpt_dir = run_dir / "checkpoints"
    guard = cfg.callbacks.spike_guard
    checkpointing = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.callbacks.checkpoint_every_n_steps, save_last=True,
        save_top_k=cfg.callbacks.keep_checkpoints, monitor="step", mode="max",
    )
    t = cfg.trainer
    trainer = L.Trainer(
        max_steps=t.max_steps, val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, precision=cfg.precision.mode, strategy=build_strategy(
            cfg.strategy, t.accelerator, cfg.precision.mode, cfg.data.micro_batch_size, t.accumulate_grad_batches,
            t.gradient_clip_val),
        logger=build_loggers(cfg.logger, run_dir, cfg.name, wandb_id=checkpoint_wandb_id(resume_from)) or False,
        callbacks=[checkpointing, ResumeStateCallback(), ShardedChecksums(), MetricsLogCallback(), SourceTokensLogger()]
        + ([ThroughputMonitor(cfg.callbacks.throughput_window, cfg.callbacks.peak_flops_per_device)]
           if cfg.callbacks.throughput else [])
        + ([SpikeGuard(run_dir, guard.window, guard.sigma, guard.min_history, guard.max_consecutive)]
           if guard.enabled else [])
        # last: the callbacks before it have logged this step's values when it saves (its row goes first)
        + [PreemptionCallback(ckpt_dir, signals=tuple(cfg.cluster.requeue_signals),
                              check_every_n_steps=cfg.cluster.preemption_check_every_n_steps)],
        plugins=checkpoint_plugins(cfg.strategy.name) + _cluster_plugins(),
        default_root_dir=str(run_dir), use_distributed_sampler=False, enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic, num_sanity_val_steps=0, enable_model_summary=is_global_zero(),
    )
    return trainer, module, datamodule, prepared


@contextmanager
def run_lock(run_dir: Path):
    """One job per run directory (framework.checkpointing.run_lock): global rank 0 holds it, its ranks share it."""
    try:
        with run_directory_lock(run_dir, take=is_global_zero()):
            yield
    except RunDirectoryBusy as err:
        raise ConfigurationError(str(err)) from None


def run(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Train as configured; returns the final metrics (also written to ``run_dir/final_metrics.json``), or, when
    a signal stopped the run, ``{"step", "preempted", "requeued", "stop_signal", "exit_status"}``."""
    run_dir = Path(run_dir).resolve()
    with run_lock(run_dir):  # before anything is written into run_dir
        return _run(cfg, run_dir)


def _run(cfg: TrainConfig, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    finished = finished_metrics(run_dir, cfg.trainer.max_steps) if cfg.resume == "auto" else None
    if finished is not None:  # the same command again: change nothing
        if is_global_zero():
            print(finished_message(run_dir, finished))
        return finished
    try:  # everything a user's settings can get wrong fails here, before any training step
        ckpt_path = resolve_resume(cfg.resume, run_dir / "checkpoints")
        branching = ckpt_path is None and bool(cfg.branch_from)  # a cooldown branch's first start
        if branching:
            ckpt_path = resolve_branch(cfg.branch_from, cfg.optim, cfg.trainer.max_steps)
        trainer, module, datamodule, prepared = build_run(cfg, run_dir, resume_from=None if branching else ckpt_path)
        check_resume_world_size(ckpt_path, trainer.num_nodes * trainer.num_devices)  # before anything is loaded
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ConfigurationError(str(err).strip("'\"")) from err
    if ckpt_path and trainer.is_global_zero:
        print(f"{'cooldown branch from' if branching else 'resuming from'} {ckpt_path}")
    if trainer.is_global_zero:  # the run directory is self-contained for fw-generate and fw-eval
        shutil.copyfile(prepared.tokenizer_path, run_dir / "tokenizer.json")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    guard = next((c for c in trainer.callbacks if isinstance(c, SpikeGuard)), None)
    if guard is not None and guard.rollback_requested:  # several spikes in a row: restart before them, skip their data
        try:
            target = rollback_target(run_dir, guard.rollback_requested)  # chosen by every rank before any file moves
        except ValueError as err:
            raise ConfigurationError(str(err)) from err
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            apply_rollback(run_dir, guard.rollback_requested, target, cfg.data.micro_batch_size * trainer.world_size
                           * cfg.trainer.accumulate_grad_batches)
            print(f"spike guard: rolling back to {target.name} and skipping the data of steps "
                  f"{guard.rollback_requested['first_spike_step']}..{guard.rollback_requested['last_step']}")
        trainer.strategy.barrier()
        return _run(dataclasses.replace(cfg, resume=str(target)), run_dir)
    train_loss = trainer.callback_metrics.get("train/loss")
    preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCallback))
    if not preemption.preempted:  # a signal after the last step boundary (the checkpoint at max_steps exists)
        preemption.stop_signal = preemption.agree_on_signal(trainer)
    if preemption.stop_signal is not None:  # checkpoint saved: requeue (SLURM), skip the final evaluation
        finish_wandb(trainer)  # before the requeue: SLURM terminates the job's tasks right after it
        requeued = preemption.requeue(trainer)
        status = preemption.exit_status(trainer, requeued)
        if status and trainer.is_global_zero:
            print(f"stopped by {preemption.stop_signal.name} at step {trainer.global_step} with a checkpoint in "
                  f"{run_dir / 'checkpoints'}; run the same command to resume (exit status {status})", file=sys.stderr)
        return {"step": int(trainer.global_step), "preempted": True, "requeued": requeued,
                "stop_signal": preemption.stop_signal.name, "exit_status": status}

    datamodule.val_windows = 10**9  # the final evaluation covers the whole validation split
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    val_loss = float(results[0]["val/loss"]) if results else float("nan")
    metrics = {
        "step": int(trainer.global_step),
        "tokens_seen": int(module.tokens_seen),
        "val_loss_nats": val_loss,
        "val_ppl": float(torch.exp(torch.tensor(min(val_loss, 50.0)))),
        "val_unigram_entropy_nats": float(prepared.meta["val_unigram_entropy_nats"]),
        "parameters": module.model_config.num_parameters(),
        "train_loss": float(train_loss) if train_loss is not None else None,
    }
    metrics.update(source_metrics(results, datamodule, trainer))  # val_loss_nats/, tokens_seen/, epochs/<source>
    monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    if monitor is not None and monitor.flops_per_micro_batch:
        metrics.update(flops=monitor.cumulative_flops, pf_days=pf_days(monitor.cumulative_flops))
    if cfg.callbacks.eval_tasks:  # lm-evaluation-harness on the local tasks, every rank (a sharded forward)
        from framework.evaluation.harness import evaluate_after_training

        metrics["eval"] = evaluate_after_training(trainer, module, prepared.tokenizer(), cfg.callbacks.eval_tasks,
                                                  cfg.callbacks.eval_shots, cfg.callbacks.eval_limit)
    if trainer.is_global_zero:
        _write_final_metrics(run_dir / "final_metrics.json", metrics)
        _print_summary(metrics, run_dir)
        if cfg.callbacks.model_card:
            write_model_card(run_dir, run_card_info(cfg.name, module, trainer, cfg.data, prepared.meta, metrics))
    finish_wandb(trainer)
    return metrics


def _write_final_metrics(path: Path, metrics: dict) -> None:
    """Atomically; a full disk is one sentence (the checkpoints are intact, so the same command finishes the run)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path} ({err.strerror or err}); free space (or fix the path) "
                                   "and run the same command again; the checkpoints are intact.") from None


@rank_zero_only
def _print_summary(m: dict, run_dir: Path) -> None:
    print(
        f"\nfinal validation loss {m['val_loss_nats']:.4f} nats/token (perplexity {m['val_ppl']:.1f}) vs unigram entropy "
        f"of the validation tokens {m['val_unigram_entropy_nats']:.4f} nats/token "
        f"(difference {m['val_unigram_entropy_nats'] - m['val_loss_nats']:+.4f}); step {m['step']}, "
        f"{m['tokens_seen']:,} tokens seen, {m['parameters']:,} parameters\nrun directory: {run_dir}"
    )
    sources = [k.split("/", 1)[1] for k in m if k.startswith("val_loss_nats/")]  # (val_loss: their weighted mean)
    for name in sources:
        print(f"  {name}: validation loss {m[f'val_loss_nats/{name}']:.4f} nats/token, "
              f"{m.get(f'tokens_seen/{name}', 0):,} tokens seen ({m.get(f'epochs/{name}', 0):.3g} epochs)")
