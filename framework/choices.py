"""The closed sets of names a config field may take, as string Enums, so a bad name fails at composition.

The names come from where they are written once: objectives, families, strategies and precisions from
``framework.catalogue``, model presets from ``framework.models.config.PRESETS``, the optimizer and schedule
names from ``framework.objectives.config``. The typed schemas (``framework/config.py`` and each subsystem's
``config.py``) annotate their fields with these Enums; OmegaConf then refuses ``optim.schedule=linaer`` while
composing, and ``framework.config_errors`` says which names are valid.

OmegaConf matches a string against an Enum's member *names*, so every member's name is its value (the
functional API allows names such as ``bf16-mixed`` and ``1-sqrt``). The schemas' defaults are the plain strings,
and ``plain`` turns the members OmegaConf hands back into plain strings again: everything downstream (run
directories, JSON, checkpoints' hyperparameters, wandb's config, the model card) sees exactly the ``str`` it saw
before the fields were typed.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Iterable

from framework.catalogue import FAMILIES, FSDP_SHARDINGS, OBJECTIVES, POSITIONS, PRECISION_MODES, STRATEGY_NAMES


class Choice(str, enum.Enum):
    """A str Enum that renders as its value: ``str()`` and f-strings as ``enum.StrEnum`` (Python 3.11+), and
    ``repr()`` as the string's, so a member reaching a message (``f"{cfg.name!r}"``) reads as the name did."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choice(name: str, values: Iterable[str]) -> type[Choice]:
    """A Choice Enum whose members are named after their values: ``choice("Schedule", ["cosine", "wsd"])``."""
    return Choice(name, [(v, v) for v in values], module=__name__)


def names(enum_type: type[enum.Enum]) -> list[str]:
    return [m.value for m in enum_type]


def plain(obj: Any) -> Any:
    """``obj`` (a dataclass, list, dict or value) with every Enum member replaced by its value, in place for
    dataclasses: what ``OmegaConf.to_object`` returns, made of the plain types the code has always passed on."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, plain(getattr(obj, f.name)))
        return obj
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    return obj


def _model_presets() -> list[str]:
    from framework.models.config import PRESETS  # no torch: plain dataclasses

    return list(PRESETS)


Objective = choice("Objective", OBJECTIVES)
Family = choice("Family", FAMILIES)
ModelPreset = choice("ModelPreset", _model_presets())
Position = choice("Position", POSITIONS)
StrategyName = choice("StrategyName", STRATEGY_NAMES)
FsdpSharding = choice("FsdpSharding", FSDP_SHARDINGS)
PrecisionMode = choice("PrecisionMode", PRECISION_MODES)
Optimizer = choice("Optimizer", ["adamw", "muon"])
Schedule = choice("Schedule", ["cosine", "wsd"])
DecayShape = choice("DecayShape", ["linear", "cosine", "1-sqrt"])
MuonLrAdjustment = choice("MuonLrAdjustment", ["match_rms_adamw", "original"])
DataSource = choice("DataSource", ["stdlib", "licenses", "files", "hub"])
WandbMode = choice("WandbMode", ["auto", "online", "offline", "disabled"])
ClusterName = choice("ClusterName", ["local", "slurm"])
