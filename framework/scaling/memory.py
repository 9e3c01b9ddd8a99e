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

Activations: the bytes autograd saves for the backward pass of one micro-batch of b sequences of s tokens,
derived from this framework's blocks (``framework/models/layers.py``) and checked against a count of the
tensors autograd really saves (``framework/scaling/saved_tensors.py``, ``tests/test_memory.py``).

Reference point: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
sec. 4.1, eq. 1) count s b h (34 + 5 a s / h) bytes per GPT layer (LayerNorm, 4h GELU MLP, everything in
16-bit); fused attention drops the 5 a s / h score term, leaving 34 s b h. Our blocks differ in ways that
change the constant: RMSNorm computed in float32, SwiGLU (three d_ff-wide tensors), and above all torch
autocast, under which the residual stream stays float32 and every matmul casts its float32 input anew
(autocast caches casts of leaf tensors, i.e. weights, only). Under bf16 autocast a decoder layer saves
34 s b h + 8 s b f (f = d_ff): 55.3 s b h for gpt2-small, 16 s b h of it float32.

Notation: t tokens of one sequence through a sub-layer (s, or the T5 decoder's T), n = b t, h = d_model,
q = n_heads x head_dim (attention width), f = d_ff, a = n_heads. Per precision: r = bytes per element of
the residual stream (4 under autocast and fp32, 2 in pure bf16), c = bytes per element of matmul inputs
and outputs (2 under autocast and pure bf16, 4 in fp32). Term by term, named after the saved tensor:

- RMSNorm(x) = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype): pow and mul save x32, the float32 input
  (under autocast/fp32 the residual itself, in pure bf16 a float copy): 4 n h; the mul by rsqrt saves the
  (B, t, 1) rsqrt: 4 n; the mul by w saves the normalised x: r n h. Per norm: (4 + r) n h + 4 n.
- The norm's output feeds k linears (k = 3: wq, wk, wv; 2: w_gate, w_up; 1: a cross-attention's wq or the
  LM head). Each linear saves its input: under autocast k distinct 16-bit casts, k c n h; otherwise the
  one output, shared, c n h.
- Rotary positions: q and k are rotated in float32 and cast back; the muls save only the cos/sin tables
  (model buffers, not activations); the rotated q, k are what attention saves.
- Fused attention (SDPA flash / memory-efficient kernels, and the CPU flash kernel): q, k, v, the output
  and the float32 logsumexp (B, a, t): c n q (q) + 2 c n_kv q (k, v over the n_kv key tokens, after
  grouped-query heads are repeated) + c n q (output; wo saves a view of the same storage) + 4 a n.
  The math kernel (``fused_attention=False``) instead keeps the score matrices: Korthikanti's 5 a s^2 b
  (scaled by c / 2) per attention is added.
- An additive bias (T5 relative positions, shape (1, a, t, t_kv)) is saved by the kernel: under autocast
  every layer casts it anew, c a t t_kv per layer; otherwise one tensor per stack. The decoder's
  self-attention combines it with the causal mask per layer (masked_fill): c a T^2 + T^2 (bool mask) per
  layer. The bucket ids (int64 (t, t)) are saved once per stack: 8 t^2.
- SwiGLU: silu saves the gate projection, the product saves silu's output and the up projection, w_down
  saves the product: 4 c n f.
