"""The model shapes the planner may pick, and the search for the one whose exact parameter count is closest
to a target N (``framework.models.config.count_parameters``, exact for all three families)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.catalogue import family_spec
from framework.models.config import PRESETS, ModelConfig


@dataclass(frozen=True)
class ShapeFamily:
    """Shapes the search may pick: d_model a multiple of 64 (of 128 from 1024, of 256 from 2048),
    head_dim 32 below d_model 256, 64 up to 2048, 128 above (GPT-2 / Llama practice); aspect ratio
    d_model / n_layers (per stack for encoder-decoders) in [min_aspect, max_aspect]. Kaplan et al. 2020
    (Figure 5) find the loss within a few percent of the best across a wide range of aspect ratios (about
    10 to 200 at 50M parameters), so the range is wide and the search prefers 64 among near-equal counts."""

    min_aspect: float = 16.0
    max_aspect: float = 128.0
    max_layers: int = 256
    max_d_model: int = 32768

    def d_models(self) -> list[int]:
        ds = list(range(64, 1024, 64)) + list(range(1024, 2048, 128)) + list(range(2048, self.max_d_model + 1, 256))
        return ds

    @staticmethod
    def head_dim(d_model: int) -> int:
        return 32 if d_model < 256 else 64 if d_model <= 2048 else 128

    def layer_range(self, d_model: int) -> range:
        lo = max(1, math.ceil(d_model / self.max_aspect))
        hi = min(self.max_layers, max(lo, math.floor(d_model / self.min_aspect)))
        return range(lo, hi + 1)


def _preset_for(family: str) -> str:
    for name, p in PRESETS.items():
        if p["family"] == family:
            return name
    raise ValueError(f"no model preset of family {family!r} exists in framework.models.config.PRESETS yet.")


def shape_config(family: str, d_model: int, n_layers: int, vocab_size: int, seq_len: int,
                 n_kv_heads: int = 0) -> ModelConfig:
    """The ModelConfig of one candidate shape (every shape field set explicitly)."""
    hd = ShapeFamily.head_dim(d_model)
    preset = dict(PRESETS[_preset_for(family)])
    preset.update(family=family, d_model=d_model, n_layers=n_layers, n_heads=d_model // hd, head_dim=hd,
                  n_kv_heads=n_kv_heads, d_ff=0, max_seq_len=seq_len, vocab_size=vocab_size,
                  n_decoder_layers=n_layers if family_spec(family).has_decoder_stack else 0)
    return ModelConfig(name=f"planned-{family}-d{d_model}-l{n_layers}", **preset)


def candidate_shapes(family: str, vocab_size: int, seq_len: int, shapes: ShapeFamily = ShapeFamily()):
    """Yield (n_params, d_model, n_layers) over the shape family. The exact count is linear in the number of
    layers (per stack), so two ModelConfigs per width give it for every depth."""
    for d in shapes.d_models():
        one = shape_config(family, d, 1, vocab_size, seq_len).num_parameters()
        per_layer = shape_config(family, d, 2, vocab_size, seq_len).num_parameters() - one
        for n_layers in shapes.layer_range(d):
            yield one + (n_layers - 1) * per_layer, d, n_layers


def search_shape(family: str, n_target: float, vocab_size: int, seq_len: int,
                 shapes: ShapeFamily = ShapeFamily(), tolerance: float = 0.01) -> tuple[ModelConfig, int]:
    """The candidate whose exact parameter count is closest to ``n_target``; among those within ``tolerance``
    (relative) of the closest, the one with aspect ratio nearest 64 (GPT-2 small / Llama 7B-like proportions
    at the size). Raises BudgetTooSmall if even the smallest shape is larger than ``n_target``."""
    scored = [(abs(math.log(n / n_target)), abs(math.log(d / n_layers / 64)), n, d, n_layers)
              for n, d, n_layers in candidate_shapes(family, vocab_size, seq_len, shapes)]
    smallest = min(scored, key=lambda t: t[2])
    if n_target < smallest[2]:
        raise BudgetTooSmall(smallest[2], shape_config(family, smallest[3], smallest[4], vocab_size, seq_len))
    best_error = min(t[0] for t in scored)
    if best_error > math.log(2):
        raise ValueError(f"N_opt = {n_target:.3g} parameters is beyond the largest {family} shape the planner "
                         f"builds (d_model <= {shapes.max_d_model}); lower the budget.")
    _, _, n, d, n_layers = min((t for t in scored if t[0] <= best_error + tolerance), key=lambda t: (t[1], t[0]))
    cfg = shape_config(family, d, n_layers, vocab_size, seq_len)
    assert cfg.num_parameters() == n
    return cfg, n


class BudgetTooSmall(ValueError):
    def __init__(self, n_min: int, cfg: ModelConfig) -> None:
        self.n_min, self.cfg = n_min, cfg
        super().__init__(f"smallest shape has {n_min} parameters")
