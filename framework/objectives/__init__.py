"""One LightningModule per pretraining objective (``framework.catalogue.ObjectiveSpec.lightning_module``);
``OBJECTIVES`` maps ``objective.name`` to it.

The modules load on first use (PEP 562), so ``framework.objectives.config`` (the typed schemas, whose defaults
the planner reads) imports without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from framework import catalogue

if TYPE_CHECKING:
    from framework.objectives.base import PretrainModule

_WHERE = {"PretrainModule": "base", **{spec.lightning_module.split(":")[1]: spec.lightning_module.split(":")[0]
                                       for spec in catalogue.OBJECTIVES.values()}}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"framework.objectives.{_WHERE[name]}"), name)
    if name == "OBJECTIVES":
        return {objective: objective_class(objective) for objective in catalogue.OBJECTIVES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def objective_class(name: str) -> type[PretrainModule]:
    if name not in catalogue.OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {sorted(catalogue.OBJECTIVES)}.")
    return __getattr__(catalogue.OBJECTIVES[name].lightning_module.split(":")[1])


__all__ = ["OBJECTIVES", "PretrainModule", "CausalLM", "MaskedLM", "SpanCorruption", "objective_class"]
