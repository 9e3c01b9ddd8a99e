"""Typed schemas for the ``strategy`` and ``precision`` config groups.

One override picks each: ``strategy=fsdp precision=bf16``. The option files in ``conf/strategy/`` and
``conf/precision/`` set these fields; ``framework.distributed.strategies.build_strategy`` turns them into a
Lightning strategy and ``framework.distributed.precision.check_strategy_precision`` refuses pairs that
cannot work before any process group or model is built. The valid values (strategy names, FSDP shardings,
ZeRO stages, precision modes) are listed once, in ``framework.catalogue``.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.choices import FsdpSharding, PrecisionMode, StrategyName


@dataclass
class StrategyConfig:
    name: StrategyName = "auto"  # auto | ddp | fsdp | deepspeed
    # --- FSDP2 (torch.distributed.fsdp.fully_shard per transformer block, then the root)
    # full: parameters, gradients and optimizer states sharded; parameters re-sharded after forward (ZeRO-3)
    # shard_grad_op: parameters kept gathered between forward and backward (ZeRO-2-like, less communication)
    # hybrid: full sharding inside groups of ``hybrid_shard_size`` ranks, replicated across groups (HSDP)
    fsdp_sharding: FsdpSharding = "full"
    hybrid_shard_size: int = 0  # ranks per sharding group for hybrid; 0 = the devices of one node
    # --- DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
    # Parameter Models"): stage 1 shards optimizer states, 2 also gradients, 3 also parameters
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO-Offload)
    offload_parameters: bool = False  # stage 3 only: parameters live on the CPU between uses (ZeRO-Infinity)
    # fp16 dynamic loss scaling (DeepSpeed's; Micikevicius et al. 2018 "Mixed Precision Training", sec. 3.2):
    # start at 2**initial_scale_power, halve on overflow (after ``hysteresis`` overflows), double after
    # ``loss_scale_window`` overflow-free steps, never below ``min_loss_scale``
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # --- per-block options, any strategy
    activation_checkpointing: bool = False  # recompute each block's activations in backward (Chen et al. 2016)
    compile: bool = False  # torch.compile each block
    # --- common
    sharded_checkpoint: bool = True  # fsdp: one shard per rank (a directory); False gathers one file on rank 0
    process_group_backend: str = ""  # "" = nccl on GPUs, gloo on CPUs
    find_unused_parameters: bool = False  # ddp only; true also makes a resume on 3+ ranks bit-exact (no bucket rebuild; see strategies.py)


@dataclass
class PrecisionConfig:
    # Lightning precision: 32-true | 16-mixed | bf16-mixed | bf16-true
    mode: PrecisionMode = "32-true"
