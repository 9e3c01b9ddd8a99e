"""Strategy config -> a Lightning strategy. Parallelism is applied from outside the model code.

- ``ddp``: ``DDPStrategy`` (gradients all-reduced; every rank holds the whole model and optimizer).
  Exact resume with 3 or more ranks needs ``strategy.find_unused_parameters=true``. By default torch's DDP
  (2.13, ``Reducer::rebuild_buckets``) reduces a process's first step in one bucket in parameter order and
  then rebuilds its buckets in the order the gradients became ready; the bucket layout fixes which chunk of
  the ring all-reduce (gloo's, NCCL's) each gradient element falls in, so a resumed process sums the first
  step after the resume in another rank order than the uninterrupted run did: the weights differ by float32
  rounding (1e-8 after one resume on 4 ranks; 2 ranks sum in either order alike). With
  ``find_unused_parameters=true`` DDP never rebuilds its buckets, and a resume on any number of ranks is bit
  for bit (tests/test_slurm_multinode.py). It costs a traversal of the autograd graph and an all-reduce of
  a one-flag-per-parameter map every step (torch's DDP documentation); ``static_graph`` and the bucket size
  options still rebuild and do not help.
- ``fsdp``: ``ModelParallelStrategy`` (Lightning's FSDP2 entry point). The sharding itself is applied in
  ``PretrainModule.configure_model`` by ``framework.distributed.parallelize`` (``fully_shard`` per block).
  Checkpoints are torch.distributed.checkpoint directories (one shard per rank) unless
  ``strategy.sharded_checkpoint=false``.
- ``deepspeed``: ``DeepSpeedStrategy(config=...)`` with the dict from ``deepspeed_config``; CUDA only.
  Checkpoints are DeepSpeed directories.
``fw-consolidate`` turns either kind of sharded checkpoint into one ``.ckpt`` file.
"""

from __future__ import annotations

from typing import Any

from framework.distributed.config import StrategyConfig
from framework.distributed.deepspeed_config import deepspeed_config, lightning_deepspeed_config


def build_strategy(cfg: StrategyConfig, accelerator: str = "auto", precision: str = "32-true",
                   micro_batch_size: int = 1, accumulate_grad_batches: int = 1, gradient_clip_val: float = 0.0) -> Any:
    """The Lightning strategy (or "auto") for ``cfg``. Call ``check_strategy_precision`` first."""
    if cfg.name == "auto":
        return "auto"
    from framework.distributed.precision import detect_device

    backend = cfg.process_group_backend or ("nccl" if detect_device(accelerator).kind == "cuda" else "gloo")
    if cfg.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=backend, find_unused_parameters=cfg.find_unused_parameters)
    if cfg.name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(save_distributed_checkpoint=cfg.sharded_checkpoint, process_group_backend=backend)
    if cfg.name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        config = deepspeed_config(cfg, precision, micro_batch_size, accumulate_grad_batches, gradient_clip_val)
        return DeepSpeedStrategy(config=lightning_deepspeed_config(config), process_group_backend=backend)
    raise ValueError(f"strategy={cfg.name!r} is not one of: auto, ddp, fsdp, deepspeed.")
