"""Export a training checkpoint to a Hugging Face transformers directory.

    fw-export runs/default/checkpoints/last.ckpt exported/   # the command: framework.commands.export

Each family maps one-to-one, weight for weight, onto a transformers class (its registration's ``HFExport`` in
``framework.models.registry``; the maps live in ``framework/models/hf_llama.py`` and ``hf_t5.py``), so the exported
model's logits equal the framework model's (tests/test_export.py checks it in float32):

    decoder         -> LlamaForCausalLM          (RMSNorm, half-split RoPE, SwiGLU, grouped-query heads)
    encoder         -> EuroBertForMaskedLM       (the same blocks with bidirectional attention)
    encoder_decoder -> T5ForConditionalGeneration (T5 v1.1: gated-silu MLP, relative position bias)

The directory holds ``model.safetensors``, ``config.json`` (with the special token ids), a
``generation_config.json`` and the run's tokenizer (its own BPE, or the given one with any special tokens
the run added) as a fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, special-token names
as the run resolved them), loadable with ``AutoTokenizer`` and
``AutoModelFor{CausalLM,MaskedLM,Seq2SeqLM}.from_pretrained``. The vocabulary is the model's padded
vocabulary; the padding rows are never produced by the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framework.tracking.model_card import card_info_from_checkpoint, write_model_card
from framework.data.tokenizer import SpecialIds, load_tokenizer
from framework.checkpointing.checkpoints import read_training_checkpoint
from framework.checkpointing.integrity import reading_checkpoint
from framework.models.config import ModelConfig
from framework.models.registry import family

# ----------------------------------------------------------------------------- checkpoint reading
def load_checkpoint(path: str | Path) -> tuple[ModelConfig, SpecialIds, dict[str, torch.Tensor], dict]:
    """(model config, special ids, the model's state dict without the ``model.`` prefix, hyper_parameters)."""
    with reading_checkpoint(path):
        hparams, state, _ = read_training_checkpoint(path)
    config = ModelConfig(**hparams["model_config"])
    ids = hparams["special_ids"]
    special = SpecialIds(**{k: tuple(v) if k == "sentinels" else v for k, v in ids.items()})
    state = {name: tensor.float() for name, tensor in state.items()}
    return config, special, state, hparams


# ----------------------------------------------------------------------------- configs and weights
def hf_config(c: ModelConfig, special: SpecialIds):
    """The transformers config whose model computes exactly what ``build_model(c)`` computes."""
    return family(c.family).export.config(c, special)


def hf_state_dict(c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (no ``model.`` prefix) -> transformers names, as contiguous float32 tensors."""
    names = family(c.family).export.weight_names(c)
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} model weights (e.g. {missing[:3]}); "
                         "was it written by a different version of the model code?")
    return {hf: state[ours].contiguous().clone() for hf, ours in names.items()}


def hf_tokenizer(tokenizer_path: str | Path, model_max_length: int, special: SpecialIds):
    """The run's tokenizer (special tokens added for the objective included) as a transformers fast tokenizer
    whose special-token names are the run's: the tokens at the ids in ``special``. A role aliased to ``<eos>``
    (a CLM run with GPT-2's tokenizer has no pad or bos of its own) names the eos token, as GPT-2 does; an
    aliased mask is left unset, since no mask token exists."""
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(tokenizer_path)
    names = {role: tok.id_to_token(getattr(special, role)) for role in ("pad", "bos", "eos", "unk", "mask")}
    if special.mask == special.eos:
        names.pop("mask")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{role}_token": n for role, n in names.items()},
                                   extra_special_tokens=[tok.id_to_token(i) for i in special.sentinels],
                                   model_max_length=model_max_length)


# ----------------------------------------------------------------------------- export
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write a transformers directory for ``checkpoint`` to ``out_dir`` and return ``out_dir``. A non-empty
    ``out_dir`` (it may hold the user's files) is refused unless ``overwrite``, before anything is read.

    ``tokenizer_path`` defaults to the tokenizer the run trained with: ``<run_dir>/tokenizer.json`` beside
    ``<run_dir>/checkpoints/`` (older checkpoints also record its data-cache path in their hparams); pass it when
    the checkpoint moved to a machine without either."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} is {'a file' if not out.is_dir() else 'not empty'}; export into a new or empty "
                              "directory, or pass --overwrite to replace the files the export writes there.")
    config, special, state, hparams = load_checkpoint(checkpoint)
    if tokenizer_path is None:
        # the path an older run recorded, else the copy framework.run keeps in <run_dir>/tokenizer.json
        candidates = [Path(p) for p in (hparams.get("tokenizer_path"), Path(checkpoint).resolve().parent.parent
                                        / "tokenizer.json") if p]
        tokenizer_path = next((p for p in candidates if p.is_file()), candidates[0] if candidates else Path(""))
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file() and not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the run's tokenizer was not found at {str(tokenizer_path) or '(not recorded)'}; pass --tokenizer "
            "<data_cache>/<source>-<key>/tokenizer.json (the data directory the run prepared).")
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config(config, special)
    traits = family(config.family).traits
    architecture, auto_class = traits.hf_architecture, traits.hf_auto_class
    hf_cfg.architectures = [architecture]
    hf_cfg.save_pretrained(out)
    save_file(hf_state_dict(config, state), str(out / "model.safetensors"), metadata={"format": "pt"})
    _generation_config(config, special).save_pretrained(out)
    hf_tokenizer(tokenizer_path, config.max_seq_len, special).save_pretrained(out)
    (out / "framework_export.json").write_text(json.dumps({
        "checkpoint": str(Path(checkpoint).resolve()), "family": config.family, "architecture": architecture,
        "auto_class": auto_class, "objective": hparams.get("objective", {}).get("name"),
        "model_config": hparams["model_config"], "parameters": config.num_parameters(),
    }, indent=2))
    write_model_card(out, card_info_from_checkpoint(checkpoint),
                     usage=f"from transformers import AutoTokenizer, {auto_class}\n"
                           f"model = {auto_class}.from_pretrained({str(out)!r})\n"
                           f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    return out


def _generation_config(c: ModelConfig, special: SpecialIds):
    from transformers import GenerationConfig

    extra = family(c.family).export.generation(special)
    return GenerationConfig(pad_token_id=special.pad, eos_token_id=special.eos, **extra)
