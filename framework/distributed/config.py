"""Typed schemas for the ``strategy`` and ``precision`` config groups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp


@dataclass
class PrecisionConfig:
    # Lightning precision: 32-true | 16-mixed | bf16-mixed | bf16-true
    mode: str = "32-true"
