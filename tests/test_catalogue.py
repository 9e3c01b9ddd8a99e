"""The catalogue (``framework.catalogue``) and the family registry (``framework.models.registry``) agree with
conf/, with each other and with the numbers the FLOP count and memory model gave before they read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework import catalogue
from framework.catalogue import DTYPE_BYTES, FAMILIES, OBJECTIVES, PRECISIONS, STRATEGIES
from framework.distributed.config import PrecisionConfig, StrategyConfig
from framework.distributed.precision import strategy_option
from framework.commands.generate import GENERATION_MODES
from framework.models import PRESETS, ModelConfig, build_model
from framework.models.registry import REGISTRY, block_lists, family
from framework.scaling.flops import forward_flops
from framework.scaling.memory import activation_bytes, estimate_memory, largest_layer_params, linear_params

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = {"decoder": "tiny", "encoder": "bert-tiny", "encoder_decoder": "t5-tiny"}


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


@pytest.mark.parametrize("group, entries", [("strategy", STRATEGIES), ("precision", PRECISIONS),
                                            ("objective", OBJECTIVES)])
def test_every_conf_option_has_a_catalogue_entry_and_back(group, entries):
    assert _options(group) == set(entries), f"conf/{group}/*.yaml and framework/catalogue.py disagree"


@pytest.mark.parametrize("option", sorted(STRATEGIES))
def test_strategy_files_select_what_the_catalogue_says(option):
    spec = STRATEGIES[option]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StrategyConfig),
                                              OmegaConf.load(CONF / "strategy" / f"{option}.yaml")))
    assert cfg.name == spec.name and strategy_option(cfg) == option
    if spec.name == "deepspeed":
        assert cfg.zero_stage == spec.zero_stage
        assert (cfg.offload_optimizer or cfg.offload_parameters) == bool(spec.offload)
        assert cfg.offload_parameters == (spec.offload == "params")
    if spec.name == "fsdp":
        assert cfg.fsdp_sharding == spec.fsdp_sharding


@pytest.mark.parametrize("option", sorted(PRECISIONS))
def test_precision_files_select_the_catalogue_mode(option):
    cfg = OmegaConf.merge(OmegaConf.structured(PrecisionConfig), OmegaConf.load(CONF / "precision" / f"{option}.yaml"))
    assert cfg.mode == PRECISIONS[option].mode and catalogue.precision_option(cfg.mode) == option
    assert {PRECISIONS[option].master, PRECISIONS[option].compute} <= set(DTYPE_BYTES)


def test_every_family_is_registered_and_every_objective_trains_one():
    assert set(REGISTRY) == set(FAMILIES)
    assert all(REGISTRY[name].traits is FAMILIES[name] for name in FAMILIES)
    from framework.objectives import PretrainModule, objective_class

    for objective in OBJECTIVES.values():
        assert objective.family in FAMILIES, objective.name
        assert PRESETS[objective.default_model]["family"] == objective.family, objective.name
        module = objective_class(objective.name)
        assert issubclass(module, PretrainModule) and objective.lightning_module.endswith(f":{module.__name__}")
    assert {spec.generates for spec in FAMILIES.values()} <= set(GENERATION_MODES)
    assert set(TINY) == set(FAMILIES)  # a tiny preset per family for the tests below
    with pytest.raises(ValueError, match="no model is registered for family 'mamba'"):
        family("mamba")


def _generic_block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every ModuleList whose items all own parameters: what a registration's block lists must cover."""
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
            and all(any(True for _ in item.parameters()) for item in m)]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_builds_a_tiny_model_whose_forward_runs(name):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(TINY[name], vocab_size=300)
    reg = family(name)
    model = build_model(cfg)
    assert type(model) is reg.model_class and cfg.position == reg.traits.position
    ids = torch.randint(0, 300, (2, 16))
    logits = model(ids, ids[:, :8]) if reg.traits.has_decoder_stack else model(ids)
    assert logits.shape == (2, 8 if reg.traits.has_decoder_stack else 16, cfg.padded_vocab_size)
    assert torch.isfinite(logits).all()
    # the registration names every stack of repeated blocks, in forward order
    found = block_lists(model)
    assert [id(x) for x in found] == [id(x) for x in _generic_block_lists(model)]
    assert sum(len(x) for x in found) == cfg.n_layers + cfg.n_decoder_layers
    # the HF export maps every weight of the model once (tied head: the embedding only)
    names = reg.export.weight_names(cfg)
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert set(names.values()) == expected and len(names) == len(set(names.values()))


def test_a_model_class_refuses_a_config_of_another_family():
    encoder_class = family("encoder").model_class
    with pytest.raises(ValueError, match=r"cannot build a model.family='decoder' config"):
        encoder_class(ModelConfig.from_name("tiny", vocab_size=300))


# (preset, target_len, parameters, training FLOPs at b=2 s=64, activation bytes (bf16 / auto; bf16 / fsdp with
# checkpointing; fp32, masked LM head on 10 rows), linear parameters, largest layer, fsdp_hybrid bf16 total on 16
# GPUs at micro-batch 2) from the code before it read the catalogue (commit 05dc7a3), vocabulary 32000
BEFORE = [
    ("tiny", None, 2154816, 1667235840, (17424896, 16881152, 17932800), 2154496, 2048000, 29746304),
    ("bert-tiny", None, 2154816, 1667235840, (17424896, 16881152, 4080448), 2154496, 2048000, 29746304),
    ("t5-tiny", 16, 4293632, 504102912, (5510528, 4764416, 6026624), 2244608, 2048000, 21974400),
    ("gpt2-small", None, 109529856, 85010153472, (82729472, 23995904, 115169792), 109510656, 24576000, 388100096),
    ("bert-base", None, 109529856, 85010153472, (82729472, 23995904, 101013312), 109510656, 24576000, 388100096),
    ("t5-base", 128, 247381248, 272394878976, (280492544, 59433472, 395901440), 222756864, 24576000, 827257856),
]


@pytest.mark.parametrize("preset, target_len, params, flops, acts, linear, largest, hybrid", BEFORE,
                         ids=[row[0] for row in BEFORE])
def test_flop_and_memory_terms_per_family_are_unchanged(preset, target_len, params, flops, acts, linear, largest,
                                                        hybrid):
    c = ModelConfig.from_name(preset, vocab_size=32000)
    head_rows = 10 if FAMILIES[c.family].generates == "masks" else None
    assert c.num_parameters() == params
    assert forward_flops(c, 2, 64, target_len).training == flops
    assert (activation_bytes(c, 2, 64, "bf16", target_len=target_len),
            activation_bytes(c, 2, 64, "bf16", strategy="fsdp", checkpointing=True, target_len=target_len),
            activation_bytes(c, 2, 64, "fp32", target_len=target_len, head_rows=head_rows)) == acts
    assert (linear_params(c), largest_layer_params(c)) == (linear, largest)
    assert int(estimate_memory(c, params, "fsdp_hybrid", "bf16", 16, 2, 64, target_len=target_len).total) == hybrid
