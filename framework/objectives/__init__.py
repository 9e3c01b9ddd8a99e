"""One LightningModule per pretraining objective; ``OBJECTIVES`` maps ``objective.name`` to it."""

from framework.objectives.base import PretrainModule
from framework.objectives.clm import CausalLM

OBJECTIVES: dict[str, type[PretrainModule]] = {"clm": CausalLM}


def objective_class(name: str) -> type[PretrainModule]:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "PretrainModule", "CausalLM", "objective_class"]
