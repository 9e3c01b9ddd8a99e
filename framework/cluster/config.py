"""Typed schema for the ``cluster`` config group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
