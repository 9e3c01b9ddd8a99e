"""Typed schemas for the ``objective`` and ``optim`` config groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.choices import DecayShape, MuonLrAdjustment, Objective, Optimizer, Schedule, names


@dataclass
class ObjectiveConfig:
    name: Objective = "clm"  # clm | mlm | span_corruption
    # masked LM (Devlin et al. 2019, sec. 3.1): select mask_probability of tokens; of those 80% -> <mask>,
    # 10% -> a random token, 10% unchanged
    mask_probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word_masking: bool = False
    # span corruption (Raffel et al. 2020, sec. 3.1.4; T5's random_spans_noise_mask)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0


SCHEDULES = tuple(names(Schedule))
DECAY_SHAPES = tuple(names(DecayShape))
OPTIMIZERS = tuple(names(Optimizer))
MUON_LR_ADJUSTMENTS = tuple(names(MuonLrAdjustment))


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019; with ``name=muon``, Muon for the hidden matrices) with linear warmup,
    then either cosine decay to ``min_lr_ratio * lr`` over the rest of the run (``schedule=cosine``) or
    warmup-stable-decay (``schedule=wsd``, Hägele et al. 2024): the peak LR held constant, then a decay to ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the
    steps, shaped ``linear``, ``cosine`` or ``1-sqrt`` (the paper's best)."""

    lr: float = 1e-3  # suits the small CPU quickstart model; larger models want a lower lr (e.g. 3e-4) and more warmup
    weight_decay: float = 0.1  # applied to matrices (dim >= 2) only; norms and biases are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    schedule: Schedule = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying, in (0, 1] (Hägele et al.: 0.2)
    decay_shape: DecayShape = "1-sqrt"  # wsd: linear | cosine | 1-sqrt
    # optimizer: adamw, or muon = Muon (Jordan et al. 2024) for the blocks' 2-D matrices + AdamW (the fields above)
    # for embeddings, LM head, norms and biases (framework.objectives.optimizers)
    name: Optimizer = "adamw"
    muon_lr: float = 0.0  # Muon's peak LR before the per-matrix adjustment; 0 = optim.lr
    muon_momentum: float = 0.95  # Nesterov momentum of Muon's update
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    # match_rms_adamw (Liu et al. 2025): lr * 0.2 sqrt(max(out, in)), update RMS ~ AdamW's, so optim.lr and
    # weight_decay carry over; original (Jordan et al. 2024): lr * sqrt(max(1, out / in)), wants lr ~ 0.02
    muon_adjust_lr: MuonLrAdjustment = "match_rms_adamw"


def check_optim(optim: OptimConfig, max_steps: int, strategy=None) -> None:
    """One-sentence ValueError for an optimizer or schedule that cannot run (under ``strategy``, a
    StrategyConfig, when given); called before any data is prepared."""
    check_optimizer(optim, strategy)
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if optim.schedule == "wsd":
        if not 0.0 < optim.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={optim.decay_fraction} must be in (0, 1]: the share of "
                             "trainer.max_steps spent decaying (0.2 is Hägele et al.'s choice).")
        if optim.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"optim.decay_shape={optim.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}.")
        if decay_start(max_steps, optim.decay_fraction) < optim.warmup_steps:
            raise ValueError(f"optim.decay_fraction={optim.decay_fraction} with trainer.max_steps={max_steps} starts "
                             f"the decay before optim.warmup_steps={optim.warmup_steps} ends; lower one of them.")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1].")


def check_optimizer(optim: OptimConfig, strategy=None) -> None:
    """``optim.name`` and Muon's settings, and Muon's strategies: DeepSpeed is refused."""
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r} is not one of {', '.join(OPTIMIZERS)}; "
                         "use optim=adamw or optim=muon.")
    if optim.name != "muon":
        return
    if optim.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
        raise ValueError(f"optim.muon_adjust_lr={optim.muon_adjust_lr!r} is not one of "
                         f"{', '.join(MUON_LR_ADJUSTMENTS)}.")
    if not 0.0 <= optim.muon_momentum < 1.0 or optim.muon_ns_steps < 1 or optim.muon_lr < 0:
        raise ValueError(f"optim.muon_momentum={optim.muon_momentum} must be in [0, 1), optim.muon_ns_steps="
                         f"{optim.muon_ns_steps} at least 1 and optim.muon_lr={optim.muon_lr} at least 0.")
    if strategy is not None and strategy.name == "deepspeed":
        from framework.distributed.precision import strategy_option
        from framework.objectives.optimizers import MUON_DEEPSPEED

        raise ValueError(f"optim=muon cannot run under strategy={strategy_option(strategy)}: {MUON_DEEPSPEED}; "
                         "use strategy=fsdp or strategy=ddp with optim=muon, or optim=adamw with DeepSpeed.")


def decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first step of a WSD decay: the last ``round(decay_fraction * max_steps)`` steps decay."""
    return max_steps - round(decay_fraction * max_steps)
