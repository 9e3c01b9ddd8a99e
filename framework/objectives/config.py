"""Typed schemas for the ``objective`` and ``optim`` config groups."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ObjectiveConfig:
    name: str = "clm"  # clm | mlm | span_corruption
    # masked LM (Devlin et al. 2019, sec. 3.1): select mask_probability of tokens; of those 80% -> <mask>,
    # 10% -> a random token, 10% unchanged
    mask_probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word_masking: bool = False
    # span corruption (Raffel et al. 2020, sec. 3.1.4; T5's random_spans_noise_mask)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0


SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup, then either cosine decay to ``min_lr_ratio * lr``
    over the rest of the run (``schedule=cosine``) or warmup-stable-decay (``schedule=wsd``, Hägele et al. 2024):
    the peak LR held constant, then a decay to ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the
    steps, shaped ``linear``, ``cosine`` or ``1-sqrt`` (the paper's best)."""

    lr: float = 3e-4
    weight_decay: float = 0.1  # applied to matrices (dim >= 2) only; norms and biases are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying, in (0, 1] (Hägele et al.: 0.2)
    decay_shape: str = "1-sqrt"  # wsd: linear | cosine | 1-sqrt


def check_optim(optim: OptimConfig, max_steps: int) -> None:
    """One-sentence ValueError for a schedule that cannot run; called before any data is prepared."""
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


def decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first step of a WSD decay: the last ``round(decay_fraction * max_steps)`` steps decay."""
    return max_steps - round(decay_fraction * max_steps)
