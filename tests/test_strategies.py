"""Strategy x precision: the refusal matrix, the Lightning strategies and DeepSpeed configs built from the
option files, and the per-block options (activation checkpointing, compile) applied from outside the model."""

from __future__ import annotations

import pytest
import torch

from framework.catalogue import PRECISIONS, STRATEGIES
from framework.config import to_run_config
from framework.distributed.config import StrategyConfig
from framework.distributed.deepspeed_config import deepspeed_config
from framework.distributed.parallelize import block_lists, blocks, parallelize
from framework.distributed.precision import DeviceInfo, check_strategy_precision
from framework.distributed.strategies import build_strategy
from framework.models import ModelConfig, build_model

STRATEGY_OPTIONS = list(STRATEGIES)
PRECISION_OPTIONS = list(PRECISIONS)
CPU = DeviceInfo("cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", bf16_supported=True)
V100 = DeviceInfo("cuda", "Tesla V100-SXM2-32GB", bf16_supported=False)


def expected_refusal(strategy: str, precision: str, device: DeviceInfo) -> str | None:
    """The matrix written out by hand: the one sentence each refused pair must raise, None where it runs."""
    if strategy.startswith("deepspeed") and device.kind == "cpu":
        return (f"strategy={strategy} needs CUDA GPUs (Lightning's DeepSpeed strategy refuses the cpu); "
                "use strategy=ddp or strategy=fsdp on the CPU.")
    if precision == "fp16" and device.kind == "cpu":
        return ("precision=fp16 needs a CUDA GPU (float16 autocast with loss scaling does not run on the cpu, and "
                "Lightning would silently switch to bf16); use precision=bf16 or fp32.")
    if precision.startswith("bf16") and not device.bf16_supported:
        return (f"precision={precision} needs a GPU with bfloat16 support (compute capability 8.0+: A100, H100, ...) "
                f"and {device.name} has none; use precision=fp16 (mixed, with loss scaling) or fp32.")
    if strategy.startswith("fsdp") and precision == "fp16":
        return (f"strategy={strategy} does not support precision=fp16 (Lightning's FSDP2 strategy has no sharded "
                "gradient scaler for float16 loss scaling); use precision=bf16 or bf16_true, or "
                "strategy=deepspeed_zero3 for fp16.")
    return None


@pytest.fixture(scope="module")
def option_configs(compose):
    """(strategy option, precision option) -> (StrategyConfig, Lightning precision string), from conf/."""
    strategies = {s: to_run_config(compose([f"strategy={s}"])).strategy for s in STRATEGY_OPTIONS}
    precisions = {p: to_run_config(compose([f"precision={p}"])).precision.mode for p in PRECISION_OPTIONS}
    return {(s, p): (strategies[s], precisions[p]) for s in STRATEGY_OPTIONS for p in PRECISION_OPTIONS}


@pytest.mark.parametrize("device", [CPU, H100, V100], ids=["cpu", "h100", "v100"])
def test_every_strategy_precision_pair_runs_or_is_refused_with_its_sentence(option_configs, device):
    refused = 0
    for (s, p), (strategy, precision) in option_configs.items():
        expected = expected_refusal(s, p, device)
        if expected is None:
            check_strategy_precision(strategy, precision, device)  # must not raise
            continue
        refused += 1
        with pytest.raises(ValueError) as err:
            check_strategy_precision(strategy, precision, device)
        assert str(err.value) == expected, (s, p)
    # cpu: 5 deepspeed options x 4 + 5 others x fp16; h100: fsdp x fp16; v100: that + 10 x (bf16, bf16_true)
    assert refused == {"cpu": 25, "cuda": 3 if device.bf16_supported else 3 + 20}[device.kind]


@pytest.mark.parametrize("bad, message", [
    (StrategyConfig(name="ddp", offload_optimizer=True),
     "strategy.offload_optimizer/offload_parameters are DeepSpeed options but strategy=ddp; "
     "use strategy=deepspeed_zero2_offload or deepspeed_zero3_offload."),
    (StrategyConfig(name="deepspeed", zero_stage=2, offload_parameters=True),
     "strategy.offload_parameters needs ZeRO stage 3 (stage 2 keeps every parameter on every GPU); "
     "use strategy=deepspeed_zero3_offload or set strategy.offload_parameters=false."),
    (StrategyConfig(name="deepspeed", zero_stage=4),
     "strategy.zero_stage=4 is not a ZeRO stage; use strategy=deepspeed_zero1, deepspeed_zero2 or deepspeed_zero3."),
    (StrategyConfig(name="fsdp", fsdp_sharding="shard_everything"),
     "strategy.fsdp_sharding='shard_everything' is not one of shard_grad_op, hybrid, full; "
     "use strategy=fsdp_shard_grad_op, fsdp_hybrid or fsdp."),
    (StrategyConfig(name="megatron"),
     "strategy.name='megatron' is not one of auto, ddp, deepspeed, fsdp; pick an option from conf/strategy/ "
     "(strategy=ddp, strategy=fsdp, strategy=deepspeed_zero2, ...)."),
])
def test_inconsistent_strategy_fields_are_refused(bad, message):
    with pytest.raises(ValueError) as err:
        check_strategy_precision(bad, "32-true", H100)
    assert str(err.value) == message


