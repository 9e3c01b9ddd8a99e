"""What the framework offers, written once: objectives, model families, strategies, precisions.

Plain data, importable without torch or Lightning, so the planner, the memory model, the FLOP count, the
strategy x precision refusal matrix, export, generation, the config schemas and the tests all read the same
facts. The option names are the file names of the Hydra groups (``conf/strategy/<option>.yaml``,
``conf/precision/<option>.yaml``); ``tests/test_catalogue.py`` fails when a group and this file disagree.

Model classes, parallelization plans and export mappings per family live in ``framework.models.registry``
(they need torch); this module only names the families and their traits.
"""

from __future__ import annotations

from dataclasses import dataclass

PF_DAY_FLOPS = 1e15 * 86_400  # one petaFLOP/s-day = 8.64e19 FLOPs


def pf_days(flops: float) -> float:
    return flops / PF_DAY_FLOPS


# --------------------------------------------------------------------------------------------- model families
@dataclass(frozen=True)
class FamilySpec:
    """Traits of a model family that need no torch: how it attends, how it encodes positions, what it generates,
    which transformers class it exports to. The FLOP count, the memory model, the parameter count, scoring and
    generation read these traits instead of comparing family names."""

    name: str
    causal: bool  # attention: causal (decoder) or bidirectional
    has_decoder_stack: bool  # a separate decoder stack with cross-attention (T5)
    position: str  # "rope" (rotary, Su et al. 2021) or "relative_bias" (T5's bucketed bias, one table per stack)
    generates: str  # "text" (left-to-right continuation), "spans" (fills <extra_id_N>), "masks" (fills <mask>)
    hf_architecture: str  # the transformers class ``framework.export`` writes
    hf_auto_class: str  # the transformers Auto class that loads it
    description: str
    architecture: str  # the blocks, in a sentence (model cards)

    @property
    def relative_position_bias(self) -> bool:
        return self.position == "relative_bias"


FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (
    FamilySpec("decoder", causal=True, has_decoder_stack=False, position="rope", generates="text",
               hf_architecture="LlamaForCausalLM", hf_auto_class="AutoModelForCausalLM",
               description="decoder-only, GPT/Llama-style (causal attention)",
               architecture="decoder-only transformer (GPT/Llama-style): causal self-attention with rotary positions, "
                            "pre-norm RMSNorm, SwiGLU MLP"),
    FamilySpec("encoder", causal=False, has_decoder_stack=False, position="rope", generates="masks",
               hf_architecture="EuroBertForMaskedLM", hf_auto_class="AutoModelForMaskedLM",
               description="encoder-only, BERT-style (bidirectional attention)",
               architecture="encoder-only transformer (BERT-style, modern pre-norm variant): bidirectional "
                            "self-attention with rotary positions, RMSNorm, SwiGLU MLP"),
    FamilySpec("encoder_decoder", causal=False, has_decoder_stack=True, position="relative_bias", generates="spans",
               hf_architecture="T5ForConditionalGeneration", hf_auto_class="AutoModelForSeq2SeqLM",
               description="encoder-decoder, T5 v1.1-style",
               architecture="encoder-decoder transformer (T5 v1.1-style): bidirectional encoder, causal decoder with "
                            "cross-attention, bucketed relative position bias, RMSNorm, SwiGLU MLP"),
)}
POSITIONS = ("rope", "relative_bias")


def family_spec(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {', '.join(FAMILIES)}; pick a preset with "
                         "model=<name> or set model.family to one of those.")
    return FAMILIES[name]


