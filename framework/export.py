"""Export a training checkpoint to a Hugging Face transformers directory.

    python3 -m framework.export runs/default/checkpoints/last.ckpt exported/   # or: fw-export CKPT OUT

Each family maps one-to-one, weight for weight, onto a transformers class, so the exported model's
logits equal the framework model's (tests/test_export.py checks it in float32):

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

import argparse
import json
from pathlib import Path

import torch

from framework.callbacks.model_card import card_info_from_checkpoint, write_model_card
from framework.data.tokenizer import SpecialIds, load_tokenizer
from framework.distributed.checkpoints import read_training_checkpoint
from framework.models.config import ModelConfig

# transformers class (and Auto class) per family
HF_ARCHITECTURES = {
    "decoder": ("LlamaForCausalLM", "AutoModelForCausalLM"),
    "encoder": ("EuroBertForMaskedLM", "AutoModelForMaskedLM"),
    "encoder_decoder": ("T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
}


# ----------------------------------------------------------------------------- checkpoint reading
def load_checkpoint(path: str | Path) -> tuple[ModelConfig, SpecialIds, dict[str, torch.Tensor], dict]:
    """(model config, special ids, the model's state dict without the ``model.`` prefix, hyper_parameters)."""
    hparams, state, _ = read_training_checkpoint(path)
    config = ModelConfig(**hparams["model_config"])
    ids = hparams["special_ids"]
    special = SpecialIds(**{k: tuple(v) if k == "sentinels" else v for k, v in ids.items()})
    state = {name: tensor.float() for name, tensor in state.items()}
    return config, special, state, hparams


# ----------------------------------------------------------------------------- weight name maps
def _block_map(prefix: str, ours: str) -> dict[str, str]:
    """Llama/EuroBERT decoder-layer names for one of our pre-norm ``Block``s."""
    return {
        f"{prefix}.input_layernorm.weight": f"{ours}.norm_attn.weight",
        f"{prefix}.self_attn.q_proj.weight": f"{ours}.attn.wq.weight",
        f"{prefix}.self_attn.k_proj.weight": f"{ours}.attn.wk.weight",
        f"{prefix}.self_attn.v_proj.weight": f"{ours}.attn.wv.weight",
        f"{prefix}.self_attn.o_proj.weight": f"{ours}.attn.wo.weight",
        f"{prefix}.post_attention_layernorm.weight": f"{ours}.norm_mlp.weight",
        f"{prefix}.mlp.gate_proj.weight": f"{ours}.mlp.w_gate.weight",
        f"{prefix}.mlp.up_proj.weight": f"{ours}.mlp.w_up.weight",
        f"{prefix}.mlp.down_proj.weight": f"{ours}.mlp.w_down.weight",
    }


def _llama_like_map(c: ModelConfig) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm_final.weight"}
    for i in range(c.n_layers):
        names.update(_block_map(f"model.layers.{i}", f"blocks.{i}"))
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _t5_attention(prefix: str, ours: str) -> dict[str, str]:
    return {f"{prefix}.{hf}.weight": f"{ours}.{w}.weight" for hf, w in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo"))}


def _t5_mlp(prefix: str, ours: str) -> dict[str, str]:
    return {f"{prefix}.DenseReluDense.wi_0.weight": f"{ours}.w_gate.weight",
            f"{prefix}.DenseReluDense.wi_1.weight": f"{ours}.w_up.weight",
            f"{prefix}.DenseReluDense.wo.weight": f"{ours}.w_down.weight"}


def _t5_map(c: ModelConfig) -> dict[str, str]:
    names = {
        "shared.weight": "embed.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder_position_bias.embedding.weight",
        "encoder.final_layer_norm.weight": "encoder_norm.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder_position_bias.embedding.weight",
        "decoder.final_layer_norm.weight": "decoder_norm.weight",
    }
    for i in range(c.n_layers):
        hf, ours = f"encoder.block.{i}.layer", f"encoder_blocks.{i}"
        names.update(_t5_attention(f"{hf}.0.SelfAttention", f"{ours}.attn"))
        names[f"{hf}.0.layer_norm.weight"] = f"{ours}.norm_attn.weight"
        names.update(_t5_mlp(f"{hf}.1", f"{ours}.mlp"))
        names[f"{hf}.1.layer_norm.weight"] = f"{ours}.norm_mlp.weight"
    for i in range(c.n_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", f"decoder_blocks.{i}"
        names.update(_t5_attention(f"{hf}.0.SelfAttention", f"{ours}.attn"))
        names[f"{hf}.0.layer_norm.weight"] = f"{ours}.norm_attn.weight"
        names.update(_t5_attention(f"{hf}.1.EncDecAttention", f"{ours}.cross_attn"))
        names[f"{hf}.1.layer_norm.weight"] = f"{ours}.norm_cross.weight"
        names.update(_t5_mlp(f"{hf}.2", f"{ours}.mlp"))
        names[f"{hf}.2.layer_norm.weight"] = f"{ours}.norm_mlp.weight"
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ----------------------------------------------------------------------------- configs
def hf_config(c: ModelConfig, special: SpecialIds):
    """The transformers config whose model computes exactly what ``build_model(c)`` computes."""
    common = dict(vocab_size=c.padded_vocab_size, pad_token_id=special.pad, eos_token_id=special.eos,
                  tie_word_embeddings=c.tie_embeddings)
    if c.family in ("decoder", "encoder"):
        from transformers import EuroBertConfig, LlamaConfig

        llama_like = dict(hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
                          num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                          hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                          rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                          attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=c.init_std,
                          bos_token_id=special.bos, **common)
        if c.family == "decoder":
            return LlamaConfig(**llama_like)
        return EuroBertConfig(mask_token_id=special.mask, **llama_like)
    if c.family == "encoder_decoder":
        from transformers import T5Config

        if c.n_kv_heads != c.n_heads:
            raise ValueError(f"T5 has no grouped-query attention, so a model with n_kv_heads={c.n_kv_heads} != "
                             f"n_heads={c.n_heads} cannot be exported to T5ForConditionalGeneration.")
        return T5Config(d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.n_layers,
                        num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads,
                        relative_attention_num_buckets=c.relative_attention_num_buckets,
                        relative_attention_max_distance=c.relative_attention_max_distance,
                        dropout_rate=c.dropout, layer_norm_epsilon=c.norm_eps, feed_forward_proj="gated-silu",
                        is_encoder_decoder=True, decoder_start_token_id=special.pad, **common)
    raise ValueError(f"no transformers export for model family {c.family!r}.")


def hf_state_dict(c: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (no ``model.`` prefix) -> transformers names, as contiguous float32 tensors."""
    names = _t5_map(c) if c.family == "encoder_decoder" else _llama_like_map(c)
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
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write a transformers directory for ``checkpoint`` to ``out_dir`` and return ``out_dir``.

    ``tokenizer_path`` defaults to the tokenizer the run trained with: ``<run_dir>/tokenizer.json`` beside
    ``<run_dir>/checkpoints/`` (older checkpoints also record its data-cache path in their hparams); pass it when
    the checkpoint moved to a machine without either."""
    from safetensors.torch import save_file

    config, special, state, hparams = load_checkpoint(checkpoint)
    if tokenizer_path is None:
        # the path an older run recorded, else the copy framework.train keeps in <run_dir>/tokenizer.json
        candidates = [Path(p) for p in (hparams.get("tokenizer_path"), Path(checkpoint).resolve().parent.parent
                                        / "tokenizer.json") if p]
        tokenizer_path = next((p for p in candidates if p.is_file()), candidates[0] if candidates else Path(""))
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file() and not (tokenizer_path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the run's tokenizer was not found at {str(tokenizer_path) or '(not recorded)'}; pass --tokenizer "
            "<data_cache>/<source>-<key>/tokenizer.json (the data directory the run prepared).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config(config, special)
    architecture, auto_class = HF_ARCHITECTURES[config.family]
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

    kwargs = dict(pad_token_id=special.pad, eos_token_id=special.eos)
    if c.family == "encoder_decoder":
        kwargs["decoder_start_token_id"] = special.pad
    elif c.family == "decoder":
        kwargs["bos_token_id"] = special.bos
    return GenerationConfig(**kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fw-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a single-file Lightning checkpoint written by framework.train (.ckpt)")
    parser.add_argument("out_dir", help="directory to write the transformers model into")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json of the run (default: the path recorded in the checkpoint)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    info = json.loads((out / "framework_export.json").read_text())
    print(f"exported a {info['family']} model ({info['parameters']:,} parameters) as {info['architecture']} to {out}; "
          f"load it with transformers.{info['auto_class']}.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
