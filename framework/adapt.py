"""Continued pretraining from a framework checkpoint: vocabulary transfer, ``init_from`` loading, per-split loss.

- ``transfer_vocabulary``: a model for a new tokenizer from a model trained with an old one. Every other weight
  is copied; each embedding row (and each row of an untied LM head) of the new vocabulary is the old row of the
  same token when the old vocabulary has it verbatim, else the mean of the old rows of the pieces the OLD
  tokenizer splits the token's text into: Fast Vocabulary Transfer (Gee et al. 2022, "Fast Vocabulary Transfer
  for Language Model Compression", sec. 3). Works for the three families (``embed`` and ``lm_head`` are the
  names all three use).
- ``load_init_weights``: the model weights of a single-file checkpoint into a freshly built model (train.py's
  ``init_from``), refusing a family, vocabulary or shape mismatch with one sentence each.
- ``evaluate_split``: the token-weighted validation loss of a module over a prepared split, plus nats per byte
  (comparable across tokenizers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from tokenizers import Tokenizer
from torch import nn

from framework.data.datamodule import PretrainDataModule
from framework.data.prepare import PreparedData
from framework.data.tokenizer import SPECIAL_TOKENS, special_ids, tokenizer_hash
from framework.checkpointing.checkpoints import read_training_checkpoint
from framework.models import ModelConfig, build_model
from framework.objectives import objective_class

VOCAB_ROWS = ("embed.weight", "lm_head.weight")  # (padded_vocab, d_model) in every family


# ----------------------------------------------------------------------------- checkpoints
def load_framework_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hyper_parameters, the model's state dict without the ``model.`` prefix) of a single-file checkpoint."""
    hp, state, _ = _read_checkpoint(path)
    return hp, state


def _read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """(hyper_parameters, model state dict, the hash of the tokenizer it was trained with when recorded)."""
    hp, state, ckpt = read_training_checkpoint(path)
    # the data module's checkpoint state records it (PretrainDataModule.state_dict); adapt_checkpoint writes it
    recorded = ckpt.get("tokenizer_hash") or next(
        (v["tokenizer_hash"] for v in ckpt.values() if isinstance(v, dict) and "tokenizer_hash" in v), None)
    return hp, state, recorded


