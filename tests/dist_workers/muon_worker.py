"""Muon + AdamW (``framework.objectives.optimizers``) under torch DDP and FSDP2 next to one process (no Lightning).

Launched by tests/test_muon.py under ``torchrun --nproc_per_node=2`` (CPU, gloo). Every variant starts from the
same initial weights, uses ``build_optimizer(optim=muon)`` + warmup/cosine schedule + global-norm clipping and
sees the same global batches: the single-process reference (run on every rank) takes all rows, rank r of the
distributed variants rows [r*B, (r+1)*B). Rank 0 writes ``<out>/result.json``: per-step global mean losses and
the largest absolute difference of the final (gathered) weights from the reference, per variant; and, for one
sharded matrix, how far our gathered orthogonalization is from Newton-Schulz of the full matrix (should be 0)
and from Newton-Schulz of each rank's own rows (what a shard-local Muon would do; large).

    torchrun --standalone --nproc_per_node=2 muon_worker.py <out_dir>
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework.distributed.config import StrategyConfig  # noqa: E402
from framework.distributed.parallelize import fsdp_mesh, parallelize  # noqa: E402
from framework.models import ModelConfig, build_model  # noqa: E402
from framework.objectives.config import OptimConfig  # noqa: E402
from framework.objectives.optimizers import (  # noqa: E402
    NS_COEFFICIENTS, build_optimizer, newton_schulz, orthogonalize, split_for_muon)
from framework.objectives.schedules import lr_lambda  # noqa: E402

STEPS, MICRO_BATCH, SEQ_LEN, VOCAB, CLIP, WARMUP = 6, 4, 32, 512, 1.0, 2
OPTIM = OptimConfig(name="muon", lr=3e-3, weight_decay=0.1)
VARIANTS = {"fsdp": StrategyConfig(name="fsdp", fsdp_sharding="full"),
            "fsdp_hybrid": StrategyConfig(name="fsdp", fsdp_sharding="hybrid", hybrid_shard_size=1)}


def make_model():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny", vocab_size=VOCAB))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train(model, forward, batches, distributed: bool) -> list[float]:
    opt = build_optimizer(model, OPTIM, {"cpu"})
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
        if distributed:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(float(mean))
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict, names=None) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in (names or a))


def diffs(model, reference: dict) -> dict:
    """Largest |weight - reference| over Muon's matrices and over AdamW's parameters."""
    hidden, rest = split_for_muon(model)
    weights = full_weights(model)
    return {"muon": max_diff(weights, reference, [n for n, _ in hidden]),
            "adamw": max_diff(weights, reference, [n for n, _ in rest])}


def sharded_orthogonalization(world: int, rank: int) -> dict:
    """A (64, 48) matrix sharded on dim 0: ours vs Newton-Schulz of the full matrix vs of each rank's rows."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = fsdp_mesh(StrategyConfig(name="fsdp"), world, world, "cpu")
    full = torch.randn(64, 48, generator=torch.Generator().manual_seed(7))
    ours = orthogonalize(distribute_tensor(full, mesh, [Shard(0)]), NS_COEFFICIENTS, 5, 1e-7).to_local()
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    reference = newton_schulz(full)[rows]
    local_only = newton_schulz(full[rows])
    return {"vs_full": float((ours.float() - reference.float()).abs().max()),
            "vs_local_only": float((ours.float() - local_only.float()).abs().max())}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234)
    # tokens from a 32-token subset: learnable within a few steps, so the losses move
    batches = torch.randint(0, 32, (STEPS, world * MICRO_BATCH, SEQ_LEN + 1), generator=g)
    local = batches[:, rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
    result = {"losses": {}, "weight_diff": {}, "muon_matrices": {}}

    model = make_model()
    result["losses"]["single"] = train(model, model, batches, distributed=False)
    reference = full_weights(model)
    result["moved"] = diffs(make_model(), reference)  # how far training moved the weights

    model = make_model()
    result["losses"]["ddp"] = train(model, torch.nn.parallel.DistributedDataParallel(model), local, distributed=True)
    result["weight_diff"]["ddp"] = diffs(model, reference)

    for name, cfg in VARIANTS.items():
        model = make_model()
        parallelize(model, cfg, fsdp_mesh(cfg, world, world, "cpu"))
        result["muon_matrices"][name] = len(build_optimizer(model, OPTIM, {"cpu"}).muon.param_groups[0]["params"])
        result["losses"][name] = train(model, model, local, distributed=True)
        result["weight_diff"][name] = diffs(model, reference)
    result["orthogonalize"] = sharded_orthogonalization(world, rank)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
