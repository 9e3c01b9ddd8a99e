"""optim=muon: Muon for the blocks' 2-D matrices and AdamW for the rest (framework/objectives/optimizers.py).

Which parameters go where (all three families), the update against torch.optim.Muon and Newton-Schulz's
defining property, the combined optimizer's schedule and state_dict, the DeepSpeed refusal, 2-process DDP and
FSDP2 against one process with the same global batch, and exact resume (single file and FSDP2 shards).

Tolerances of the distributed checks: Newton-Schulz runs in bfloat16 (as in torch.optim.Muon), so the
float32 reduction-order differences of a 2-rank gradient (~1e-7) flip bf16 roundings: after 6 steps of the
tiny model, Muon's matrices differ from the single process by <= 1e-3 (4.4e-4 measured, exactly what one process
gets by accumulating the same batch in two halves), out of ~1e-2 moved; losses by <= 2e-4 nats (6e-5 measured).
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from framework.distributed.config import StrategyConfig
from framework.models import ModelConfig, build_model
from framework.objectives.config import OptimConfig, check_optim
from framework.objectives.optimizers import Muon, MuonWithAdamW, build_optimizer, newton_schulz, split_for_muon
from framework.objectives.schedules import lr_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_workers.launch import torchrun, train  # noqa: E402

MATRICES = r"(attn|cross_attn)\.(wq|wk|wv|wo)\.weight|mlp\.(w_gate|w_up|w_down)\.weight"


# ---------------------------------------------------------------------------------------------- who gets Muon
@pytest.mark.parametrize("preset, blocks, adamw", [
    ("tiny", ["blocks"], {"embed.weight", "norm_final.weight"}),  # lm_head tied to embed: one parameter
    ("bert-tiny", ["blocks"], {"embed.weight", "norm_final.weight"}),
    ("t5-tiny", ["encoder_blocks", "decoder_blocks"],  # untied head; relative-position tables are embeddings
     {"embed.weight", "lm_head.weight", "encoder_norm.weight", "decoder_norm.weight",
      "encoder_position_bias.embedding.weight", "decoder_position_bias.embedding.weight"}),
])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(preset, blocks, adamw):
    model = build_model(ModelConfig.from_name(preset, vocab_size=512))
    hidden, rest = split_for_muon(model)
    block = rf"({'|'.join(blocks)})\.\d+\."
    assert all(re.fullmatch(block + f"({MATRICES})", n) for n, _ in hidden)
    # 7 matrices per block (4 attention + 3 SwiGLU), 4 more per T5 decoder block (cross-attention)
    per_block = {"blocks": 7, "encoder_blocks": 7, "decoder_blocks": 11}
    assert len(hidden) == sum(per_block[b] * 2 for b in blocks) and all(p.ndim == 2 for _, p in hidden)
    norms = {n for n, _ in rest if re.fullmatch(block + r"norm_\w+\.weight", n)}
    assert {n for n, _ in rest} - norms == adamw and all(p.ndim == 1 for n, p in rest if n in norms)
    every = {id(p) for p in model.parameters()}
    assert {id(p) for _, p in hidden + rest} == every and len(hidden) + len(rest) == len(every)


def test_an_untied_head_goes_to_adamw():
    model = build_model(ModelConfig.from_name("tiny", vocab_size=512, tie_embeddings=False))
    hidden, rest = split_for_muon(model)
    assert "lm_head.weight" in dict(rest) and "lm_head.weight" not in dict(hidden)


# ---------------------------------------------------------------------------------------------- the update
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
@pytest.mark.parametrize("adjust_lr_fn, nesterov", [("match_rms_adamw", True), ("original", False)])
def test_muon_step_equals_torch_optim_muon(shape, adjust_lr_fn, nesterov):
    """Three steps on a plain matrix: bitwise torch.optim.Muon (our step is rewritten for DTensors)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_ref = Muon([ours], **kwargs), torch.optim.Muon([ref], **kwargs)
    for _ in range(3):
        grad = torch.randn(shape, generator=g)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_ref.step()
    assert torch.equal(ours, ref) and not torch.equal(ours, w)