# ------------------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective: the family it trains, the conf/model preset it picks by default, the special-token roles its
    batches need (``framework.data.tokenizer``), a one-line description (model card, plans) and its LightningModule
    (``module:Class`` in ``framework.objectives``, loaded on first use)."""

    name: str
    family: str
    default_model: str
    special_roles: tuple[str, ...]
    description: str
    lightning_module: str


OBJECTIVES: dict[str, ObjectiveSpec] = {o.name: o for o in (
    ObjectiveSpec("clm", "decoder", "small-cpu", ("eos",),
                  "causal language modelling (next-token prediction)", "clm:CausalLM"),
    ObjectiveSpec("mlm", "encoder", "bert-small-cpu", ("eos", "pad", "mask"),
                  "masked language modelling (15% of tokens selected; 80/10/10 mask/random/keep)", "mlm:MaskedLM"),
    ObjectiveSpec("span_corruption", "encoder_decoder", "t5-small-cpu", ("eos", "pad", "sentinels"),
                  "T5 span corruption (sentinel-marked spans reconstructed by the decoder)",
                  "span_corruption:SpanCorruption"),
)}


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


# ------------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class StrategySpec:
    """One ``conf/strategy`` option. ``name`` is ``strategy.name`` (auto | ddp | fsdp | deepspeed);
    ``zero_stage`` says which model states are sharded (0 replicated, 1 optimizer, 2 + gradients, 3 + weights);
    ``shard_within_node``: sharded over one node's GPUs only (FSDP hybrid); ``offload``: '', 'optimizer' or
    'params' (weights too); ``cuda_only``: refused on the CPU; ``runs_16bit_weights``: under mixed precision
    the model's weights are 16-bit (so activations follow the pure-bf16 pattern of ``framework.scaling.memory``);
    ``fp16_loss_scaling``: precision=fp16 can run."""

    option: str
    name: str
    zero_stage: int
    fsdp_sharding: str = ""
    shard_within_node: bool = False
    offload: str = ""
    cuda_only: bool = False
    runs_16bit_weights: bool = False  # mixed precision: 16-bit weights (DeepSpeed; FSDP2's param_dtype), not autocast
    fp16_loss_scaling: bool = True  # has a gradient scaler for float16 (Lightning's FSDP2 has no sharded one)
    description: str = ""


# In order of increasing cost: ZeRO stages 1-2 move as many bytes per step as DDP's all-reduce (2 Psi),
# stage 3 / full sharding 1.5x that (ZeRO sec. 7); offloading adds PCIe traffic and CPU Adam steps.
_DEEPSPEED = dict(cuda_only=True, runs_16bit_weights=True)  # Lightning's DeepSpeed strategy refuses the CPU
_FSDP = dict(runs_16bit_weights=True, fp16_loss_scaling=False)  # FSDP2 with MixedPrecisionPolicy(param_dtype)
STRATEGIES: dict[str, StrategySpec] = {s.option: s for s in (
    StrategySpec("auto", "auto", 0, description="one device, nothing sharded"),
    StrategySpec("ddp", "ddp", 0, description="data parallel, everything replicated"),
    StrategySpec("deepspeed_zero1", "deepspeed", 1, **_DEEPSPEED, description="ZeRO stage 1: optimizer states sharded"),
    StrategySpec("deepspeed_zero2", "deepspeed", 2, **_DEEPSPEED,
                 description="ZeRO stage 2: optimizer states and gradients sharded"),
    StrategySpec("fsdp_shard_grad_op", "fsdp", 2, fsdp_sharding="shard_grad_op", **_FSDP,
                 description="FSDP SHARD_GRAD_OP (~ZeRO-2)"),
    StrategySpec("fsdp_hybrid", "fsdp", 3, fsdp_sharding="hybrid", **_FSDP, shard_within_node=True,
                 description="FSDP hybrid: full shard in a node, replicated across nodes"),
    StrategySpec("fsdp", "fsdp", 3, fsdp_sharding="full", **_FSDP, description="FSDP full shard (~ZeRO-3)"),
    StrategySpec("deepspeed_zero3", "deepspeed", 3, **_DEEPSPEED, description="ZeRO stage 3: weights sharded too"),
    StrategySpec("deepspeed_zero2_offload", "deepspeed", 2, offload="optimizer", **_DEEPSPEED,
                 description="ZeRO-2 + optimizer on CPU"),
    StrategySpec("deepspeed_zero3_offload", "deepspeed", 3, offload="params", **_DEEPSPEED,
                 description="ZeRO-3 + weights and optimizer on CPU"),
)}
STRATEGY_NAMES = tuple(dict.fromkeys(s.name for s in STRATEGIES.values()))  # auto, ddp, deepspeed, fsdp
FSDP_SHARDINGS = tuple(dict.fromkeys(s.fsdp_sharding for s in STRATEGIES.values() if s.fsdp_sharding))
ZERO_STAGES = (1, 2, 3)


def strategy_option(name: str, *, fsdp_sharding: str = "full", zero_stage: int = 2, offload_optimizer: bool = False,
                    offload_parameters: bool = False) -> str:
    """The conf/strategy option that selects these ``strategy.*`` fields (for messages, plans and the memory model)."""
    if name == "fsdp":
        return next((o for o, s in STRATEGIES.items() if s.name == "fsdp" and s.fsdp_sharding == fsdp_sharding), "fsdp")
    if name == "deepspeed":
        offload = "_offload" if (offload_optimizer or offload_parameters) else ""
        return f"deepspeed_zero{zero_stage}{offload}"
    return name


# ------------------------------------------------------------------------------------------------- precisions
@dataclass(frozen=True)
class PrecisionSpec:
    """One ``conf/precision`` option: Lightning's ``mode``, the dtype of the weights the optimizer updates
    (``master``), of the matmuls (``compute``), whether torch autocast runs, whether fp16 loss scaling is needed,
    and bytes per parameter of weights / gradients / Adam states as the memory model counts them (mixed precision:
    a 16-bit weight copy + gradients, and float32 master weights + two moments = 12 bytes)."""

    option: str
    mode: str
    master: str
    compute: str
    autocast: bool
    loss_scaling: bool
    needs_bf16: bool
    state_bytes: tuple[int, int, int]  # weights, gradients, optimizer
    activation_bytes: int


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

PRECISIONS: dict[str, PrecisionSpec] = {p.option: p for p in (
    PrecisionSpec("fp32", "32-true", "float32", "float32", False, False, False, (4, 4, 8), 4),
    PrecisionSpec("fp16", "16-mixed", "float32", "float16", True, True, False, (2, 2, 12), 2),
    PrecisionSpec("bf16", "bf16-mixed", "float32", "bfloat16", True, False, True, (2, 2, 12), 2),
    PrecisionSpec("bf16_true", "bf16-true", "bfloat16", "bfloat16", False, False, True, (2, 2, 4), 2),
)}
PRECISION_MODES = tuple(p.mode for p in PRECISIONS.values())
PRECISION_BY_MODE: dict[str, PrecisionSpec] = {p.mode: p for p in PRECISIONS.values()}


def precision_option(mode: str) -> str:
    """The conf/precision option that selects Lightning's ``mode`` (``bf16-mixed`` -> ``bf16``)."""
    if mode not in PRECISION_BY_MODE:
        raise ValueError(f"precision.mode={mode!r} is not one of {', '.join(PRECISION_MODES)}; "
                         f"pick precision={', '.join(PRECISIONS)}.")
    return PRECISION_BY_MODE[mode].option
