"""DeepSpeed ZeRO engines built from the framework's generated config, trained on the CPU next to torch DDP.

Launched by tests/test_deepspeed_cpu.py under ``torchrun --nproc_per_node=2`` with ``DS_ACCELERATOR=cpu``
(DeepSpeed's CPU accelerator; its communication backend is gloo when oneCCL is not installed).
Both ranks build the same tiny CausalLM (same seed), the same torch AdamW + warmup/cosine schedule, and
train on the same global batches (rank r takes rows [r*B, (r+1)*B) of each one). Rank 0 writes
``<out>/result.json`` (per-step global mean losses per engine), ``<out>/<name>_weights.pt`` (full
float32 weights after training) and ``<out>/ddp_optimizer.pt``; each engine also saves a DeepSpeed
checkpoint to ``<out>/<name>/`` (tag "checkpoint", as Lightning's DeepSpeedStrategy does).

    torchrun --standalone --nproc_per_node=2 deepspeed_worker.py <out_dir>
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework.data.tokenizer import SpecialIds  # noqa: E402
from framework.distributed.config import StrategyConfig  # noqa: E402
from framework.distributed.deepspeed_config import deepspeed_config  # noqa: E402
from framework.models.config import ModelConfig  # noqa: E402
from framework.objectives.base import lr_lambda, module_kwargs, param_groups  # noqa: E402
from framework.objectives.clm import CausalLM  # noqa: E402
from framework.objectives.config import ObjectiveConfig, OptimConfig  # noqa: E402

STEPS, MICRO_BATCH, SEQ_LEN, VOCAB, CLIP = 6, 4, 32, 512, 1.0
OPTIM = OptimConfig(lr=2e-3, warmup_steps=2)
ENGINES = {  # name -> strategy config (the same fields conf/strategy/deepspeed_*.yaml set)
    "zero1": StrategyConfig(name="deepspeed", zero_stage=1),
    "zero2": StrategyConfig(name="deepspeed", zero_stage=2),
    "zero3": StrategyConfig(name="deepspeed", zero_stage=3),
    "zero2_offload": StrategyConfig(name="deepspeed", zero_stage=2, offload_optimizer=True),
}


def make_module() -> CausalLM:
    torch.manual_seed(0)
    ids = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4, sentinels=tuple(range(5, 105)))
    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB)
    module = CausalLM(**module_kwargs(cfg, OPTIM, ObjectiveConfig(), ids, STEPS))
    module.forward = lambda batch: module.compute_loss(batch)[0]  # engines and DDP call module(batch)
    return module


def make_optimizer(module: CausalLM):
    opt = torch.optim.AdamW(param_groups(module.model, OPTIM.weight_decay), lr=OPTIM.lr, betas=tuple(OPTIM.betas),
                            eps=OPTIM.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, OPTIM.warmup_steps, STEPS, OPTIM.min_lr_ratio))


def global_mean(loss: torch.Tensor) -> float:
    loss = loss.detach().clone().float()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def main() -> None:
    import deepspeed

    out = Path(sys.argv[1])
    deepspeed.init_distributed()  # gloo on DeepSpeed's CPU accelerator (no oneCCL here)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234)
    # tokens from a 32-token subset: learnable within a few steps, so the losses move
    batches = torch.randint(0, 32, (STEPS, world * MICRO_BATCH, SEQ_LEN + 1), generator=g)
    local = batches[:, rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]  # (STEPS, B, T+1)
    result = {"world_size": world, "backend": dist.get_backend(), "losses": {}}

    # reference: torch DDP, the same optimizer, schedule and gradient clipping
    module = make_module()
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    opt, sched = make_optimizer(module)
    losses = []
    for step in range(STEPS):
        loss = ddp(local[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(global_mean(loss))
    result["losses"]["ddp"] = losses
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / "ddp_weights.pt")
        torch.save(opt.state_dict(), out / "ddp_optimizer.pt")

    for name, strategy in ENGINES.items():
        module = make_module()
        opt, sched = make_optimizer(module)
        config = deepspeed_config(strategy, "32-true", MICRO_BATCH, 1, CLIP)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=config)
        losses = []
        for step in range(STEPS):
            loss = engine(local[step])
            engine.backward(loss)
            engine.step()
            losses.append(global_mean(loss))
        result["losses"][name] = losses
        # what Lightning's DeepSpeedStrategy.save_checkpoint writes: engine state + the rest as client_state
        engine.save_checkpoint(str(out / name), tag="checkpoint", client_state={
            "global_step": STEPS, "hyper_parameters": dict(module.hparams), "epoch": 0})
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=strategy.zero_stage == 3):
            weights = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        if rank == 0:
            torch.save(weights, out / f"{name}_weights.pt")
        dist.barrier()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