def test_one_muon_step_by_hand():
    """With momentum 0 the update is g itself (the lerps are exact):
    w1 = w0 (1 - lr wd) - lr 0.2 sqrt(max(A, B)) NS(g) (Liu et al. 2025's match_rms_adamw) and
    w1 = w0 (1 - lr wd) - lr sqrt(max(1, A / B)) NS(g) (Jordan et al.'s original)."""
    g = torch.Generator().manual_seed(1)
    w0, grad = torch.randn(48, 16, generator=g), torch.randn(48, 16, generator=g)
    for adjust_lr_fn, scale in [("match_rms_adamw", 0.2 * 48 ** 0.5), ("original", 3 ** 0.5)]:
        p = torch.nn.Parameter(w0.clone())
        p.grad = grad
        Muon([p], lr=0.01, weight_decay=0.1, momentum=0.0, adjust_lr_fn=adjust_lr_fn).step()
        expected = w0 * (1 - 0.01 * 0.1) - 0.01 * scale * newton_schulz(grad).float()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_newton_schulz_orthogonalizes():
    """G = U S V^T with singular values spread 25x: NS(G) ~ U S' V^T with S' in Jordan et al.'s ~(0.5, 1.5),
    i.e. the same singular vectors and a flat spectrum."""
    g = torch.Generator().manual_seed(2)
    for rows, cols in [(64, 32), (32, 96)]:
        k = min(rows, cols)
        u = torch.linalg.qr(torch.randn(rows, k, generator=g))[0]  # (rows, k), orthonormal columns
        v = torch.linalg.qr(torch.randn(cols, k, generator=g))[0]  # (cols, k)
        ortho = newton_schulz(u @ torch.diag(torch.logspace(0, 1.4, k)) @ v.T).float()
        core = u.T @ ortho @ v  # (k, k): diagonal S' if NS kept G's singular vectors
        assert (core - torch.diag(torch.diagonal(core))).abs().max() < 0.03
        spectrum = torch.linalg.svdvals(ortho)
        assert spectrum.min() > 0.5 and spectrum.max() < 1.5


# ---------------------------------------------------------------------------------------------- combined optimizer
def _tiny_muon(seed: int = 0) -> tuple[torch.nn.Module, MuonWithAdamW]:
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_name("tiny", vocab_size=512))
    return model, build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=2e-3), {"cpu"})


