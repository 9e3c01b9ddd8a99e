"""From a compute budget to a runnable, compute-optimal experiment.

budget (FLOPs | PF-days | GPU-hours x peak x MFU) -> (N_opt, D_opt) by a scaling law (``laws``) -> the
model shape of the objective's family whose exact parameter count is closest to N_opt -> batch size,
learning rate and steps -> exact training FLOPs (``flops``) -> memory per GPU of every strategy x precision
(``memory``) -> the cheapest strategy that fits the GPUs -> wall-clock time -> ``Plan``.
The shape search lives in ``shapes``. ``write_plan`` turns a Plan into ``conf/experiment/<name>.yaml`` (+ ``.plan.json`` / ``.plan.md``).

Batch size and learning rate follow the compute-based fits of DeepSeek-AI 2024 ("DeepSeek LLM: Scaling
Open-Source Language Models with Longtermism", arXiv:2401.02954, eq. 1):
    B_opt = 0.2920 C^0.3271 tokens,   lr_opt = 0.3118 C^-0.1250      (C in FLOPs)
fitted for their data and model family between about 1e17 and 3e20 FLOPs; outside that range treat them
as starting points.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.catalogue import OBJECTIVES, PRECISIONS, STRATEGIES, family_spec
from framework.models.config import ModelConfig
from framework.objectives.config import ObjectiveConfig
from framework.scaling import flops as flops_mod
from framework.scaling import laws
from framework.scaling.hardware import PRECISION_DTYPE, get_accelerator, peak_flops
from framework.scaling.memory import GB, MemoryEstimate, estimate_memory
from framework.scaling.shapes import BudgetTooSmall, search_shape

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
OBJECTIVE_DEFAULTS = ObjectiveConfig()  # a plan trains with the objectives' default masking and span settings
USABLE_MEMORY_FRACTION = 0.9  # of each GPU's memory; the rest is CUDA context, fragmentation, temporaries


# ----------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    flops: float
    description: str

    @property
    def pf_days(self) -> float:
        return laws.flops_to_pf_days(self.flops)


def positive_number(value: Any, what: str, example: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number such as {example}, got {value!r}.") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{what} must be a positive number such as {example}, got {value!r}.")
    return x


def make_budget(*, flops: Any = None, pf_days: Any = None, gpu_hours: Any = None, gpu: str = "H100",
                mfu: Any = 0.4, precision: str = "bf16") -> Budget:
    """Exactly one of ``flops``, ``pf_days`` or ``gpu_hours`` (GPU-hours on ``gpu`` at model FLOPs
    utilization ``mfu`` with ``precision``'s peak: C = hours x 3600 s x peak FLOP/s x MFU)."""
    given = [k for k, v in (("flops", flops), ("pf_days", pf_days), ("gpu_hours", gpu_hours)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one budget: --flops, --pf-days or --gpu-hours (with --gpu and --mfu).")
    if flops is not None:
        c = positive_number(flops, "--flops", "1e21")
        return Budget(c, f"{c:.4g} FLOPs")
    if pf_days is not None:
        d = positive_number(pf_days, "--pf-days", "10")
        return Budget(laws.pf_days_to_flops(d), f"{d:g} PF/s-days (x 8.64e19 FLOPs)")
    hours = positive_number(gpu_hours, "--gpu-hours", "1000")
    u = positive_number(mfu, "--mfu", "0.4")
    if u > 1:
        raise ValueError(f"--mfu is a fraction of peak between 0 and 1, got {mfu!r}.")
    peak = peak_flops(gpu, _dtype(precision))
    acc = get_accelerator(gpu)
    return Budget(hours * 3600 * peak * u,
                  f"{hours:g} GPU-hours on {acc.name} at MFU {u:g} ({_dtype(precision)} peak {peak / 1e12:.1f} TFLOP/s)")


def _dtype(precision: str) -> str:
    return PRECISION_DTYPE.get(precision, precision)  # conf/precision names fp32, fp16, bf16 are dtypes already


# ------------------------------------------------------------------------------------- sequence lengths
def sequence_lengths(objective: str, seq_len: int) -> tuple[int | None, int | None]:
    """(decoder target length or None, LM-head rows per sequence or None = every position) of ``objective``
    at ``seq_len`` model input tokens, with the objective's default settings.

    span_corruption: T5's ``random_spans_helper`` (568 raw tokens -> 512 inputs, 114 targets at the defaults);
    mlm: the head runs on the mask_probability x seq_len selected positions only. D counts model input
    tokens per sequence (``seq_len``) for every objective, as ``tokens_seen`` does (T5 sec. 3.1.2 counts
    encoder input tokens the same way)."""
    if objective == "span_corruption":
        from framework.data.collators import random_spans_helper

        return random_spans_helper(seq_len, OBJECTIVE_DEFAULTS.noise_density,
                                   OBJECTIVE_DEFAULTS.mean_noise_span_length)[1], None
    if objective == "mlm":
        return None, max(1, round(OBJECTIVE_DEFAULTS.mask_probability * seq_len))
    return None, None


def _plannable_seq_len(req: "PlanRequest", notes: list[str]) -> int:
    """``req.seq_len``, or for span corruption the largest multiple of 128 whose noise spans the tokenizer's
    sentinels can all mark (training refuses more spans than sentinels: 114 at 2048 for 100)."""
    if req.objective != "span_corruption":
        return req.seq_len
    from framework.data.tokenizer import NUM_SENTINELS
    from framework.validate import max_span_corruption_seq_len

    longest = max_span_corruption_seq_len(NUM_SENTINELS, OBJECTIVE_DEFAULTS.noise_density,
                                          OBJECTIVE_DEFAULTS.mean_noise_span_length)
    if req.seq_len <= longest:
        return req.seq_len
    seq_len = max(128, longest // 128 * 128)
    notes.append(f"--seq-len {req.seq_len} lowered to {seq_len}: span corruption of longer windows makes more noise "
                 f"spans than the tokenizer's {NUM_SENTINELS} sentinels (at most seq_len {longest}).")
    return seq_len


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class PlanRequest:
    budget: Budget
    objective: str = "clm"
    law: str = laws.DEFAULT_LAW
    gpu: str = "H100"
    n_gpus: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 0.0  # 0 = the GPU's memory from the hardware table
    mfu: float = 0.4
    precision: str = "bf16"
    seq_len: int = 2048
    vocab_size: int = 32000
    min_steps: int = 100  # halve the batch until the run has at least this many optimizer steps
    max_micro_batch: int = 64
    conf_dir: Path = REPO_CONF  # strategies and precisions the experiment may reference


@dataclass
class Plan:
    request: dict
    budget_flops: float
    budget_pf_days: float
    budget_description: str
    law: str
    equations: list[str]
    n_opt: float
    d_opt: float
    model: dict
    n_params: int
    tokens: int
    tokens_per_param: float
    predicted_loss: float
    predicted_loss_at_opt: float
    flops_6nd: float
    flops_exact: float
    flops_per_step: int
    flops_breakdown_per_step: dict
    seq_len: int
    target_len: int | None
    tokens_per_sequence: int
    global_batch: int
    micro_batch: int
    accumulate_grad_batches: int
    steps: int
    lr: float
    warmup_steps: int
    strategy: str
    activation_checkpointing: bool
    precision: str
    gpu: str
    n_gpus: int
    devices: int
    num_nodes: int
    gpu_memory_gb: float
    chosen_memory: dict
    memory_table: list[dict]
    peak_flops_per_gpu: float
    wall_clock_hours: float
    gpu_hours: float
    notes: list[str] = field(default_factory=list)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def available_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def refusal(strategy: str, precision: str, gpu: str, conf_dir: Path = REPO_CONF) -> str | None:
    """Why the training code would refuse ``strategy`` x ``precision`` on ``gpu`` (its refusal matrix,
    ``framework.distributed.precision``), or None when the pair runs."""
    from omegaconf import OmegaConf

    from framework.distributed.config import StrategyConfig
    from framework.distributed.precision import DeviceInfo, check_strategy_precision

    path = Path(conf_dir) / "strategy" / f"{strategy}.yaml"
    if not path.exists():
        return f"no conf/strategy/{strategy}.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StrategyConfig), OmegaConf.load(path)))
    acc = get_accelerator(gpu)
    try:
        check_strategy_precision(cfg, PRECISIONS[precision].mode, DeviceInfo("cuda", acc.name, "bf16" in acc.peak_flops))
    except ValueError as e:
        return str(e)
    return None


def _supports_checkpointing() -> bool:
    from framework.distributed.config import StrategyConfig

    return "activation_checkpointing" in {f.name for f in dataclasses.fields(StrategyConfig)}


def choose_strategy(cfg: ModelConfig, n_params: int, req: PlanRequest, per_gpu_batch: int, seq_len: int,
                    target_len: int | None, capacity: float, strategies: list[str],
                    head_rows: int | None = None) -> tuple[MemoryEstimate, list[str]]:
    """The first strategy (in order of cost, ``framework.catalogue.STRATEGIES``) and largest power-of-two micro-batch
    dividing ``per_gpu_batch`` that fit; activation checkpointing only when nothing fits without it."""
    tried: list[str] = []
    refused: list[str] = []
    checkpoint_options = [False, True] if _supports_checkpointing() else [False]
    for ckpt in checkpoint_options:
        for spec in STRATEGIES.values():
            if spec.option not in strategies:
                continue
            why = refusal(spec.option, req.precision, req.gpu, req.conf_dir)
            if why:
                refused.append(why)
                continue
            if (req.n_gpus == 1) != (spec.name == "auto") and not spec.offload:
                continue  # one GPU: auto (or offload); several: a distributed strategy
            if spec.shard_within_node and req.n_gpus <= req.gpus_per_node:
                continue  # hybrid sharding is full sharding on one node
            micro = min(per_gpu_batch, req.max_micro_batch)
            while micro >= 1:
                if per_gpu_batch % micro == 0:
                    est = estimate_memory(cfg, n_params, spec.option, req.precision, req.n_gpus, micro, seq_len,
                                          gpus_per_node=req.gpus_per_node, checkpointing=ckpt, target_len=target_len,
                                          head_rows=head_rows)
                    if est.fits(capacity, USABLE_MEMORY_FRACTION):
                        return est, tried
                micro //= 2
            tried.append(spec.option + (" + activation checkpointing" if ckpt else ""))
    if not tried and refused:
        raise ValueError(refused[0])
    raise ValueError(
        f"no strategy fits a {n_params / 1e9:.2f}B-parameter model on {req.n_gpus} x {capacity / GB:.0f} GB GPUs "
        f"(tried {', '.join(tried) or 'none'}; strategies available in conf/strategy: {', '.join(strategies)}); "
        "use more GPUs, a smaller precision, or a smaller budget.")


def make_plan(req: PlanRequest) -> Plan:
    law = laws.get_law(req.law)
    if req.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {req.objective!r}; pick one of: {', '.join(OBJECTIVES)}.")
    if req.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {req.precision!r}; pick one of: {', '.join(PRECISIONS)}.")
    for group, option in (("objective", req.objective), ("precision", req.precision)):
        if option not in available_options(req.conf_dir, group):
            raise ValueError(f"{group}={option} has no conf/{group}/{option}.yaml, so the experiment could not use it.")
    for name, v in (("--gpus", req.n_gpus), ("--gpus-per-node", req.gpus_per_node), ("--seq-len", req.seq_len),
                    ("--vocab-size", req.vocab_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}.")
    if req.n_gpus > req.gpus_per_node and req.n_gpus % req.gpus_per_node:
        raise ValueError(f"--gpus {req.n_gpus} is not a whole number of nodes of {req.gpus_per_node} GPUs; "
                         "make it a multiple of --gpus-per-node.")
    acc = get_accelerator(req.gpu)
    peak = peak_flops(req.gpu, _dtype(req.precision))  # also refuses a precision the GPU lacks (bf16 on V100)
    capacity = (req.gpu_memory_gb or acc.memory_gb) * GB
    family = OBJECTIVES[req.objective].family
    notes: list[str] = []

    c = req.budget.flops
    n_opt, d_opt = law.optimal_allocation(c)
    seq_len = tokens_per_seq = _plannable_seq_len(req, notes)
    try:
        cfg, n_params = search_shape(family, n_opt, req.vocab_size, seq_len)
    except BudgetTooSmall as e:
        c_min = law.budget_for_params(e.n_min)
        raise ValueError(
            f"a budget of {c:.3g} FLOPs is too small: its compute-optimal size N_opt = {n_opt:.3g} parameters is below "
            f"the smallest {family} model ({e.n_min:,} parameters with a {req.vocab_size}-token vocabulary), whose "
            f"compute-optimal budget under {law.name} is {c_min:.3g} FLOPs; raise the budget or lower --vocab-size."
        ) from None

    target_len, head_rows_per_seq = sequence_lengths(req.objective, seq_len)
    # One FLOP count for the budget and the time: D is what the exact per-layer count of the model actually built
    # spends in C (the law's C = 6ND allocates N only), so the plan's time never exceeds a GPU-hours budget.
    flops_per_seq = flops_mod.forward_flops(cfg, 1, seq_len, target_len, head_rows_per_seq).training
    tokens_wanted = c / flops_per_seq * tokens_per_seq
    batch_tokens = 0.2920 * c**0.3271  # DeepSeek LLM eq. 1
    per_gpu = 2 ** max(0, round(math.log2(max(1.0, batch_tokens / tokens_per_seq / req.n_gpus))))
    while per_gpu > 1 and tokens_wanted / (per_gpu * req.n_gpus * tokens_per_seq) < req.min_steps:
        per_gpu //= 2
    global_batch = per_gpu * req.n_gpus
    tokens_per_step = global_batch * tokens_per_seq
    steps = max(1, math.floor(tokens_wanted / tokens_per_step))  # whole steps within the budget
    tokens = steps * tokens_per_step
    if steps < req.min_steps:
        notes.append(f"only {steps} optimizer steps even at 1 sequence per GPU: the budget is tiny for {req.n_gpus} GPUs.")
    lr = 0.3118 * c**-0.1250  # DeepSeek LLM eq. 1
    warmup = max(1, min(2000, steps // 20))

    strategies = [s for s in available_options(req.conf_dir, "strategy") if s in STRATEGIES]
    chosen, _ = choose_strategy(cfg, n_params, req, per_gpu, seq_len, target_len, capacity, strategies,
                                head_rows_per_seq)
    micro = chosen.micro_batch
    table = []
    for option in STRATEGIES:
        for precision in PRECISIONS:
            for ckpt in (False, True):
                est = estimate_memory(cfg, n_params, option, precision, req.n_gpus, micro, seq_len,
                                      gpus_per_node=req.gpus_per_node, checkpointing=ckpt, target_len=target_len,
                                      head_rows=head_rows_per_seq)
                row = est.as_dict()
                row["fits"] = est.fits(capacity, USABLE_MEMORY_FRACTION)
                row["available"] = option in strategies
                row["refused"] = refusal(option, precision, req.gpu, req.conf_dir) if row["available"] else None
                table.append(row)

    head_rows = None if head_rows_per_seq is None else head_rows_per_seq * global_batch
    flops_step = flops_mod.forward_flops(cfg, global_batch, seq_len, target_len, head_rows)
    flops_exact = float(flops_step.training) * steps
    wall_s = flops_exact / (req.n_gpus * peak * req.mfu)
    flops_6nd = laws.FLOPS_PER_PARAM_TOKEN * n_params * tokens
    if abs(flops_exact / flops_6nd - 1) > 0.1:
        why = ("each input token passes through the encoder only, while N counts both stacks"
               if family_spec(family).has_decoder_stack else "attention scores and the LM head are not in 6N")
        notes.append(f"the exact count is {flops_exact / flops_6nd:.2f} x 6ND ({why}); the law allocates N_opt with "
                     "C = 6ND (Hoffmann et al. eq. 4), and D is the tokens the exact count spends in C, so the budget "
                     "and the wall-clock time use the same count.")
    devices = min(req.n_gpus, req.gpus_per_node)
    return Plan(
        request={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(req).items() if k != "budget"},
        budget_flops=c, budget_pf_days=req.budget.pf_days, budget_description=req.budget.description,
        law=law.name, equations=law.equations(), n_opt=n_opt, d_opt=d_opt, model=dataclasses.asdict(cfg),
        n_params=n_params, tokens=tokens, tokens_per_param=tokens / n_params,
        predicted_loss=law.loss(n_params, tokens), predicted_loss_at_opt=law.loss(n_opt, d_opt),
        flops_6nd=flops_6nd, flops_exact=flops_exact, flops_per_step=flops_step.training,
        flops_breakdown_per_step=flops_step.as_dict(), seq_len=seq_len, target_len=target_len,
        tokens_per_sequence=tokens_per_seq, global_batch=global_batch, micro_batch=micro,
        accumulate_grad_batches=per_gpu // micro, steps=steps, lr=lr, warmup_steps=warmup,
        strategy=chosen.strategy, activation_checkpointing=chosen.checkpointing, precision=req.precision,
        gpu=acc.name, n_gpus=req.n_gpus, devices=devices, num_nodes=math.ceil(req.n_gpus / devices),
        gpu_memory_gb=capacity / GB, chosen_memory=chosen.as_dict(), memory_table=table, peak_flops_per_gpu=peak,
        wall_clock_hours=wall_s / 3600, gpu_hours=wall_s * req.n_gpus / 3600, notes=notes,
    )


__all__ = ["Budget", "make_budget", "PlanRequest", "Plan", "make_plan", "sequence_lengths", "choose_strategy"]
