"""One LightningModule per pretraining objective; ``OBJECTIVES`` maps ``objective.name`` to it."""

from framework.objectives.base import PretrainModule
from framework.objectives.clm import CausalLM
from framework.objectives.mlm import MaskedLM
from framework.objectives.span_corruption import SpanCorruption

OBJECTIVES: dict[str, type[PretrainModule]] = {"clm": CausalLM, "mlm": MaskedLM, "span_corruption": SpanCorruption}


def objective_class(name: str) -> type[PretrainModule]:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "PretrainModule", "CausalLM", "MaskedLM", "SpanCorruption", "objective_class"]