def _step(model, opt, seed: int) -> None:
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(seed))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_one_schedule_drives_both_and_the_state_dict_round_trips():
    model, opt = _tiny_muon()
    assert isinstance(opt, torch.optim.Optimizer) and opt.muon.param_groups[0] is opt.param_groups[2]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 5, 14]  # AdamW decay, AdamW no-decay, Muon
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 2, 10, 0.1))
    for step in range(3):
        _step(model, opt, step)
        sched.step()
    factor = lr_lambda(3, 2, 10, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor] * 2 + [2e-3 * factor])
    buffer = io.BytesIO()  # through bytes, as a checkpoint: state_dict() holds the live tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and set(saved["state"][6]) == {"momentum_buffer"}

    resumed_model, resumed = _tiny_muon(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert resumed.adamw.state is resumed.state and resumed.muon.param_groups[0] is resumed.param_groups[2]
    _step(model, opt, 99)
    _step(resumed_model, resumed, 99)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- bad input
def test_muon_under_deepspeed_is_refused_in_one_sentence():
    with pytest.raises(ValueError) as err:
        check_optim(OptimConfig(name="muon"), 100, StrategyConfig(name="deepspeed", zero_stage=3))
    assert str(err.value) == (
        "optim=muon cannot run under strategy=deepspeed_zero3: DeepSpeed's ZeRO optimizers flatten and partition "
        "the parameters, so Muon's Newton-Schulz step never sees a whole matrix; use strategy=fsdp or strategy=ddp "
        "with optim=muon, or optim=adamw with DeepSpeed.")
    check_optim(OptimConfig(name="adamw"), 100, StrategyConfig(name="deepspeed", zero_stage=3))
    for name in ("auto", "ddp", "fsdp"):
        check_optim(OptimConfig(name="muon"), 100, StrategyConfig(name=name))
    with pytest.raises(ValueError, match=r"^optim.name='lion' is not one of adamw, muon"):
        check_optim(OptimConfig(name="lion"), 100)
    with pytest.raises(ValueError, match=r"^optim.muon_adjust_lr='spectral' is not one of"):
        check_optim(OptimConfig(name="muon", muon_adjust_lr="spectral"), 100)


def test_training_refuses_muon_with_deepspeed_before_any_data(compose, tmp_path):
    """``run`` raises ConfigurationError (fw-train prints it as one line, exit status 2: tests/test_configs.py)
    before data preparation would fail on the missing cache directory."""
    from framework.config import to_run_config
    from framework.run import ConfigurationError, run

    overrides = ["optim=muon", "strategy=deepspeed_zero2_offload", "data.cache_dir=/nonexistent/cache"]
    cfg = to_run_config(compose(overrides))
    with pytest.raises(ConfigurationError, match=r"^optim=muon cannot run under strategy=deepspeed_zero2_offload: "):
        run(cfg, tmp_path)
    assert not Path("/nonexistent/cache").exists() and not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_muon_ddp_and_fsdp2_match_one_process(tmp_path):
    """torch DDP, FSDP2 (full) and HSDP (2 replicas x 1 shard) vs one process, no Lightning."""
    torchrun("muon_worker.py", tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    single = r["losses"]["single"]
    assert single[-1] < single[0] - 0.3  # it trains: the comparison is not between flat lines
    assert r["moved"]["muon"] > 5e-3
    for name in ("ddp", "fsdp", "fsdp_hybrid"):
        assert r["losses"][name] == pytest.approx(single, abs=2e-4), name
        assert r["weight_diff"][name]["muon"] <= 1e-3 and r["weight_diff"][name]["adamw"] <= 1e-4, name
    assert r["muon_matrices"] == {"fsdp": 14, "fsdp_hybrid": 14}  # split by name also on sharded DTensors
    # a sharded matrix is orthogonalized whole: exactly NS(full)'s rows, far from NS of a rank's own rows
    assert r["orthogonalize"]["vs_full"] == 0.0 and r["orthogonalize"]["vs_local_only"] > 0.1


@pytest.fixture(scope="module")
def muon_runs(tiny_prepared, data_cache, tmp_path_factory) -> dict:
    """Lightning runs with optim=muon (6 steps, checkpoints at 3): one process (micro-batch 8), FSDP2 (2 x 4)."""
    common = [f"data.cache_dir={data_cache}", "optim=muon"]
    single = train(tmp_path_factory.mktemp("muon_single"), common + ["data.micro_batch_size=8", "strategy=auto"])
    fsdp = train(tmp_path_factory.mktemp("muon_fsdp"), common + ["data.micro_batch_size=4", "trainer.devices=2",
                                                                   "strategy=fsdp"])
    return {"common": common, "single": single, "fsdp": fsdp}


@pytest.mark.slow
def test_lightning_fsdp2_with_muon_matches_one_process(muon_runs):
    single, fsdp = muon_runs["single"], muon_runs["fsdp"]
    assert fsdp["world_size"] == 2 and fsdp["local_numel"] <= single["local_numel"] // 2 + 64
    assert fsdp["losses"] == pytest.approx(single["losses"], abs=2e-4)
    # (that Muon's steps move the weights as torch.optim.Muon's do is checked bitwise by the unit tests above; six
    # warm-up steps of one micro-batch each are too few for a loss drop that does not depend on the data order)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["single", "fsdp"])
def test_muon_resumes_exactly(muon_runs, run, tmp_path_factory):
    """From step 3's checkpoint (one file; FSDP2: one shard per rank): the losses of steps 3-5 of the run."""
    full = muon_runs[run]
    ckpt = full["out"] / "run" / "checkpoints" / "step0000003.ckpt"
    assert ckpt.is_file() if run == "single" else ckpt.is_dir()
    extra = ["data.micro_batch_size=8", "strategy=auto"] if run == "single" else \
        ["data.micro_batch_size=4", "trainer.devices=2", "strategy=fsdp"]
    resumed = train(tmp_path_factory.mktemp(f"muon_{run}_resume"), muon_runs["common"] + extra, resume=str(ckpt))
    assert resumed["first_step"] == 3
    assert resumed["losses"] == full["losses"][3:]  # exact: same optimizer state, data position and RNG


@pytest.mark.slow
def test_a_consolidated_fsdp2_muon_checkpoint_loads_into_one_process(muon_runs):
    """fw-consolidate's file holds the combined optimizer in torch's format: full-size momentum buffers that load
    into a single-process MuonWithAdamW and agree with the single-process run's at the same step."""
    from framework.checkpointing.consolidate import consolidate_dcp

    def optimizer_state(ckpt: dict) -> dict:
        hp = ckpt["hyper_parameters"]
        model = build_model(ModelConfig(**hp["model_config"]))
        model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
        opt = build_optimizer(model, OptimConfig(**hp["optim"]), {"cpu"})
        opt.load_state_dict(ckpt["optimizer_states"][0])
        return {name: opt.state[p] for name, p in model.named_parameters()}

    step3 = "run/checkpoints/step0000003.ckpt"
    sharded = optimizer_state(consolidate_dcp(muon_runs["fsdp"]["out"] / step3))
    single = optimizer_state(torch.load(muon_runs["single"]["out"] / step3, map_location="cpu", weights_only=False))
    buffers = [n for n, state in sharded.items() if "momentum_buffer" in state]
    assert len(buffers) == 14 and all(re.fullmatch(r"blocks\.\d+\." + f"({MATRICES})", n) for n in buffers)
    for name, state in sharded.items():
        for key, value in state.items():
            torch.testing.assert_close(value, single[name][key], atol=1e-4, rtol=1e-3, msg=f"{name} {key}")