- A decoder-only / encoder block (two norms, attention, MLP) therefore saves, per layer:
      (4 + r) 2 n h + 8 n + [3 or 1] c n h + 4 c n q + 4 a n + [2 or 1] c n h + 4 c n f
  (bracketed: autocast / otherwise). bf16-mixed: 16 n h float32 + (18 n h + 8 n f) 16-bit when q = h;
  gpt2-small (f = 2048 = 8h/3): 55.3 s b h, of which 16 float32. fp32: 40 n h + 16 n f.
  pure bf16: 24 n h + 8 n f, of which 8 n h float32 (the norms' float copies).
- T5 decoder block: as above plus cross-attention: norm + wq's input (1 consumer) + q, out over T and
  k, v over the S encoder tokens; under autocast each layer's wk and wv cast the float32 encoder output
  anew: 2 c b S h per layer (otherwise the encoder's final norm output, c b S h, once).
- Loss heads: the final norm over the rows the stack ends with; the LM head's input (c x rows x h: every
  position for causal LM and T5, the N = mask_probability s b selected rows for masked LM, gathered by
  the collator's int64 indices, 8 N bytes, with their labels, 8 N); the float32 log-softmax the cross-entropy keeps: 4 x rows x V
  (Korthikanti sec. 4.1's 4 s b V); token ids and targets in int64 (8 bytes per token).
- Dropout is 0 in every preset (``nn.Dropout(0)`` returns its input and saves nothing).

Activation checkpointing (``framework.distributed.parallelize``, per block, non-reentrant): each block's
input (the residual, r n h per layer) + one block's activations while it is recomputed (Korthikanti
sec. 4.3) + what lies outside the blocks (stack-shared biases, encoder output, loss head).

Autocast's weight copies: under torch autocast (strategies auto/ddp with bf16/fp16) each weight matrix
used by a matmul is cast to 16-bit once per forward and the cast is cached until the forward ends, so
all of them are alive at the end of the forward, with every activation: 2 bytes per linear-layer
parameter, reported as its own line (``MemoryEstimate.weight_copies``). Without checkpointing autograd then
holds them until backward; with it only the LM head's copy is saved (the blocks recast on recomputation).
DeepSpeed and FSDP2 (param_dtype bf16) run the model's weights in 16-bit already: no copies, and the
residual stream is 16-bit (the pure bf16 pattern above).

Not modelled: ``torch.compile``'s partitioner may recompute cheap pointwise ops and save less; the
efficient kernel pads a bias's last dimension to a multiple of 16; transient buffers of the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.catalogue import DTYPE_BYTES, PRECISIONS, STRATEGIES, StrategySpec, family_spec
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


# keys are the ``precision`` config group's option names (conf/precision/*.yaml), facts from the catalogue
PRECISION_STATE_BYTES: dict[str, StateBytes] = {o: StateBytes(*p.state_bytes, p.activation_bytes)
                                                for o, p in PRECISIONS.items()}


def strategy_spec(strategy: str) -> StrategySpec:
    """The catalogue entry of the conf/strategy option ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")
    return STRATEGIES[strategy]


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


@dataclass(frozen=True)
class ActivationDtypes:
    """Bytes per element of what a forward pass saves (see the module docstring)."""

    residual: int  # r: the residual stream between blocks (float32 under autocast)
    compute: int  # c: matmul inputs/outputs and attention tensors
    autocast: bool  # torch autocast: every matmul casts its float32 input anew, weights cast once and cached


# keys are the ``precision`` config group's option names: residual = the master weights' dtype (float32 under
# autocast), compute = the matmuls' dtype
ACTIVATION_DTYPES: dict[str, ActivationDtypes] = {
    o: ActivationDtypes(DTYPE_BYTES[p.master], DTYPE_BYTES[p.compute], p.autocast) for o, p in PRECISIONS.items()}


def activation_dtypes(precision: str, strategy: str = "auto") -> ActivationDtypes:
    """The activation pattern of ``precision`` under ``strategy``: torch autocast for auto/ddp; DeepSpeed and
    FSDP2 (param_dtype bf16) run 16-bit weights, so mixed precision saves what pure bf16 saves."""
    if precision not in ACTIVATION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(ACTIVATION_DTYPES)}.")
    dtypes = ACTIVATION_DTYPES[precision]
    if dtypes.autocast and strategy_spec(strategy).runs_16bit_weights:
        return ActivationDtypes(2, 2, False)
    return dtypes


@dataclass(frozen=True)
class SavedTerm:
    """One line of the activation formula: ``bytes`` saved for backward, ``float32`` or not."""

    name: str
    bytes: float
    float32: bool


def activation_terms(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, *, strategy: str = "auto",
                     checkpointing: bool = False, fused_attention: bool = True, target_len: int | None = None,
                     head_rows: int | None = None) -> list[SavedTerm]:
    """The bytes autograd saves for one micro-batch of ``micro_batch`` sequences of ``seq_len`` tokens, term by
    term (module docstring). ``target_len``: T5's decoder length (default ``seq_len``); ``head_rows``: rows per
    sequence through the LM head (masked LM: the selected positions; default every position)."""
    dt = activation_dtypes(precision, strategy)
    r, c = dt.residual, dt.compute
    b, h, f, a = micro_batch, cfg.d_model, cfg.d_ff, cfg.n_heads
    width = cfg.n_heads * cfg.head_dim  # q: attention width (T5 presets may have q != h)
    terms: list[SavedTerm] = []

    def add(name: str, nbytes: float, float32: bool) -> None:
        terms.append(SavedTerm(name, float(nbytes), float32))

    def norm(n: int) -> list[SavedTerm]:  # RMSNorm over n tokens: float32 input + rsqrt, normalised x
        return [SavedTerm("rmsnorm float32 input + rsqrt", 4 * n * h + 4 * n, True),
                SavedTerm("rmsnorm normalised", r * n * h, r == 4)]

    def consumers(n: int, k: int, rows_h: int | None = None) -> SavedTerm:  # inputs of k linears fed by one norm
        width_in = h if rows_h is None else rows_h
        return SavedTerm(f"linear inputs ({k})", (k if dt.autocast else 1) * c * n * width_in, c == 4)

    def attention(n_q: int, n_kv: int, t_q: int, t_kv: int) -> list[SavedTerm]:  # n_*: tokens, t_*: per sequence
        out = [SavedTerm("attention q, k, v, output", c * width * (2 * n_q + 2 * n_kv), c == 4),
               SavedTerm("attention logsumexp", 4 * a * n_q, True)]
        if not fused_attention:  # Korthikanti eq. 1's score term, 5 a s^2 b in 16-bit
            out.append(SavedTerm("attention scores (math kernel)", c / 2 * 5 * a * t_q * t_kv * b, c == 4))
        return out

    def mlp(n: int) -> list[SavedTerm]:
        return [consumers(n, 2), SavedTerm("swiglu gate, silu, up, product", 4 * c * n * f, c == 4)]

    def block(t: int, bias: bool) -> list[SavedTerm]:  # a self-attention + MLP block over t tokens per sequence
        n = b * t
        out = norm(n) + [consumers(n, 3)] + attention(n, n, t, t) + norm(n) + mlp(n)
        if bias and dt.autocast:  # autocast casts the stack's float32 bias anew in every layer
            out.append(SavedTerm("attention bias (16-bit cast)", c * a * t * t, False))
        return out

    def cross_block(t: int, s: int) -> list[SavedTerm]:  # T5 decoder block: t targets, s encoder tokens
        n, n_s = b * t, b * s
        out = norm(n) + [consumers(n, 3)] + attention(n, n, t, t)
        out += [SavedTerm("causal self-attention bias", c * a * t * t, c == 4), SavedTerm("causal mask", t * t, False)]
        out += norm(n) + [consumers(n, 1)] + attention(n, n_s, t, s)
        if dt.autocast:  # wk and wv cast the float32 encoder output anew in every layer
            out.append(SavedTerm("cross-attention k, v inputs", 2 * c * n_s * h, False))
        return out + norm(n) + mlp(n)

    def total(ts: list[SavedTerm]) -> float:
        return sum(t.bytes for t in ts)

    def layers(stack: list[list[SavedTerm]], t: int) -> None:
        if checkpointing:  # each block's input (the residual) + one block's activations while recomputed
            add("checkpointed block inputs", len(stack) * r * b * t * h, r == 4)
            biggest = max(stack, key=total)
            terms.extend(SavedTerm(f"recomputed block: {x.name}", x.bytes, x.float32) for x in biggest)
        else:
            for layer in stack:
                terms.extend(layer)

    s = seq_len
    traits = family_spec(cfg.family)
    if traits.has_decoder_stack:
        t = target_len or seq_len
        layers([block(s, bias=traits.relative_position_bias)] * cfg.n_layers, s)
        layers([cross_block(t, s)] * cfg.n_decoder_layers, t)
        # once per stack: bucket ids (int64); the bias itself when not cast per layer (or held by checkpointing)
        # (without autocast c = r: the stack's tensors are saved as they are, in the residual dtype)
        add("relative position bucket ids (int64)", 8 * (s * s + t * t), False)
        if not dt.autocast or checkpointing:  # one bias per stack (checkpointing: an input of every block)
            add("encoder attention bias", r * a * s * s, r == 4)
        if checkpointing:
            add("decoder attention bias", r * a * t * t, r == 4)
        terms.extend(norm(b * s))  # encoder's final norm
        if not dt.autocast or checkpointing:  # the encoder output, shared by every decoder layer's wk, wv
            add("encoder output", r * b * s * h, r == 4)
        rows = b * t
        terms.extend(norm(rows))
        terms.append(consumers(rows, 1))
        add("token ids and targets (int64)", 8 * (b * s + 2 * b * t), False)
    else:
        layers([block(s, bias=traits.relative_position_bias)] * cfg.n_layers, s)
        terms.extend(norm(b * s))  # final norm over every position
        if head_rows is None:
            rows = b * s
            add("token ids and targets (int64)", 16 * b * s, False)
        else:  # masked LM: only the selected rows go through the head, gathered by int64 indices
            rows = b * head_rows
            add("token ids, selected positions and their labels (int64)", 8 * b * s + 16 * rows, False)
        terms.append(consumers(rows, 1))
    add("float32 log-softmax of the logits", 4 * rows * cfg.padded_vocab_size, True)
    return terms


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, **kwargs) -> float:
    """Bytes autograd keeps for the backward pass of one micro-batch: the sum of ``activation_terms``."""
    return sum(t.bytes for t in activation_terms(cfg, micro_batch, seq_len, precision, **kwargs))


def korthikanti_activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, *, bytes_per_element: int = 2,
                                 target_len: int | None = None) -> float:
    """The reference point (the planner's formula until 2026-11): Korthikanti et al. 2022 eq. 1 with fused
    attention, 34 s b h bytes per 16-bit GPT layer (+ 11 s b h for a T5 decoder layer's cross-attention),
    scaled by ``bytes_per_element`` / 2, plus the float32 logits 4 s b V (sec. 4.1)."""
    b, h, s = micro_batch, cfg.d_model, seq_len
    per_layer = bytes_per_element / 2 * 34 * s * b * h
    if family_spec(cfg.family).has_decoder_stack:
        t = target_len or seq_len
        decoder = bytes_per_element / 2 * 45 * t * b * h
        return cfg.n_layers * per_layer + cfg.n_decoder_layers * decoder + 4 * t * b * cfg.padded_vocab_size
    return cfg.n_layers * per_layer + 4 * s * b * cfg.padded_vocab_size


def linear_params(cfg: ModelConfig) -> int:
    """Parameters of the matmul weights (every linear layer and the LM head): what autocast casts to 16-bit."""
    d, q = cfg.d_model, cfg.n_heads * cfg.head_dim
    attn = 2 * d * q + 2 * d * cfg.n_kv_heads * cfg.head_dim
    mlp = 3 * d * cfg.d_ff
    n = cfg.n_layers * (attn + mlp) + cfg.padded_vocab_size * d
    if family_spec(cfg.family).has_decoder_stack:
        n += cfg.n_decoder_layers * (2 * attn + mlp)
    return n


def weight_copy_bytes(cfg: ModelConfig, precision: str, strategy: str = "auto") -> float:
    """Autocast's cached 16-bit weight copies, held from forward to backward: 2 bytes per matmul parameter."""
    return 2.0 * linear_params(cfg) if activation_dtypes(precision, strategy).autocast else 0.0


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
    weight_copies: float = 0.0  # autocast's 16-bit weight copies, held from forward to backward

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers + self.weight_copies

    def fits(self, capacity_bytes: float, usable_fraction: float = 0.9) -> bool:
        """Fits when the total is below ``usable_fraction`` of the device (CUDA context, allocator
        fragmentation and temporary buffers take the rest)."""
        return self.total <= usable_fraction * capacity_bytes

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy, "precision": self.precision, "n_gpus": self.n_gpus,
            "micro_batch": self.micro_batch, "checkpointing": self.checkpointing,
            "weights_gb": self.weights / GB, "gradients_gb": self.gradients / GB, "optimizer_gb": self.optimizer / GB,
            "activations_gb": self.activations / GB, "buffers_gb": self.buffers / GB,
            "weight_copies_gb": self.weight_copies / GB, "total_gb": self.total / GB,
            "cpu_gb": self.cpu / GB,
        }


def largest_layer_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + 2 * d * cfg.n_kv_heads * hd
    block = attn + 3 * d * cfg.d_ff + 2 * d
    if family_spec(cfg.family).has_decoder_stack:
        block += attn + d  # cross-attention and its norm
    return max(block, cfg.padded_vocab_size * d)


def estimate_memory(cfg: ModelConfig, n_params: int, strategy: str, precision: str, n_gpus: int, micro_batch: int,
                    seq_len: int, *, gpus_per_node: int = 8, checkpointing: bool = False, target_len: int | None = None,
                    fused_attention: bool = True, head_rows: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of training ``cfg`` (``n_params`` parameters) with ``strategy`` and ``precision`` on
    ``n_gpus`` GPUs, micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens (``head_rows``: LM-head
    rows per sequence, masked LM's selected positions; default every position)."""
    spec = strategy_spec(strategy)
    if precision not in PRECISION_STATE_BYTES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISION_STATE_BYTES)}.")
    state = PRECISION_STATE_BYTES[precision]
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
    acts = activation_bytes(cfg, micro_batch, seq_len, precision, strategy=strategy, checkpointing=checkpointing,
                            fused_attention=fused_attention, target_len=target_len, head_rows=head_rows)
    return MemoryEstimate(strategy, precision, n_gpus, states["weights"], states["gradients"], states["optimizer"],
                          acts, buffers, cpu, checkpointing, micro_batch, notes,
                          weight_copy_bytes(cfg, precision, strategy))
