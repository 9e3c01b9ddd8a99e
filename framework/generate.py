"""Text generation from a training checkpoint: sampling filters, KV-cached decoding, mask filling.

    fw-generate runs/default/checkpoints/last.ckpt --prompt "Return the" --max-new-tokens 50 \
        --temperature 0.8 --top-k 50 --top-p 0.9 --seed 0          # sampling
    fw-generate runs/default/checkpoints/last.ckpt --prompt "Return the" --greedy
    fw-generate runs/mlm/checkpoints/last.ckpt --prompt "Return the <mask> of x."   # encoder: fill-in

Decoder checkpoints continue the prompt (with a key/value cache, one token per forward pass). Span-corruption
(encoder-decoder) checkpoints encode the prompt, in which ``<extra_id_N>`` sentinels mark the spans to fill
(one is appended at the end when the prompt has none), and decode from ``<pad>`` until ``<eos>``.
Encoder (masked LM) checkpoints replace each ``<mask>`` in the prompt in one forward pass.

The filters follow the usual order (transformers' ``generate``): temperature, then top-k (Fan et al. 2018),
then nucleus / top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- logits filters, (B, V) -> (B, V)
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive; use greedy decoding for temperature 0.")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept too), set the rest to -inf.
    top_k <= 0 keeps everything."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= ``top_p``.

    A token is dropped when the tokens ranked strictly above it already hold at least ``top_p`` of the mass,
    so the most likely token is always kept. top_p >= 1 keeps everything.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above each one
    drop_sorted = mass_above >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def sample_next(logits: torch.Tensor, generator: torch.Generator | None = None, *, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """One token per row from next-token logits (B, V) -> (B,) int64."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- decoding loops
def _check_length(model: nn.Module, total: int) -> None:
    limit = model.config.max_seq_len
    if total > limit:
        raise ValueError(f"prompt plus max_new_tokens is {total} tokens, more than the model's max_seq_len={limit}; "
                         "shorten the prompt or lower --max-new-tokens.")


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
             eos_id: int | None = None, pad_id: int = 0, use_cache: bool = True) -> torch.Tensor:
    """Continue ``input_ids`` (B, T) with a decoder; returns (B, T + n) with n <= max_new_tokens.

    With ``use_cache`` the prompt is run once and each new token is one forward pass over the key/value cache;
    without it every step reruns the whole sequence (same tokens, slower). Rows that emitted ``eos_id`` are
    padded with ``pad_id`` until all rows have finished.
    """
    _check_length(model, input_ids.shape[1] + max_new_tokens)
    model.eval()
    cache = model.new_kv_cache() if use_cache else None

    def next_logits(step_input: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return model(step_input, kv_cache=cache) if use_cache else model(tokens)

    return _decode_loop(next_logits, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, generator=generator, eos_id=eos_id, pad_id=pad_id)


def _decode_loop(next_logits, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float, top_k: int,
                 top_p: float, greedy: bool, generator, eos_id: int | None, pad_id: int) -> torch.Tensor:
    """Append up to ``max_new_tokens`` to ``tokens`` (B, T). ``next_logits(step_input, tokens)`` returns the
    logits (B, t, V) of the newest tokens: ``step_input`` is what a KV-cached model still has to see."""
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    step_input = tokens
    for _ in range(max_new_tokens):
        logits = next_logits(step_input, tokens)
        nxt = sample_next(logits[:, -1], generator, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                break
    return tokens


@torch.no_grad()
def generate_seq2seq(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                     generator: torch.Generator | None = None, eos_id: int | None = None, start_id: int = 0,
                     pad_id: int = 0, use_cache: bool = True) -> torch.Tensor:
    """Encoder-decoder: encode ``input_ids`` (B, S) once, decode from ``start_id`` (T5 uses <pad>).
    Returns the decoder tokens (B, 1 + n), starting with ``start_id``."""
    model.eval()
    hidden = model.encode(input_ids, attention_mask=attention_mask)
    cache = model.new_kv_cache() if use_cache else None
    tokens = torch.full((input_ids.shape[0], 1), start_id, dtype=torch.long, device=input_ids.device)

    def next_logits(step_input: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if use_cache:
            return model.decode(step_input, hidden, attention_mask=attention_mask, kv_cache=cache)
        return model.decode(tokens, hidden, attention_mask=attention_mask)

    return _decode_loop(next_logits, tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, generator=generator, eos_id=eos_id, pad_id=pad_id)


@torch.no_grad()
def fill_mask(model: nn.Module, input_ids: torch.Tensor, mask_id: int, *, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, greedy: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encoder: replace every ``mask_id`` in ``input_ids`` (B, T) in one forward pass; returns a new (B, T)."""
    model.eval()
    positions = input_ids == mask_id  # (B, T)
    if not bool(positions.any()):
        raise ValueError("the prompt has no <mask> token to fill; write <mask> where a token should be predicted.")
    logits = model(input_ids)[positions]  # (M, V)
    filled = input_ids.clone()
    filled[positions] = sample_next(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return filled


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path):
    """(model in eval mode on the CPU, hyper_parameters dict) from a single-file checkpoint of ``framework.run``."""
    from framework.checkpointing.integrity import reading_checkpoint
    from framework.checkpointing.checkpoints import read_training_checkpoint
    from framework.models import ModelConfig, build_model

    with reading_checkpoint(path):
        hp, state, _ = read_training_checkpoint(path)
    model = build_model(ModelConfig(**hp["model_config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the model its hyperparameters describe ({err}).") from err
    return model.eval(), dict(hp)


def find_tokenizer(checkpoint: Path, recorded: str = "") -> Path:
    """The run's ``tokenizer.json``: beside the checkpoint, in a parent directory (the run directory), or the
    data-cache path recorded in the checkpoint's hyperparameters."""
    for directory in [checkpoint.parent, *checkpoint.resolve().parents][:4]:
        if (directory / "tokenizer.json").exists():
            return directory / "tokenizer.json"
    if recorded and Path(recorded).exists():
        return Path(recorded)
    raise FileNotFoundError(f"no tokenizer.json beside {checkpoint} or in its run directory; pass --tokenizer "
                            "<path> (the data cache holds it: <data.cache_dir>/<source>-<key>/tokenizer.json).")
