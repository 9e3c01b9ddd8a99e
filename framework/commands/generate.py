"""``fw-generate`` (= ``python3 -m framework generate``): text from a training checkpoint, by the family's mode.

    fw-generate runs/default/checkpoints/last.ckpt --prompt "def add(a, b):" --max-new-tokens 40 --top-p 0.9

Decoder: continue the prompt; encoder-decoder: fill its ``<extra_id_N>`` sentinels; encoder: fill its ``<mask>``
tokens. The sampling itself (temperature, top-k, top-p, the KV cache) is ``framework.generate``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from framework.commands import COMMANDS
from framework.commands.errors import user_errors
from framework.generate import fill_mask, find_tokenizer, generate, generate_seq2seq, load_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fw-generate", description=COMMANDS["generate"])
    p.add_argument("checkpoint", help="a .ckpt written by training (<run_dir>/checkpoints/last.ckpt)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus filter")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run directory's)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _continue_text(model: nn.Module, tok, special: dict, prompt: str, args, knobs: dict) -> str:
    """Decoder ("text"): continue the prompt after <eos>, the document start it saw in training."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([[special["eos"]] + ids], device=args.device)
    out = generate(model, x, args.max_new_tokens, eos_id=special["eos"], pad_id=special["pad"],
                   use_cache=not args.no_cache, **knobs)
    return prompt + tok.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True)


def _fill_spans(model: nn.Module, tok, special: dict, prompt: str, args, knobs: dict) -> str:
    """Encoder-decoder ("spans"): fill the prompt's <extra_id_N> sentinels (one appended when it has none)."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not set(ids) & set(special["sentinels"]):
        ids = ids + [special["sentinels"][0]]  # predict what follows the prompt
    x = torch.tensor([ids + [special["eos"]]], device=args.device)
    out = generate_seq2seq(model, x, args.max_new_tokens, eos_id=special["eos"], start_id=special["pad"],
                           pad_id=special["pad"], use_cache=not args.no_cache, **knobs)
    return tok.decode(out[0, 1:].tolist(), skip_special_tokens=False).replace("<pad>", "")


def _fill_masks(model: nn.Module, tok, special: dict, prompt: str, args, knobs: dict) -> str:
    """Encoder ("masks"): replace each <mask> in one forward pass (greedy unless a sampling knob is set)."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    knobs = dict(knobs, greedy=args.greedy or (args.temperature == 1.0 and args.top_k == 0 and args.top_p == 1.0))
    out = fill_mask(model, torch.tensor([ids], device=args.device), special["mask"], **knobs)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


# per generation mode, ``framework.catalogue.FamilySpec.generates``
GENERATION_MODES = {"text": _continue_text, "spans": _fill_spans, "masks": _fill_masks}


def generate_texts(argv: list[str] | None = None) -> list[str]:
    """The texts for each ``--prompt`` (also printed), for callers and tests."""
    args = _parser().parse_args(argv)
    from framework.catalogue import family_spec
    from framework.data.tokenizer import load_tokenizer

    model, hp = load_checkpoint(args.checkpoint)
    model.to(args.device)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(Path(args.checkpoint), hp.get("tokenizer_path", "")))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    knobs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                 generator=generator)
    run = GENERATION_MODES[family_spec(hp["model_config"]["family"]).generates]
    outputs = []
    for prompt in args.prompt:
        outputs.append(run(model, tok, hp["special_ids"], prompt, args, knobs))
        print(outputs[-1])
    return outputs


def main(argv: list[str] | None = None) -> None:
    """Console entry point (exit status 0; a missing or damaged checkpoint, a bad setting: one line on stderr,
    exit status 2)."""
    with user_errors("fw-generate"):
        generate_texts(argv)


if __name__ == "__main__":
    main()