def load_init_weights(model: nn.Module, config: ModelConfig, path: str | Path,
                      tokenizer_hash: str | None = None) -> None:
    """Copy the model weights of checkpoint ``path`` into ``model`` (built from ``config``); refuses mismatches.
    ``tokenizer_hash``: the run's tokenizer (``tokenizer_hash``), refused when the checkpoint records another."""
    hp, state, recorded = _read_checkpoint(path)
    saved = hp["model_config"]
    if saved["family"] != config.family:
        raise ValueError(f"init_from={path} holds a {saved['family']} model but this run trains a {config.family} "
                         f"model; choose an objective and model preset of family {saved['family']!r}.")
    if saved["vocab_size"] != config.vocab_size:
        raise ValueError(
            f"the checkpoint's vocabulary has {saved['vocab_size']} tokens, the data's tokenizer {config.vocab_size}: "
            "use the checkpoint's tokenizer with data.tokenizer_path=<its run dir>/tokenizer.json, or run "
            "recipes/domain_adapt.py to extend it.")
    if tokenizer_hash and recorded and recorded != tokenizer_hash:
        raise ValueError(
            f"init_from={path} was trained with another tokenizer of the same size ({recorded}, the data's is "
            f"{tokenizer_hash}): use the checkpoint's tokenizer with data.tokenizer_path=<its run dir>/tokenizer.json.")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        shape = {k: saved[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff") if k in saved}
        raise ValueError(f"init_from={path} does not fit the configured model ({str(err).splitlines()[0]}); set "
                         f"model=<preset> and model.* overrides to the checkpoint's shape {shape}.") from err


# ----------------------------------------------------------------------------- vocabulary transfer
def token_pieces(new_tok: Tokenizer, old_tok: Tokenizer) -> list[list[int]]:
    """For each id of ``new_tok``: ``[old id]`` when the old vocabulary has the token verbatim, else the old ids
    the old BPE model splits the token's byte-level text into (Gee et al. 2022, sec. 3.1's T_old(t))."""
    old_vocab = old_tok.get_vocab()
    pieces: list[list[int]] = []
    for token_id in range(new_tok.get_vocab_size()):
        token = new_tok.id_to_token(token_id)
        if token in old_vocab:
            pieces.append([old_vocab[token]])
        else:  # byte-level text: every character is one byte, and every byte is in the old alphabet
            pieces.append([old_vocab[t.value] for t in old_tok.model.tokenize(token)])
    return pieces


def transfer_vocabulary(state: dict[str, torch.Tensor], old_config: ModelConfig, new_config: ModelConfig,
                        pieces: list[list[int]]) -> dict[str, torch.Tensor]:
    """The state dict of a ``new_config`` model (a new vocabulary, same shape otherwise) from an old one's.

    Rows ``i < len(pieces)``: the mean of old rows ``pieces[i]`` (a single piece copies its row exactly).
    Padding rows (``padded_vocab_size`` beyond the vocabulary, never produced by the tokenizer): the mean of the
    old padding rows (trained to get low logits), or of all old rows when the old model had none."""
    if len(pieces) != new_config.vocab_size:
        raise ValueError(f"{len(pieces)} token pieces for a new vocabulary of {new_config.vocab_size} tokens.")
    out = dict(state)
    for key in VOCAB_ROWS:
        if key not in state:
            continue
        old = state[key]  # (old padded vocab, d_model)
        new = torch.empty(new_config.padded_vocab_size, old.shape[1], dtype=old.dtype)
        for i, ids in enumerate(pieces):
            new[i] = old[ids[0]] if len(ids) == 1 else old[ids].float().mean(0).to(old.dtype)
        padding = old[old_config.vocab_size:] if old.shape[0] > old_config.vocab_size else old
        new[new_config.vocab_size:] = padding.float().mean(0).to(old.dtype)
        out[key] = new
    return out


def adapt_checkpoint(base_checkpoint: str | Path, old_tok: Tokenizer, new_tok: Tokenizer, out_path: str | Path,
                     tokenizer_path: str | Path) -> tuple[dict, nn.Module]:
    """Write ``out_path``: the base checkpoint's model moved to ``new_tok``'s vocabulary, as a single-file checkpoint
    ``init_from`` and ``evaluate_split`` read. Returns (its hyper_parameters, the model)."""
    hp, state = load_framework_checkpoint(base_checkpoint)
    if old_tok.get_vocab_size() != hp["model_config"]["vocab_size"]:
        raise ValueError(f"the base tokenizer has {old_tok.get_vocab_size()} tokens but {base_checkpoint} was trained "
                         f"with {hp['model_config']['vocab_size']}; pass the tokenizer.json of its run directory.")
    old_config = ModelConfig(**hp["model_config"])
    new_config = old_config.replace(vocab_size=new_tok.get_vocab_size())
    new_state = transfer_vocabulary(state, old_config, new_config, token_pieces(new_tok, old_tok))
    model = build_model(new_config)
    model.load_state_dict(new_state)  # strict: every other weight has the old shape
    hp = dict(hp, model_config=dataclasses.asdict(new_config), tokenizer_path=str(tokenizer_path),
              special_ids=dataclasses.asdict(special_ids(new_tok)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp,
                "tokenizer_hash": tokenizer_hash(new_tok), "adapted_from": str(base_checkpoint)}, out_path)
    return hp, model


# ----------------------------------------------------------------------------- evaluation
def token_bytes(tok: Tokenizer) -> np.ndarray:
    """(vocab,) UTF-8 bytes each id stands for: a byte-level BPE token has one character per byte; specials 0."""
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, token_id in tok.get_vocab().items():
        lengths[token_id] = 0 if token in SPECIAL_TOKENS else len(token)
    return lengths


@torch.no_grad()
def evaluate_split(module, prepared: PreparedData, seq_len: int, micro_batch_size: int, max_windows: int = 10**9,
                   seed: int = 0) -> dict:
    """Token-weighted mean validation loss (nats/token) of ``module`` (a ``PretrainModule``) over the first
    ``max_windows`` validation windows of ``prepared``, as ``PretrainModule.validation_step`` computes it; and
    nats/byte = loss / (bytes per token of exactly those windows). Two tokenizers cover the same text only when
    both evaluate the whole split (the default ``max_windows``): compare nats/byte across tokenizers then."""
    data = PretrainDataModule.for_objective(prepared, module.objective_config, seq_len, micro_batch_size,
                                            vocab_size=module.model_config.vocab_size, seed=seed,
                                            val_windows=max_windows)
    (loader,) = data.val_dataloader()  # one source: one loader
    lengths = token_bytes(prepared.tokenizer())
    windows = loader.dataset  # the (window, position) pairs evaluated below
    ids = np.concatenate([w.numpy() for w, _ in windows]) if len(windows) else np.zeros(0, dtype=np.int64)
    bytes_per_token = int(lengths[ids].sum()) / max(1, len(ids))
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss, n = module.compute_loss(move_data_to_device(batch, module.device))
        total += float(loss) * int(n)
        count += int(n)
    module.train(was_training)
    loss = total / max(1, count)
    return {"loss_nats": loss, "nats_per_byte": loss / bytes_per_token, "tokens": count,
            "windows": len(windows), "bytes_per_token": bytes_per_token}


def module_from_checkpoint(path: str | Path):
    """The objective's ``PretrainModule`` of a single-file checkpoint, weights loaded, in eval mode."""
    hp, state = load_framework_checkpoint(path)
    module = objective_class(hp["objective"]["name"])(
        **{k: hp[k] for k in ("model_config", "optim", "objective", "special_ids", "max_steps")})
    module.model.load_state_dict(state)
    return module.eval()
