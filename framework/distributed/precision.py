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

from framework import catalogue
from framework.catalogue import (FSDP_SHARDINGS, PRECISION_BY_MODE, PRECISION_MODES, STRATEGIES, STRATEGY_NAMES,
                                 ZERO_STAGES)
from framework.distributed.config import StrategyConfig


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
    return catalogue.strategy_option(cfg.name, fsdp_sharding=cfg.fsdp_sharding, zero_stage=cfg.zero_stage,
                                     offload_optimizer=cfg.offload_optimizer, offload_parameters=cfg.offload_parameters)


def _options(names) -> str:
    """``a, b or c``."""
    names = list(names)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _check_fields(cfg: StrategyConfig, precision: str) -> None:
    """The fields name a strategy and a precision the catalogue knows, and agree with each other."""
    if cfg.name not in STRATEGY_NAMES:
        raise ValueError(f"strategy.name={cfg.name!r} is not one of {', '.join(STRATEGY_NAMES)}; "
                         "pick an option from conf/strategy/ (strategy=ddp, strategy=fsdp, strategy=deepspeed_zero2, ...).")
    if precision not in PRECISION_BY_MODE:
        raise ValueError(f"precision.mode={precision!r} is not one of {', '.join(PRECISION_MODES)}; "
                         f"pick precision={_options(catalogue.PRECISIONS)}.")
    fsdp = [o for o, s in STRATEGIES.items() if s.name == "fsdp"]
    if cfg.name == "fsdp" and cfg.fsdp_sharding not in FSDP_SHARDINGS:
        raise ValueError(f"strategy.fsdp_sharding={cfg.fsdp_sharding!r} is not one of {', '.join(FSDP_SHARDINGS)}; "
                         f"use strategy={_options(fsdp)}.")
    if cfg.name == "deepspeed" and cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"strategy.zero_stage={cfg.zero_stage} is not a ZeRO stage; "
                         f"use strategy={_options(f'deepspeed_zero{stage}' for stage in ZERO_STAGES)}.")
    offloading = [o for o, s in STRATEGIES.items() if s.offload]
    if (cfg.offload_optimizer or cfg.offload_parameters) and cfg.name != "deepspeed":
        raise ValueError(f"strategy.offload_optimizer/offload_parameters are DeepSpeed options but strategy={cfg.name}; "
                         f"use strategy={_options(offloading)}.")
    if cfg.offload_parameters and cfg.zero_stage != 3:
        raise ValueError(f"strategy.offload_parameters needs ZeRO stage 3 (stage {cfg.zero_stage} keeps every "
                         "parameter on every GPU); use strategy=deepspeed_zero3_offload or set strategy.offload_parameters=false.")


def check_strategy_precision(cfg: StrategyConfig, precision: str, device: DeviceInfo) -> None:
    """Raise ValueError (one sentence: why, and what to use instead) if this pair cannot run on ``device``.
    The matrix follows the catalogue's traits: ``StrategySpec.cuda_only`` / ``fp16_loss_scaling`` and
    ``PrecisionSpec.loss_scaling`` / ``needs_bf16``."""
    _check_fields(cfg, precision)
    option, prec = strategy_option(cfg), PRECISION_BY_MODE[precision]
    # an option outside the catalogue (deepspeed_zero1_offload) has the traits of its strategy name
    spec = STRATEGIES.get(option) or next(s for s in STRATEGIES.values() if s.name == cfg.name)
    if spec.cuda_only and device.kind != "cuda":
        raise ValueError(f"strategy={option} needs CUDA GPUs (Lightning's DeepSpeed strategy refuses the {device.kind}); "
                         "use strategy=ddp or strategy=fsdp on the CPU.")
    if prec.loss_scaling and device.kind != "cuda":
        raise ValueError(f"precision={prec.option} needs a CUDA GPU (float16 autocast with loss scaling does not run on "
                         f"the {device.kind}, and Lightning would silently switch to bf16); use precision=bf16 or fp32.")
    if prec.needs_bf16 and device.kind == "cuda" and not device.bf16_supported:
        raise ValueError(f"precision={prec.option} needs a GPU with bfloat16 support (compute capability 8.0+: A100, "
                         f"H100, ...) and {device.name} has none; use precision=fp16 (mixed, with loss scaling) or fp32.")
    if prec.loss_scaling and not spec.fp16_loss_scaling:
        raise ValueError(f"strategy={option} does not support precision={prec.option} (Lightning's FSDP2 strategy has "
                         "no sharded gradient scaler for float16 loss scaling); use precision=bf16 or bf16_true, "
                         "or strategy=deepspeed_zero3 for fp16.")
