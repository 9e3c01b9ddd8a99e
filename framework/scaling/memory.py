"""Memory per GPU of a training run: model states (weights, gradients, optimizer states) and activations.

Model states, Adam, Psi parameters, N_d GPUs sharding them (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", sec. 3.1 and 5, Figure 1):

- fp32 (``32-true``): 4 (weights) + 4 (gradients) + 8 (Adam momentum and variance) = 16 bytes/param;
- mixed precision (``16-mixed`` / ``bf16-mixed``): ZeRO's K = 12: 2 (16-bit weights) + 2 (16-bit
  gradients) + 12 (fp32 master weights, momentum, variance) = 16 bytes/param. (torch autocast, as
  Lightning's DDP/FSDP mixed precision uses it, keeps 4 + 4 + 8 instead: the same 16 bytes in total.)
- pure bf16 (``bf16-true``): 2 + 2 + 4 (momentum and variance in bf16) = 8 bytes/param.

With w, g, o those bytes per parameter, per GPU:
  stage 0 (DDP):             (w + g + o) Psi
  stage 1 (optimizer):       (w + g) Psi + o Psi / N_d
  stage 2 (+ gradients):     w Psi + (g + o) Psi / N_d
  stage 3 (+ weights):       (w + g + o) Psi / N_d
ZeRO's worked example (7.5B parameters, N_d = 64, mixed precision): 120, 31.4, 16.6 and 1.9 GB.
FSDP full-shard ~ stage 3, FSDP shard-grad-op ~ stage 2, FSDP hybrid-shard = stage 3 within a node.
ZeRO-Offload (Ren et al. 2021) keeps the 16-bit weights on the GPU and moves the optimizer states (and
fp32 gradient partitions) to CPU; with parameter offload (ZeRO-Infinity / stage 3 offload) the weights
go to CPU as well and the GPU keeps only the layers being computed.

Activations, per transformer layer and micro-batch of b sequences of s tokens, hidden size h, a heads, in
16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4.1,
eq. 1, no tensor parallelism):  s b h (34 + 5 a s / h) bytes.
The 5 a s / h term is the attention score matrix, its softmax and dropout mask; fused attention kernels
(FlashAttention, PyTorch's SDPA flash / memory-efficient kernels) never store it, which leaves 34 s b h
(the same as the paper's selective recomputation, sec. 4.2). With full activation checkpointing only each
layer's input (2 s b h bytes) is kept, plus one layer's activations while it is recomputed (sec. 4.3).
The output layer keeps the fp32 logits for the cross-entropy: 4 s b V bytes (sec. 4.1). fp32 activations
take twice the 16-bit bytes. The 34 counts a GPT block with a 4h GELU MLP; a SwiGLU MLP of 8h/3 stores
about the same, so the formula is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.models.config import ModelConfig

GB = 1e9  # ZeRO's and the vendors' gigabytes


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter: weights, gradients, optimizer states (Adam)."""

    weights: float
    gradients: float
    optimizer: float
    activation_bytes: int  # bytes per activation element

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


# keys are the ``precision`` config group's option names (conf/precision/*.yaml)
PRECISION_STATE_BYTES: dict[str, StateBytes] = {
    "fp32": StateBytes(4, 4, 8, 4),
    "fp16": StateBytes(2, 2, 12, 2),
    "bf16": StateBytes(2, 2, 12, 2),
    "bf16_true": StateBytes(2, 2, 4, 2),
}
PRECISION_MODES = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed", "bf16_true": "bf16-true"}


@dataclass(frozen=True)
class StrategySpec:
    """How a strategy shards model states. ``zero_stage`` 0 = replicated (DDP); ``shard_within_node``:
    states are sharded over the GPUs of one node only (FSDP hybrid shard); ``offload``: '', 'optimizer'
    (optimizer states and fp32 gradients on CPU) or 'params' (weights too)."""

    name: str
    zero_stage: int
    shard_within_node: bool = False
    offload: str = ""
    description: str = ""


# In order of increasing cost: ZeRO stages 1-2 move as many bytes per step as DDP's all-reduce (2 Psi),
# stage 3 / full sharding 1.5x that (ZeRO sec. 7); offloading adds PCIe traffic and CPU Adam steps.
STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec("auto", 0, description="one device, nothing sharded"),
    StrategySpec("ddp", 0, description="data parallel, everything replicated"),
    StrategySpec("deepspeed_zero1", 1, description="ZeRO stage 1: optimizer states sharded"),
    StrategySpec("deepspeed_zero2", 2, description="ZeRO stage 2: optimizer states and gradients sharded"),
    StrategySpec("fsdp_shard_grad_op", 2, description="FSDP SHARD_GRAD_OP (~ZeRO-2)"),
    StrategySpec("fsdp_hybrid", 3, shard_within_node=True, description="FSDP hybrid: full shard in a node, "
                                                                       "replicated across nodes"),
    StrategySpec("fsdp", 3, description="FSDP full shard (~ZeRO-3)"),
    StrategySpec("deepspeed_zero3", 3, description="ZeRO stage 3: weights sharded too"),
    StrategySpec("deepspeed_zero2_offload", 2, offload="optimizer", description="ZeRO-2 + optimizer on CPU"),
    StrategySpec("deepspeed_zero3_offload", 3, offload="params", description="ZeRO-3 + weights and optimizer on CPU"),
)
STRATEGY_SPECS = {s.name: s for s in STRATEGIES}


