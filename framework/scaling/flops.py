"""Exact matrix-multiply FLOPs of one training step, per model family, layer by layer.

Counting convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses, and Hoffmann et al. 2022
Appendix F / Narayanan et al. 2021 sec. 5.1 use for their FLOP counts):

- a matmul of (m, k) by (k, n) costs 2 m k n FLOPs (one multiply and one add per MAC);
- only matrix multiplies count: norms, rotary positions, SiLU, softmax, the loss and the embedding
  lookup are element-wise or gathers and are left out (they are O(T d), not O(T d^2));
- attention counts the full T x S score matrix (QK^T) and its product with V, causal or not:
  FlopCounterMode and the MFU convention (Chowdhery et al. 2022, PaLM, Appendix B) do the same, even
  though a causal flash kernel skips about half of the blocks;
- training = 3 x forward: the backward pass computes a gradient for each matmul's input and for its
  weight, each as costly as the forward matmul (Kaplan et al. 2020 sec. 2.1).

Shapes follow ``framework.models``: attention projections wq (d -> n_heads*hd), wk and wv
(d -> n_kv_heads*hd, grouped-query when n_kv_heads < n_heads), wo (n_heads*hd -> d); SwiGLU with three
matrices (d -> d_ff twice, d_ff -> d); an LM head (d -> padded vocab) on every output position, or on ``head_rows`` rows in all (the masked LM
runs its head on the selected positions only).

    training_flops_per_step(cfg, batch_size, seq_len, target_len=None, head_rows=None) -> FLOPs of one
    training step on ``batch_size`` sequences; for ``encoder_decoder`` ``seq_len`` is the encoder (input)
    length and ``target_len`` the decoder (target) length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from framework.catalogue import family_spec
from framework.models.config import ModelConfig

TRAINING_FORWARD_MULTIPLIER = 3  # forward + backward (grad wrt inputs and wrt weights)


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward-pass FLOPs of one batch, by kind of matmul."""

    attention_projections: int  # wq, wk, wv, wo (self- and cross-attention)
    attention_scores: int  # QK^T and (softmax) x V
    mlp: int  # SwiGLU gate, up, down
    lm_head: int  # d -> vocab logits

    @property
    def forward(self) -> int:
        return self.attention_projections + self.attention_scores + self.mlp + self.lm_head

    @property
    def training(self) -> int:
        return TRAINING_FORWARD_MULTIPLIER * self.forward

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward": self.forward, "training": self.training}


def _attention(cfg: ModelConfig, q_tokens: int, kv_tokens: int) -> tuple[int, int]:
    """(projection, score) forward FLOPs of one attention layer for one sequence: q_tokens queries
    attending over kv_tokens keys/values (self-attention: q_tokens == kv_tokens)."""
    d, hd, nh, nkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    projections = 2 * q_tokens * d * nh * hd  # wq: (T, d) @ (d, nh*hd)
    projections += 2 * 2 * kv_tokens * d * nkv * hd  # wk, wv: (S, d) @ (d, nkv*hd)
    projections += 2 * q_tokens * nh * hd * d  # wo: (T, nh*hd) @ (nh*hd, d)
    scores = 2 * nh * q_tokens * kv_tokens * hd  # QK^T: per head (T, hd) @ (hd, S)
    scores += 2 * nh * q_tokens * kv_tokens * hd  # AV:   per head (T, S) @ (S, hd)
    return projections, scores


def _mlp(cfg: ModelConfig, tokens: int) -> int:
    return 3 * 2 * tokens * cfg.d_model * cfg.d_ff  # SwiGLU: gate and up (d -> d_ff), down (d_ff -> d)


def _vocab(cfg: ModelConfig) -> int:
    return cfg.padded_vocab_size


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int, target_len: int | None = None,
                  head_rows: int | None = None) -> FlopsBreakdown:
    """Forward FLOPs of ``batch_size`` sequences through the model ``cfg`` builds.

    decoder / encoder: ``seq_len`` tokens each. encoder_decoder: an encoder over ``seq_len`` input tokens, a
    decoder over ``target_len`` target tokens with self-attention and cross-attention over the encoder's
    output. The LM head runs on every output position (decoder / encoder: B x seq_len rows; encoder_decoder:
    B x target_len), or on ``head_rows`` rows in all when given (the masked LM: the selected positions).
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
    if not family_spec(cfg.family).has_decoder_stack:  # decoder / encoder: one stack of self-attention blocks
        proj, scores = _attention(cfg, seq_len, seq_len)
        layers = cfg.n_layers
        head_per_seq = seq_len
        breakdown = (layers * proj, layers * scores, layers * _mlp(cfg, seq_len))
    else:  # encoder + decoder stack with cross-attention
        if not target_len or target_len <= 0:
            raise ValueError("an encoder_decoder FLOP count needs target_len (the decoder's length).")
        enc_proj, enc_scores = _attention(cfg, seq_len, seq_len)
        self_proj, self_scores = _attention(cfg, target_len, target_len)
        cross_proj, cross_scores = _attention(cfg, target_len, seq_len)
        n_enc, n_dec = cfg.n_layers, cfg.n_decoder_layers
        breakdown = (
            n_enc * enc_proj + n_dec * (self_proj + cross_proj),
            n_enc * enc_scores + n_dec * (self_scores + cross_scores),
            n_enc * _mlp(cfg, seq_len) + n_dec * _mlp(cfg, target_len),
        )
        head_per_seq = target_len
    rows = batch_size * head_per_seq if head_rows is None else head_rows
    return FlopsBreakdown(*(batch_size * x for x in breakdown), 2 * rows * cfg.d_model * _vocab(cfg))


def training_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, target_len: int | None = None,
                            head_rows: int | None = None) -> int:
    """FLOPs of one training step (forward + backward) on ``batch_size`` sequences: 3 x forward."""
    return forward_flops(cfg, batch_size, seq_len, target_len, head_rows).training


def training_flops_per_token(cfg: ModelConfig, seq_len: int, target_len: int | None = None) -> float:
    """Training FLOPs per sequence position fed to the model (decoder/encoder: per token; encoder_decoder:
    per input token). Compare with the 6 N rule of thumb."""
    return training_flops_per_step(cfg, 1, seq_len, target_len) / seq_len
