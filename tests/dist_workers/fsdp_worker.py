"""FSDP2 sharding variants built by framework.distributed.parallelize, trained next to torch DDP (no Lightning).

Launched by tests/test_fsdp.py under ``torchrun --nproc_per_node=2`` (CPU, gloo). Every variant starts from
the same initial weights, uses the same AdamW + warmup/cosine schedule + global-norm clipping, and sees the
same global batches (rank r takes rows [r*B, (r+1)*B)). Rank 0 writes ``<out>/result.json``: per-step global
mean losses per variant, the parameter values each rank holds, and whether block 0's parameters were
resharded after forward (FSDP2 swaps its sharded DTensors back in) and the mesh each variant used.

    torchrun --standalone --nproc_per_node=2 fsdp_worker.py <out_dir>
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework.distributed.config import StrategyConfig  # noqa: E402
from framework.distributed.parallelize import fsdp_mesh, parallelize  # noqa: E402
from framework.models import ModelConfig, build_model  # noqa: E402
from framework.objectives.base import lr_lambda, param_groups  # noqa: E402

STEPS, MICRO_BATCH, SEQ_LEN, VOCAB, CLIP, LR, WARMUP = 6, 4, 32, 512, 1.0, 2e-3, 2
VARIANTS = {
    "full": StrategyConfig(name="fsdp", fsdp_sharding="full"),
    "shard_grad_op": StrategyConfig(name="fsdp", fsdp_sharding="shard_grad_op"),
    "hybrid": StrategyConfig(name="fsdp", fsdp_sharding="hybrid", hybrid_shard_size=1),  # 2 replicas x 1 shard
    "full_checkpointed": StrategyConfig(name="fsdp", fsdp_sharding="full", activation_checkpointing=True),
}


def make_model():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train(model, forward, batches) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, WARMUP, STEPS, 0.1))
    losses = []
    for tokens in batches:
        loss = loss_fn(forward, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


def main() -> None:
    from torch.distributed.tensor import DTensor

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234)
    # tokens from a 32-token subset: learnable within a few steps, so the losses move
    batches = torch.randint(0, 32, (STEPS, world * MICRO_BATCH, SEQ_LEN + 1), generator=g)
    local = batches[:, rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
    result = {"world_size": world, "losses": {}, "local_numel": {}, "resharded_after_forward": {}, "mesh": {}}

    model = make_model()
    result["total_numel"] = sum(p.numel() for p in model.parameters())
    result["losses"]["ddp"] = train(model, torch.nn.parallel.DistributedDataParallel(model), local)

    for name, cfg in VARIANTS.items():
        model = make_model()
        mesh = fsdp_mesh(cfg, world, world, "cpu")
        parallelize(model, cfg, mesh)
        result["mesh"][name] = list(mesh.mesh_dim_names)
        result["local_numel"][name] = sum(p.to_local().numel() for p in model.parameters())
        loss = loss_fn(model, local[0])  # forward only: are block 0's parameters sharded again?
        result["resharded_after_forward"][name] = isinstance(model.blocks[0].attn.wq.weight, DTensor)
        loss.backward()
        model.zero_grad(set_to_none=True)
        model = make_model()  # train from the initial weights again
        parallelize(model, cfg, mesh)
        result["losses"][name] = train(model, model, local)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    del model, mesh, loss  # the last variant's; shut_down collects them and the earlier ones
    shut_down()


def shut_down() -> None:
    """Free the FSDP models, wait for the other rank, then destroy every process group, before exit.

    Each FSDP2 variant's modules sit in reference cycles (hooks) that hold the device meshes, their gloo
    groups and the async collectives' work objects. Left to the interpreter's exit, they can be freed while
    it is torn down with gloo's worker threads still alive (pytorch#179291 describes the abort that
    follows), the likely cause of a loaded rank aborting with "terminate called without an active
    exception". The barrier keeps a rank from closing its sockets while the other still has collectives
    in flight."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
