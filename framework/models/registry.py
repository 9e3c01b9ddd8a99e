"""One registration per model family: what needs torch (the model class, the block lists that parallelism wraps,
the Hugging Face export, the log-likelihood scorer), joined to the family's torch-free traits in
``framework.catalogue.FAMILIES``.

Adding a family: write its model (and its HF mapping) in its own module, add its ``FamilySpec`` to the catalogue
and one ``FamilyRegistration`` to ``REGISTRY`` below. ``tests/test_catalogue.py`` fails while the two disagree.
Code elsewhere asks the registration or the traits (``family(name).traits.causal``) instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from framework.catalogue import FAMILIES, FamilySpec
from framework.evaluation import scoring
from framework.models import hf_llama, hf_t5
from framework.models.config import ModelConfig
from framework.models.decoder import Decoder
from framework.models.encoder import Encoder
from framework.models.encoder_decoder import EncoderDecoder


@dataclass(frozen=True)
class HFExport:
    """How a family maps onto transformers (class names: ``FamilySpec.hf_architecture`` / ``hf_auto_class``)."""

    config: Callable[[ModelConfig, Any], Any]  # (model config, SpecialIds) -> transformers config
    weight_names: Callable[[ModelConfig], dict[str, str]]  # transformers name -> our state-dict name
    generation: Callable[[Any], dict]  # SpecialIds -> generation_config fields beyond pad and eos


@dataclass(frozen=True)
class FamilyRegistration:
    traits: FamilySpec
    model_class: type[nn.Module]
    block_lists: tuple[str, ...]  # attributes holding the repeated blocks, each an nn.ModuleList (parallelize)
    export: HFExport
    score: Callable[..., list]  # (model, requests, special, batch_size) -> [(log p, is_greedy)] (fw-eval)

    @property
    def name(self) -> str:
        return self.traits.name


REGISTRY: dict[str, FamilyRegistration] = {r.name: r for r in (
    FamilyRegistration(FAMILIES["decoder"], Decoder, ("blocks",),
                       HFExport(hf_llama.decoder_config, hf_llama.weight_names, hf_llama.decoder_generation),
                       scoring.score_decoder),
    FamilyRegistration(FAMILIES["encoder"], Encoder, ("blocks",),
                       HFExport(hf_llama.encoder_config, hf_llama.weight_names, hf_llama.encoder_generation),
                       scoring.score_encoder),
    FamilyRegistration(FAMILIES["encoder_decoder"], EncoderDecoder, ("encoder_blocks", "decoder_blocks"),
                       HFExport(hf_t5.config, hf_t5.weight_names, hf_t5.generation),
                       scoring.score_encoder_decoder),
)}


def family(name: str) -> FamilyRegistration:
    """The registration of model family ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"no model is registered for family {name!r}; registered: {', '.join(REGISTRY)} "
                         "(framework/models/registry.py).")
    return REGISTRY[name]


def build_model(config: ModelConfig) -> nn.Module:
    """The ``nn.Module`` for ``config.family``."""
    return family(config.family).model_class(config)


def check_config(model: nn.Module, config: ModelConfig) -> None:
    """Refuse a config the model class is not registered for, or a position scheme its family does not use."""
    reg = family(config.family)
    if not isinstance(model, reg.model_class):
        raise ValueError(f"{type(model).__name__} cannot build a model.family={config.family!r} config "
                         f"({reg.model_class.__name__} does); build models with framework.models.build_model(config).")
    if config.position != reg.traits.position:
        raise ValueError(f"{config.family} models use {reg.traits.position} positions, not {config.position}; "
                         f"set model.position={reg.traits.position}.")


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists of repeated blocks of a built model, in forward order (encoder stack before decoder)."""
    return [getattr(model, attr) for attr in family(model.config.family).block_lists]