def model_state_bytes(n_params: float, stage: int, shards: int, state: StateBytes) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states under ZeRO stage ``stage`` over ``shards`` GPUs."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}.")
    if shards < 1:
        raise ValueError(f"the number of GPUs sharding the states must be >= 1, got {shards}.")
    w, g, o = state.weights * n_params, state.gradients * n_params, state.optimizer * n_params
    return {
        "weights": w / shards if stage >= 3 else w,
        "gradients": g / shards if stage >= 2 else g,
        "optimizer": o / shards if stage >= 1 else o,
    }


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, state: StateBytes, *,
                     checkpointing: bool = False, fused_attention: bool = True, target_len: int | None = None) -> float:
    """Activation bytes kept for the backward pass of one micro-batch (Korthikanti et al. 2022 sec. 4)."""
    scale = state.activation_bytes / 2  # the paper's constants are for 16-bit activations
    h, a, b = cfg.d_model, cfg.n_heads, micro_batch

    def layer(s: int, cross_s: int = 0) -> float:
        per = s * b * h * 34 + (0 if fused_attention else 5 * a * s * s * b)
        if cross_s:  # a decoder layer's cross-attention: the attention part of the 34 (11 s b h) once more
            per += 11 * s * b * h + (0 if fused_attention else 5 * a * s * cross_s * b)
        return per

    if cfg.family == "encoder_decoder":
        t = target_len or seq_len
        layers = [layer(seq_len)] * cfg.n_layers + [layer(t, seq_len)] * cfg.n_decoder_layers
        inputs = [2 * seq_len * b * h] * cfg.n_layers + [2 * t * b * h] * cfg.n_decoder_layers
        logits = 4 * t * b * cfg.padded_vocab_size
    else:
        layers = [layer(seq_len)] * cfg.n_layers
        inputs = [2 * seq_len * b * h] * cfg.n_layers
        logits = 4 * seq_len * b * cfg.padded_vocab_size
    if checkpointing:
        kept = sum(inputs) + max(layers)  # layer inputs + one layer recomputed at a time
    else:
        kept = sum(layers)
    return scale * kept + logits


@dataclass
class MemoryEstimate:
    """Per-GPU bytes for one strategy x precision."""

    strategy: str
    precision: str
    n_gpus: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float  # stage 3: gathered weights of the layer being computed (+ one prefetched)
    cpu: float = 0.0  # per-GPU share of host memory for offloaded states
    checkpointing: bool = False
    micro_batch: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers

    def fits(self, capacity_bytes: float, usable_fraction: float = 0.9) -> bool:
        """Fits when the total is below ``usable_fraction`` of the device (CUDA context, allocator
        fragmentation and temporary buffers take the rest)."""
        return self.total <= usable_fraction * capacity_bytes

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy, "precision": self.precision, "n_gpus": self.n_gpus,
            "micro_batch": self.micro_batch, "checkpointing": self.checkpointing,
            "weights_gb": self.weights / GB, "gradients_gb": self.gradients / GB, "optimizer_gb": self.optimizer / GB,
            "activations_gb": self.activations / GB, "buffers_gb": self.buffers / GB, "total_gb": self.total / GB,
            "cpu_gb": self.cpu / GB,
        }


def largest_layer_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + 2 * d * cfg.n_kv_heads * hd
    block = attn + 3 * d * cfg.d_ff + 2 * d
    if cfg.family == "encoder_decoder":
        block += attn + d  # cross-attention and its norm
    return max(block, cfg.padded_vocab_size * d)


def estimate_memory(cfg: ModelConfig, n_params: int, strategy: str, precision: str, n_gpus: int, micro_batch: int,
                    seq_len: int, *, gpus_per_node: int = 8, checkpointing: bool = False, target_len: int | None = None,
                    fused_attention: bool = True) -> MemoryEstimate:
    """Per-GPU memory of training ``cfg`` (``n_params`` parameters) with ``strategy`` and ``precision`` on
    ``n_gpus`` GPUs, micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens."""
    if strategy not in STRATEGY_SPECS:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGY_SPECS)}.")
    if precision not in PRECISION_STATE_BYTES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISION_STATE_BYTES)}.")
    spec, state = STRATEGY_SPECS[strategy], PRECISION_STATE_BYTES[precision]
    shards = min(n_gpus, gpus_per_node) if spec.shard_within_node else n_gpus
    stage = spec.zero_stage if n_gpus > 1 else 0  # nothing to shard over on one GPU
    states = model_state_bytes(n_params, stage, shards, state)
    cpu = 0.0
    notes: list[str] = []
    if spec.offload and n_gpus >= 1:
        # ZeRO-Offload: fp32 master weights, momentum, variance and fp32 gradient partitions on the host
        cpu += (state.optimizer + 4) * n_params / shards
        states["optimizer"] = 0.0
        states["gradients"] = state.gradients * n_params / shards
        if spec.offload == "params":
            cpu += state.weights * n_params / shards
            states["weights"] = 0.0
        notes.append("offloaded states need host memory: see cpu_gb")
    buffers = 2 * state.weights * largest_layer_params(cfg) if stage == 3 else 0.0
    acts = activation_bytes(cfg, micro_batch, seq_len, state, checkpointing=checkpointing,
                            fused_attention=fused_attention, target_len=target_len)
    return MemoryEstimate(strategy, precision, n_gpus, states["weights"], states["gradients"], states["optimizer"],
                          acts, buffers, cpu, checkpointing, micro_batch, notes)
