"""The DeepSpeed config dict, generated from the typed strategy config (https://www.deepspeed.ai/docs/config-json/).

The same dict drives Lightning's ``DeepSpeedStrategy(config=...)`` on GPUs and ``deepspeed.initialize``
in the CPU tests. The optimizer is the objective's torch ``AdamW`` (``configure_optimizers``), so the update
rule and the LR schedule are the same under every strategy; DeepSpeed wraps it (ZeRO partitioning) rather
than replacing it.
"""

from __future__ import annotations

from typing import Any

from framework.distributed.config import StrategyConfig


def deepspeed_config(cfg: StrategyConfig, precision: str, micro_batch_size: int, accumulate_grad_batches: int = 1,
                     gradient_clip_val: float = 0.0) -> dict[str, Any]:
    """``precision`` is Lightning's string (32-true | 16-mixed | bf16-mixed | bf16-true)."""
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
        "reduce_bucket_size": 200_000_000,  # elements
        "allgather_bucket_size": 200_000_000,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_grad_batches,
        "gradient_clipping": float(gradient_clip_val or 0.0),  # global L2 norm, as torch clip_grad_norm_
        "zero_optimization": zero,
        # the client optimizer is torch.optim.AdamW: allow it under ZeRO, and on the CPU under offload
        # (DeepSpeed would otherwise insist on its own DeepSpeedCPUAdam)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # Lightning logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if precision == "16-mixed":
        # dynamic loss scaling: loss_scale 0 means dynamic, starting at 2**initial_scale_power
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": cfg.initial_scale_power,
            "loss_scale_window": cfg.loss_scale_window,
            "hysteresis": cfg.hysteresis,
            "min_loss_scale": cfg.min_loss_scale,
        }
    elif precision in ("bf16-mixed", "bf16-true"):
        # DeepSpeed's bf16 keeps bf16 weights for compute and fp32 master weights in the ZeRO optimizer
        config["bf16"] = {"enabled": True}
    return config


def lightning_deepspeed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config for ``DeepSpeedStrategy``: Lightning sets ``gradient_accumulation_steps`` itself (from
    ``trainer.accumulate_grad_batches``) and refuses a config that already has it."""
    return {k: v for k, v in config.items() if k != "gradient_accumulation_steps"}