def test_training_refuses_before_building_anything(compose, tmp_path):
    from framework.run import build_run

    cfg = to_run_config(compose(["strategy=deepspeed_zero3", "precision=bf16", "data.cache_dir=/nonexistent/cache"]))
    with pytest.raises(ValueError, match=r"^strategy=deepspeed_zero3 needs CUDA GPUs"):
        build_run(cfg, tmp_path)  # raised before data preparation would fail on the missing cache dir
    cfg = to_run_config(compose(["strategy=ddp", "precision=fp16", "data.cache_dir=/nonexistent/cache"]))
    with pytest.raises(ValueError, match=r"^precision=fp16 needs a CUDA GPU"):
        build_run(cfg, tmp_path)


def test_lightning_strategies_built_from_the_options(option_configs):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    assert build_strategy(option_configs["auto", "fp32"][0], "cpu") == "auto"
    ddp = build_strategy(option_configs["ddp", "fp32"][0], "cpu")
    assert isinstance(ddp, DDPStrategy) and ddp.process_group_backend == "gloo"
    for name in ("fsdp", "fsdp_shard_grad_op", "fsdp_hybrid"):
        fsdp = build_strategy(option_configs[name, "bf16"][0], "cpu")
        assert isinstance(fsdp, ModelParallelStrategy) and fsdp._save_distributed_checkpoint
    strategy, precision = option_configs["deepspeed_zero3_offload", "fp16"]
    ds = build_strategy(strategy, "cpu", precision, micro_batch_size=6, accumulate_grad_batches=4, gradient_clip_val=0.5)
    assert isinstance(ds, DeepSpeedStrategy)
    assert "gradient_accumulation_steps" not in ds.config  # Lightning sets it from accumulate_grad_batches
    assert ds.config["zero_optimization"]["stage"] == 3
    assert ds.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds.config["train_micro_batch_size_per_gpu"] == 6 and ds.config["gradient_clipping"] == 0.5


def test_deepspeed_config_precision_and_offload_fields(option_configs):
    s1 = option_configs["deepspeed_zero1", "fp32"][0]
    c = deepspeed_config(s1, "32-true", micro_batch_size=8, accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert c["zero_optimization"]["stage"] == 1 and "fp16" not in c and "bf16" not in c
    assert c["gradient_accumulation_steps"] == 2 and c["train_micro_batch_size_per_gpu"] == 8
    assert "offload_optimizer" not in c["zero_optimization"] and "offload_param" not in c["zero_optimization"]
    fp16 = deepspeed_config(option_configs["deepspeed_zero2", "fp16"][0], "16-mixed", 8)["fp16"]
    # dynamic loss scaling: loss_scale 0 = dynamic, starting at 2**16, halving on overflow
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                    "hysteresis": 2, "min_loss_scale": 1.0}
    for p in ("bf16-mixed", "bf16-true"):
        c = deepspeed_config(option_configs["deepspeed_zero2_offload", "bf16"][0], p, 8)
        assert c["bf16"] == {"enabled": True} and "fp16" not in c
        assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert "offload_param" not in c["zero_optimization"]


# ---------------------------------------------------------------------------------------------- per-block options
def _loss(model, tokens):
    return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())


def test_blocks_are_found_in_every_model_family():
    dec = build_model(ModelConfig.from_name("tiny", vocab_size=512))
    assert block_lists(dec) == [dec.blocks]
    enc_dec = build_model(ModelConfig.from_name("t5-tiny", vocab_size=512))
    found = block_lists(enc_dec)
    assert len(found) == 2 and len(blocks(enc_dec)) == 2 * 2  # encoder and decoder stacks of 2 blocks
    assert all(b not in dec.blocks for b in blocks(enc_dec))


def test_activation_checkpointing_recomputes_and_keeps_losses_gradients_and_names():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=512)
    plain, ckpt = build_model(cfg), build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    parallelize(ckpt, StrategyConfig(name="ddp", activation_checkpointing=True))
    parallelize(ckpt, StrategyConfig(name="ddp", activation_checkpointing=True))  # idempotent (fit, then validate)
    tokens = torch.randint(0, 512, (2, 33))

    def saved_tensors(model) -> tuple[torch.Tensor, int]:
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(model, tokens)
        loss.backward()
        return loss, count[0]

    loss_plain, saved_plain = saved_tensors(plain)
    loss_ckpt, saved_ckpt = saved_tensors(ckpt)
    assert torch.equal(loss_plain, loss_ckpt)
    for (name, p), (name_c, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert name == name_c
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # no wrapper prefixes in checkpoints
    # each checkpointed block keeps only its input instead of ~20 intermediate activations
    assert saved_ckpt < saved_plain - 2 * 10, (saved_ckpt, saved_plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile per block is checked on a GPU (slow on CPU)")
def test_compile_per_block_matches_eager_and_keeps_names():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=512)
    eager, compiled = build_model(cfg).cuda(), build_model(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    parallelize(compiled, StrategyConfig(name="ddp", compile=True, activation_checkpointing=True))
    tokens = torch.randint(0, 512, (2, 33), device="cuda")
    for model in (eager, compiled):
        _loss(model, tokens).backward()
    torch.testing.assert_close(_loss(eager, tokens), _loss(compiled, tokens), rtol=1e-5, atol=1e-5)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert list(eager.state_dict()) == list(compiled.state_dict())
