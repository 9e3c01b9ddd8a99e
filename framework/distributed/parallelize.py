"""Apply parallelism to a plain model from outside: activation checkpointing, torch.compile and FSDP2, per block.

The torchtitan recipe (``parallelize_llama``): for every transformer block, first activation checkpointing,
then ``torch.compile``, then ``fully_shard``; finally ``fully_shard`` the root so the embedding, final norm and
head form one more unit. The blocks are the lists each family's registration names
(``framework.models.registry``: ``Decoder.blocks``, ``Encoder.blocks``, ``EncoderDecoder.encoder_blocks`` /
``decoder_blocks``).

Both per-block options keep parameter names unchanged (no wrapper module, no ``_orig_mod.`` or
``_checkpoint_wrapped_module.`` prefix), so a checkpoint's state_dict keys are the same under every strategy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from framework.distributed.config import StrategyConfig
from framework.models.registry import block_lists

_PARALLELIZED = "_framework_parallelized"  # set on a model once parallelize() ran (Lightning calls hooks again)


def blocks(model: nn.Module) -> list[nn.Module]:
    return [block for blocks_ in block_lists(model) for block in blocks_]


def apply_activation_checkpointing(block: nn.Module) -> None:
    """Recompute ``block``'s activations during backward instead of storing them (Chen et al. 2016,
    "Training Deep Nets with Sublinear Memory Cost"): saves ~all of a block's activation memory for ~1/3 more
    compute. Non-reentrant ``torch.utils.checkpoint``, applied by rebinding the instance's ``forward``."""
    if getattr(block, "_framework_checkpointed", False):
        return
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward
    block._framework_checkpointed = True


def apply_compile(block: nn.Module) -> None:
    """``torch.compile`` the block in place (``nn.Module.compile``: no wrapper, parameter names unchanged)."""
    block.compile()


def fsdp_mesh(cfg: StrategyConfig, world_size: int, devices_per_node: int, device_type: str):
    """The DeviceMesh ``fully_shard`` shards over: 1-D over all ranks, or for hybrid sharding 2-D
    (replicate, shard) with ``hybrid_shard_size`` ranks (default: one node) per sharding group."""
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.fsdp_sharding != "hybrid":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    shard = cfg.hybrid_shard_size or devices_per_node
    if shard <= 0 or world_size % shard:
        raise ValueError(f"strategy.hybrid_shard_size={shard} does not divide the {world_size} ranks; "
                         "set it to a divisor of trainer.devices x trainer.num_nodes (0 = one node's devices).")
    return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: nn.Module, mesh, sharding: str, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): each block is one unit (its parameters all-gathered
    just before its forward and backward), then the root holds the rest (embeddings, final norm, head).

    ``shard_grad_op`` keeps each block's gathered parameters from forward to backward
    (``reshard_after_forward=False``), like ZeRO-2: one all-gather per block per step instead of two.
    ``param_dtype`` (bf16-mixed): parameters are all-gathered and used in that dtype while the sharded
    master copy and the gradient reduction stay in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reshard = sharding != "shard_grad_op"
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    block_list = blocks(model)
    for i, block in enumerate(block_list):
        # the last block's parameters are needed again at once by backward: no point resharding them
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard and i < len(block_list) - 1, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)


def parallelize(model: nn.Module, cfg: StrategyConfig, mesh=None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Activation checkpointing, compile and (when ``mesh`` is given) FSDP2 sharding, per block, in that order.
    Runs once per model; later calls return it unchanged."""
    if getattr(model, _PARALLELIZED, False):
        return model
    for block in blocks(model):
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(block)
        if cfg.compile:
            apply_compile(block)
    if mesh is not None:
        apply_fsdp(model, mesh, cfg.fsdp_sharding, param_dtype)
    setattr(model, _PARALLELIZED, True)
    return model


@dataclass
class Parallelizer:
    """What ``PretrainModule.configure_model`` calls: builds the FSDP mesh from the running trainer
    (world size, devices per node, device type) and parallelizes the model. Set by ``framework.run``."""

    cfg: StrategyConfig
    precision: str = "32-true"

    def __call__(self, model: nn.Module, trainer: Any) -> nn.Module:
        if getattr(model, _PARALLELIZED, False):
            return model
        mesh = None
        if self.cfg.name == "fsdp":
            device_type = trainer.strategy.root_device.type
            mesh = fsdp_mesh(self.cfg, trainer.world_size, trainer.num_devices, device_type)
        param_dtype = torch.bfloat16 if (self.cfg.name == "fsdp" and self.precision == "bf16-mixed") else None
        return parallelize(model, self.cfg, mesh, param_dtype)
