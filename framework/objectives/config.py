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


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-4
    weight_decay: float = 0.1  # applied to matrices (dim >= 2) only; norms and biases are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
