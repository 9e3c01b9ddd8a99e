"""Which strategy x precision pairs can run on which device, checked before any process or model is built.

Every refusal is one sentence: what is wrong and what to use instead. The matrix (GPU = CUDA):

    strategy      | fp32 | fp16 (16-mixed)      | bf16 (bf16-mixed)      | bf16_true
    auto / ddp    | any  | GPU only             | CPU, or GPU with bf16  | CPU, or GPU with bf16
    fsdp (FSDP2)  | any  | refused (no scaler)  | CPU, or GPU with bf16  | CPU, or GPU with bf16
    deepspeed     | GPU  | GPU                  | GPU with bf16          | GPU with bf16

bf16 needs compute capability 8.0+ (A100, H100, ...): ``torch.cuda.is_bf16_supported()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.distributed.config import FSDP_SHARDINGS, PRECISIONS, STRATEGIES, StrategyConfig

PRECISION_OPTION = {"32-true": "fp32", "16-mixed": "fp16", "bf16-mixed": "bf16", "bf16-true": "bf16_true"}


@dataclass(frozen=True)
class DeviceInfo:
    """What the run will execute on: ``kind`` is "cpu" or "cuda"."""

    kind: str
    name: str = "cpu"
    bf16_supported: bool = True


def detect_device(accelerator: str) -> DeviceInfo:
    """The device ``trainer.accelerator`` resolves to (Lightning's "auto" picks CUDA when it is available)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; "
                             "use trainer.accelerator=cpu or run on a GPU node.")
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())
    if accelerator in ("cpu", "auto"):
        return DeviceInfo("cpu")
    raise ValueError(f"trainer.accelerator={accelerator!r} is not supported; use auto, cpu or gpu.")


def strategy_option(cfg: StrategyConfig) -> str:
    """The conf/strategy option name that selects ``cfg`` (for messages)."""
    if cfg.name == "fsdp":
        return {"full": "fsdp", "shard_grad_op": "fsdp_shard_grad_op", "hybrid": "fsdp_hybrid"}.get(cfg.fsdp_sharding, "fsdp")
    if cfg.name == "deepspeed":
        offload = "_offload" if (cfg.offload_optimizer or cfg.offload_parameters) else ""
        return f"deepspeed_zero{cfg.zero_stage}{offload}"
    return cfg.name


def check_strategy_precision(cfg: StrategyConfig, precision: str, device: DeviceInfo) -> None:
    """Raise ValueError (one sentence: why, and what to use instead) if this pair cannot run on ``device``."""
    if cfg.name not in STRATEGIES:
        raise ValueError(f"strategy.name={cfg.name!r} is not one of {', '.join(STRATEGIES)}; "
                         "pick an option from conf/strategy/ (strategy=ddp, strategy=fsdp, strategy=deepspeed_zero2, ...).")
    if precision not in PRECISIONS:
        raise ValueError(f"precision.mode={precision!r} is not one of {', '.join(PRECISIONS)}; "
                         "pick precision=fp32, fp16, bf16 or bf16_true.")
    if cfg.name == "fsdp" and cfg.fsdp_sharding not in FSDP_SHARDINGS:
        raise ValueError(f"strategy.fsdp_sharding={cfg.fsdp_sharding!r} is not one of {', '.join(FSDP_SHARDINGS)}; "
                         "use strategy=fsdp, fsdp_shard_grad_op or fsdp_hybrid.")
    if cfg.name == "deepspeed" and cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"strategy.zero_stage={cfg.zero_stage} is not a ZeRO stage; "
                         "use strategy=deepspeed_zero1, deepspeed_zero2 or deepspeed_zero3.")
    if (cfg.offload_optimizer or cfg.offload_parameters) and cfg.name != "deepspeed":
        raise ValueError(f"strategy.offload_optimizer/offload_parameters are DeepSpeed options but strategy={cfg.name}; "
                         "use strategy=deepspeed_zero2_offload or deepspeed_zero3_offload.")
    if cfg.offload_parameters and cfg.zero_stage != 3:
        raise ValueError(f"strategy.offload_parameters needs ZeRO stage 3 (stage {cfg.zero_stage} keeps every "
                         "parameter on every GPU); use strategy=deepspeed_zero3_offload or set strategy.offload_parameters=false.")

    option, prec = strategy_option(cfg), PRECISION_OPTION[precision]
    if cfg.name == "deepspeed" and device.kind != "cuda":
        raise ValueError(f"strategy={option} needs CUDA GPUs (Lightning's DeepSpeed strategy refuses the {device.kind}); "
                         "use strategy=ddp or strategy=fsdp on the CPU.")
    if precision == "16-mixed" and device.kind != "cuda":
        raise ValueError(f"precision=fp16 needs a CUDA GPU (float16 autocast with loss scaling does not run on the "
                         f"{device.kind}, and Lightning would silently switch to bf16); use precision=bf16 or fp32.")
    if precision in ("bf16-mixed", "bf16-true") and device.kind == "cuda" and not device.bf16_supported:
        raise ValueError(f"precision={prec} needs a GPU with bfloat16 support (compute capability 8.0+: A100, H100, ...) "
                         f"and {device.name} has none; use precision=fp16 (mixed, with loss scaling) or fp32.")
    if cfg.name == "fsdp" and precision == "16-mixed":
        raise ValueError(f"strategy={option} does not support precision=fp16 (Lightning's FSDP2 strategy has no "
                         "sharded gradient scaler for float16 loss scaling); use precision=bf16 or bf16_true, "
                         "or strategy=deepspeed_zero3 for fp16.")
