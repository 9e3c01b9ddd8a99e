"""What all three objectives share: the optimizer and LR schedule, token accounting and logging.

A subclass says which model family it trains (``family``) and how a batch becomes a loss (``compute_loss``).
Everything else lives here once. The module does not know the data: how long a raw window is and how windows
become a batch is the data side's (``framework.data.objective_batches``), and so is the data position
(``PretrainDataModule`` counts what it hands out and saves it in its own checkpoint state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import lightning as L
import torch

from framework.callbacks.throughput import logs_this_step
from framework.data.position import upgrade_data_state
from framework.data.tokenizer import SpecialIds
from framework.models import ModelConfig, build_model
from framework.objectives.config import ObjectiveConfig, OptimConfig
# param_groups, adamw_kernel and lr_lambda are imported from here by tests and workers
from framework.objectives.optimizers import adamw_kernel, build_optimizer, param_groups  # noqa: F401
from framework.objectives.schedules import lr_lambda


class PretrainModule(L.LightningModule):
    family: ClassVar[str] = "decoder"
    objective_name: ClassVar[str] = ""

    def __init__(self, model_config: dict, optim: dict, objective: dict, special_ids: dict, max_steps: int,
                 **legacy) -> None:
        """``legacy``: keys of older checkpoints' hyper_parameters (``seq_len``, ``tokenizer_path``), ignored."""
        super().__init__()
        unknown = set(legacy) - LEGACY_HPARAMS
        if unknown:
            raise TypeError(f"PretrainModule got unexpected arguments {sorted(unknown)}.")
        # plain dicts, so the checkpoint's hyper_parameters rebuild the module (export, generate, resume)
        self.save_hyperparameters(ignore=sorted(LEGACY_HPARAMS))
        self.model_config = ModelConfig(**model_config)
        self.optim_config = OptimConfig(**optim)
        self.objective_config = ObjectiveConfig(**objective)
        self.special_ids = SpecialIds(**{k: tuple(v) if k == "sentinels" else v for k, v in special_ids.items()})
        self.max_steps = max_steps
        if self.model_config.family != self.family:
            raise ValueError(
                f"objective={self.objective_name} trains {self.family!r} models, but the model preset "
                f"{self.model_config.name!r} is of family {self.model_config.family!r}; pick a preset of family {self.family!r} "
                f"(see `model=` options in conf/model/)."
            )
        self.model = build_model(self.model_config)
        self.tokens_seen = 0  # input tokens processed by all ranks, restored on resume
        # set by framework.run: applies the strategy's parallelism (FSDP2, activation checkpointing,
        # compile) to self.model in configure_model; None = train the model as built
        self.parallelizer = None
        # set by framework.run when DeepSpeed's ZeRO wraps the optimizer: AdamW then runs its foreach kernel, not
        # the fused one (framework.objectives.optimizers.adamw_kernel), and Muon is refused
        self.optimizer_under_deepspeed = False
        # set by framework.run: the validation sources (name, weight), one val dataloader each, in order; empty
        # = one val dataloader, val/loss only
        self.val_sources: tuple[tuple[str, float], ...] = ()
        self._val_sum = torch.zeros(())
        self._val_count = torch.zeros(())

    # ------------------------------------------------------------------ subclass interface
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the positions that count, and the number of those positions."""
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Input tokens one micro-batch feeds the model (for throughput and tokens-seen)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.last_loss = loss.detach()  # read by the spike guard before the optimizer step
        self.tokens_seen += self.batch_tokens(batch) * self.trainer.world_size
        # No host-device synchronisation per step. The loss is logged as a device tensor (the loggers read it
        # every log_every_n_steps only). A Python number passed to self.log becomes a tensor on the module's
        # device (a blocking copy on CUDA), and a progress-bar entry, once logged, is read with .item() after
        # every later step (Lightning's _ResultCollection.metrics): so the rest is logged on logging steps
        # only, as host tensors, and the progress bar gets a host copy of the loss (one copy per interval).
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        if not logs_this_step(self.trainer):
            return loss
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log("train/tokens_seen", torch.tensor(float(self.tokens_seen)), on_step=True, on_epoch=False)
        opt = self.optimizers(use_pl_optimizer=False)
        if isinstance(opt, list):  # DeepSpeed's ZeRO optimizers are not torch Optimizers: Lightning returns a list
            opt = opt[0] if opt else None
        if opt is not None:
            self.log("train/lr", torch.tensor(float(opt.param_groups[0]["lr"])), on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        shape = (len(self.val_sources) or 1,)  # loss sums and counts per val dataloader
        self._val_sum = torch.zeros(shape, device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros(shape, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, count = self.compute_loss(batch)
        self._val_sum[dataloader_idx] += loss.double() * count
        self._val_count[dataloader_idx] += count

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if self.val_sources:  # val/<source>/loss, and val/loss = sum_i w_i loss_i (the training mixture's loss)
            names, weights = zip(*self.val_sources)
            per_source = total / count.clamp_min(1)  # (sources,) token-weighted means over all ranks, in nats
            for name, loss in zip(names, per_source):
                self.log(f"val/{name}/loss", loss.float(), sync_dist=True)
            val_loss = (per_source * torch.tensor(weights, dtype=per_source.dtype, device=per_source.device)).sum().float()
        else:
            val_loss = (total.sum() / count.sum().clamp_min(1)).float()  # token-weighted mean over all ranks, in nats
        # already identical on every rank; sync_dist averages identical values (and keeps Lightning quiet)
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(val_loss.clamp(max=50)), sync_dist=True)

    def configure_model(self) -> None:
        """Lightning hook, run inside the strategy's setup before the optimizer exists (and again before
        validate/test: the parallelizer is idempotent)."""
        if self.parallelizer is not None:
            self.parallelizer(self.model, self.trainer)

    def configure_optimizers(self):
        """The optimizer ``optim.name`` names (``framework.objectives.optimizers``) and one LR schedule that
        scales every param group's own peak LR (AdamW's and, with optim=muon, Muon's) by ``lr_lambda``."""
        o = self.optim_config
        device_types = {p.device.type for p in self.model.parameters() if p.requires_grad}
        optimizer = build_optimizer(self.model, o, device_types, deepspeed=self.optimizer_under_deepspeed)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, o.warmup_steps, self.max_steps, o.min_lr_ratio, o.schedule,
                                              o.decay_fraction, o.decay_shape))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        upgrade_data_state(checkpoint)  # an older mixture run's data position, under the name it is restored from


LEGACY_HPARAMS = {"seq_len", "tokenizer_path"}  # saved by older checkpoints; the data side owns them now


def module_kwargs(model_config: ModelConfig, optim: OptimConfig, objective: ObjectiveConfig, special_ids: SpecialIds,
                  max_steps: int) -> dict:
    return dict(model_config=dataclasses.asdict(model_config), optim=dataclasses.asdict(optim),
                objective=dataclasses.asdict(objective), special_ids=dataclasses.asdict(special_ids),
                max_steps=max_steps)
