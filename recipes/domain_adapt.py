"""Domain adaptation recipe: continue pretraining a framework checkpoint on a domain + general mixture, and show
what the domain gains and the general text loses (forgetting).

1. base: a run directory (its ``checkpoints/last.ckpt`` and ``tokenizer.json``) or a ``.ckpt`` file;
2. tokenizer: ``keep`` the base's; ``extend`` it with up to ``--new-tokens`` BPE tokens learnt on the domain's
   training split (``framework.data.tokenizer.extend_tokenizer``: every existing id kept); or train a ``new`` one
   on domain + general text;
3. an initial checkpoint whose embedding (and untied LM head) rows are moved to the new vocabulary by Fast
   Vocabulary Transfer (Gee et al. 2022; ``framework.adapt``), with its ``tokenizer.json``;
4. validation loss BEFORE on the domain and the general split, both tokenized with the new tokenizer;
5. continued pretraining on the mixture (``framework.run.run`` with ``init_from``, ``data.tokenizer_path``,
   ``data.sources`` + ``data.mixture``, ``trainer.max_steps``, ``optim.lr``): step 0, a fresh optimizer;
6. validation loss AFTER on both splits; a table (domain / general x before / after, the change; the general
   split's increase is the forgetting) printed and saved as ``domain_adapt.json`` and ``domain_adapt.md``.

    python3 -m framework train                              # the README's default run: runs/default
    python3 -m recipes.domain_adapt --base runs/default     # licences (legal) + stdlib docstrings, extend 512
    python3 -m recipes.domain_adapt --base runs/default --tokenizer new --vocab-size 4096 --curation
    python3 -m recipes.domain_adapt --base runs/default -- trainer.accelerator=gpu precision=bf16

Losses are nats per token of the adapted tokenizer (so before and after compare directly), plus nats per byte,
which also compares with the base model under its own tokenizer (the "base" row, shown when the tokenizer
changed): the gap between "base" and "before" is what the vocabulary transfer costs before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from framework.adapt import adapt_checkpoint, evaluate_split, module_from_checkpoint
from framework.data.position import checkpoint_seq_len
from framework.checkpointing.checkpoints import read_training_checkpoint
from framework.data import tokenizer as tk
from framework.data.config import DataConfig
from framework.data.prepare import prepare_data
from framework.data.sources import is_validation, iter_documents
from framework.models.config import PRESETS

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("domain", "general")


def stage(message: str) -> None:
    print(f"[domain_adapt {time.strftime('%H:%M:%S')}] {message}", flush=True)


def resolve_base(base: str) -> Path:
    """The checkpoint file of a run directory (its checkpoints/last.ckpt) or of a .ckpt path."""
    path = Path(base)
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"--base {base} is a directory without checkpoints/; give a run directory of "
                                "`python3 -m framework train` (e.g. runs/default) or a .ckpt file.")
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; train the base first (`python3 -m framework train` writes "
                                "runs/default) or pass --base <run dir or .ckpt>.")
    return ckpt


def base_tokenizer_path(ckpt: Path, hp: dict) -> Path:
    """The run directory's tokenizer.json (train.py copies it there), else the one an older checkpoint's
    hyperparameters record."""
    for directory in [ckpt.parent, *ckpt.resolve().parents][:3]:
        if (directory / tk.TOKENIZER_FILE).exists():
            return directory / tk.TOKENIZER_FILE
    recorded = hp.get("tokenizer_path")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    gone = f", and its recorded {recorded!r} is gone" if recorded else ""
    raise FileNotFoundError(f"no tokenizer.json beside {ckpt} or in its run directory{gone}; copy the base run's "
                            "tokenizer.json there.")


def data_configs(args: argparse.Namespace, base_seq_len: int | None) -> dict[str, DataConfig]:
    """``base_seq_len``: the sequence length the base was trained at (its DataModule's checkpoint state)."""
    if not (args.seq_len or base_seq_len):
        raise SystemExit("error: the base checkpoint does not record its sequence length; pass --seq-len.")
    common = dict(seq_len=args.seq_len or int(base_seq_len), micro_batch_size=args.micro_batch,
                  cache_dir=args.cache_dir, num_proc=args.num_proc, val_windows=args.val_windows)
    if args.curation:  # the evaluated splits are the ones training sees
        common["curation"] = replace(DataConfig().curation, enabled=True)
    return {"domain": DataConfig(source=args.domain_source, paths=list(args.domain_paths),
                                 max_documents=args.max_documents, **common),
            "general": DataConfig(source=args.general_source, paths=list(args.general_paths),
                                  max_documents=args.max_documents, **common)}


def training_texts(cfg: DataConfig):
    return (text for doc_id, text in iter_documents(cfg) if not is_validation(doc_id, cfg.val_fraction))


def new_tokenizer(args: argparse.Namespace, base_tok, data: dict[str, DataConfig]):
    if args.tokenizer == "keep":
        return base_tok
    if args.tokenizer == "extend":
        return tk.extend_tokenizer(base_tok, training_texts(data["domain"]), args.new_tokens)
    if args.tokenizer == "new":
        texts = (t for split in SPLITS for t in training_texts(data[split]))
        return tk.train_tokenizer(texts, args.vocab_size)
    raise ValueError(f"--tokenizer {args.tokenizer!r} is not one of keep, extend, new.")


def evaluate(checkpoint: Path, data: dict[str, DataConfig], tokenizer_path: Path, args) -> dict[str, dict]:
    module = module_from_checkpoint(checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for split in SPLITS:
        prepared = prepare_data(replace(data[split], tokenizer_path=str(tokenizer_path)), progress=False)
        out[split] = evaluate_split(module, prepared, data[split].seq_len, args.micro_batch, args.eval_windows or 10**9,
                                    seed=args.seed)
    return out


def train_overrides(args: argparse.Namespace, hp: dict, init: Path, tokenizer_path: Path, run_dir: Path,
                    data: dict[str, DataConfig]) -> list[str]:
    """Hydra overrides of conf/train.yaml for the continued pretraining: the base's objective and model shape."""
    model = hp["model_config"]
    over = [f"objective={hp['objective']['name']}"] + [f"objective.{k}={v}" for k, v in hp["objective"].items()
                                                      if k != "name"]
    over += [f"model.preset={model['name'] if model['name'] in PRESETS else 'tiny'}"]
    over += [f"model.{k}={v}" for k, v in model.items() if k not in ("name", "vocab_size")]
    d = data["domain"]
    over += [f"data.seq_len={d.seq_len}", f"data.micro_batch_size={d.micro_batch_size}",
             f"data.cache_dir={d.cache_dir}", f"data.num_proc={d.num_proc}", f"data.val_windows={d.val_windows}",
             f"data.tokenizer_path={tokenizer_path}", f"init_from={init}", f"trainer.max_steps={args.steps}",
             f"trainer.val_check_interval={max(1, args.steps // 4)}", f"optim.lr={args.lr}",
             f"optim.warmup_steps={max(1, args.steps // 10)}", f"seed={args.seed}", "resume=never",
             f"name={run_dir.parent.name}-train", f"run_dir={run_dir}", "callbacks.model_card=false"]
    over += mixture_overrides(args, data) if has_mixtures() else domain_only_overrides(data)
    if args.curation:
        over.append("data.curation.enabled=true")
    return over + list(args.overrides)


def has_mixtures() -> bool:
    return any(f.name == "mixture" for f in dataclasses.fields(DataConfig))


def domain_only_overrides(data: dict[str, DataConfig]) -> list[str]:
    """Without ``data.mixture`` (an older framework): the domain source alone."""
    d = data["domain"]
    return [f"data.source={d.source}", f"data.max_documents={d.max_documents}"] + (
        [f"data.paths=[{','.join(d.paths)}]"] if d.paths else [])


def mixture_overrides(args: argparse.Namespace, data: dict[str, DataConfig]) -> list[str]:
    """'data.sources={domain:{source:licenses,...},general:{source:stdlib,...}}'
    'data.mixture={domain:w,general:1-w}'."""
    def entry(cfg: DataConfig) -> str:
        fields = [f"source:{cfg.source}"] + ([f"max_documents:{cfg.max_documents}"] if cfg.max_documents else [])
        fields += [f"paths:[{','.join(cfg.paths)}]"] if cfg.paths else []
        return "{" + ",".join(fields) + "}"

    w = args.domain_weight
    return [f"data.sources={{domain:{entry(data['domain'])},general:{entry(data['general'])}}}",
            f"data.mixture={{domain:{w},general:{round(1.0 - w, 6)}}}"]


def compose_train_config(overrides: list[str]):
    from framework.config import compose

    return compose(overrides)


def report(results: dict, out: Path) -> str:
    rows = ["| split | before (nats/token) | after (nats/token) | change | before (nats/byte) | after (nats/byte) |"
            + (" base model, its tokenizer (nats/byte) |" if "base" in results else ""),
            "|---|---|---|---|---|---|" + ("---|" if "base" in results else "")]
    for split in SPLITS:
        b, a = results["before"][split], results["after"][split]
        row = (f"| {split} ({results['sources'][split]}) | {b['loss_nats']:.4f} | {a['loss_nats']:.4f} | "
               f"{a['loss_nats'] - b['loss_nats']:+.4f} | {b['nats_per_byte']:.4f} | {a['nats_per_byte']:.4f} |")
        rows.append(row + (f" {results['base'][split]['nats_per_byte']:.4f} |" if "base" in results else ""))
    table = "\n".join(rows)
    forgetting = results["after"]["general"]["loss_nats"] - results["before"]["general"]["loss_nats"]
    gain = results["before"]["domain"]["loss_nats"] - results["after"]["domain"]["loss_nats"]
    summary = (f"domain loss {'down' if gain > 0 else 'up'} {abs(gain):.4f} nats/token; general loss "
               f"{'up' if forgetting > 0 else 'down'} {abs(forgetting):.4f} nats/token "
               f"({'forgetting' if forgetting > 0 else 'no forgetting'}) after {results['steps']} steps; "
               f"tokenizer {results['tokenizer']} ({results['vocab_size']} tokens)")
    if "base" in results:  # across tokenizers only nats/byte compare
        base_general = results["base"]["general"]["nats_per_byte"]
        after_general = results["after"]["general"]["nats_per_byte"]
        summary += (f"; against the base model with its own tokenizer, general {base_general:.4f} -> "
                    f"{after_general:.4f} nats/byte ({after_general - base_general:+.4f})")
    (out / "domain_adapt.json").write_text(json.dumps(results, indent=2))
    title = f"# Domain adaptation of {results['base_checkpoint']}"
    (out / "domain_adapt.md").write_text(f"{title}\n\n{table}\n\n{summary}\n")
    return f"{table}\n\n{summary}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m recipes.domain_adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/default", help="a run directory or a .ckpt file (default runs/default)")
    p.add_argument("--out", default="runs/domain_adapt", help="output directory")
    p.add_argument("--tokenizer", choices=("keep", "extend", "new"), default="extend")
    p.add_argument("--new-tokens", type=int, default=512, help="extend: the most tokens added")
    p.add_argument("--vocab-size", type=int, default=4096, help="new: the new tokenizer's vocabulary")
    p.add_argument("--domain-source", default="licenses")
    p.add_argument("--domain-paths", nargs="*", default=[], help="with --domain-source files")
    p.add_argument("--general-source", default="stdlib")
    p.add_argument("--general-paths", nargs="*", default=[], help="with --general-source files")
    p.add_argument("--domain-weight", type=float, default=0.5, help="the domain's share of training tokens")
    p.add_argument("--max-documents", type=int, default=0, help="per source; 0 = all")
    p.add_argument("--curation", action="store_true", help="data.curation.enabled=true (dedup: the licences repeat)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the base run's")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--val-windows", type=int, default=256,
                   help="validation windows per source in the training run's periodic validation")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="windows per split in the before/after evaluation (0 = the whole validation split, which "
                        "nats/byte across tokenizers needs: both then cover the same text)")
    p.add_argument("--cache-dir", default="data_cache")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--no-base-eval", action="store_true", help="skip the base model's own-tokenizer evaluation")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for the training run (after --)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if not 0.0 < args.domain_weight < 1.0:
        raise SystemExit("error: --domain-weight must be strictly between 0 and 1 (the domain's share of tokens).")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = resolve_base(args.base)
        hp, _, raw = read_training_checkpoint(ckpt)
        base_seq_len = checkpoint_seq_len(raw)
        base_tok_path = base_tokenizer_path(ckpt, hp)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    stage(f"base {ckpt} ({hp['objective']['name']}, {hp['model_config']['family']}, "
          f"{hp['model_config']['vocab_size']} tokens)")
    data = data_configs(args, base_seq_len)
    base_tok = tk.load_tokenizer(base_tok_path)

    stage(f"tokenizer: {args.tokenizer}")
    tok = new_tokenizer(args, base_tok, data)
    tok_path = out / tk.TOKENIZER_FILE
    tk.save_tokenizer(tok, out, {"kind": args.tokenizer, "base": str(base_tok_path),
                                 "vocab_size": tok.get_vocab_size()})
    stage(f"tokenizer: {base_tok.get_vocab_size()} -> {tok.get_vocab_size()} tokens -> {tok_path}")

    init = out / "init.ckpt"
    adapt_checkpoint(ckpt, base_tok, tok, init, tok_path)
    stage(f"initial checkpoint with transferred embeddings -> {init}")

    results: dict = {"base_checkpoint": str(ckpt), "tokenizer": args.tokenizer, "vocab_size": tok.get_vocab_size(),
                     "steps": args.steps, "lr": args.lr, "domain_weight": args.domain_weight,
                     "sources": {s: data[s].source for s in SPLITS}}
    if args.tokenizer != "keep" and not args.no_base_eval:
        stage("evaluating the base model with its own tokenizer")
        results["base"] = evaluate(ckpt, data, base_tok_path, args)
    stage("evaluating BEFORE continued pretraining")
    results["before"] = evaluate(init, data, tok_path, args)

    run_dir = out / "train"
    if run_dir.exists():  # this recipe's own earlier run: Lightning would write last-v1.ckpt beside its last.ckpt
        stage(f"removing the previous continued-pretraining run {run_dir}")
        shutil.rmtree(run_dir)
    overrides = train_overrides(args, hp, init, tok_path, run_dir, data)
    stage(f"continued pretraining: {args.steps} steps -> {run_dir}")
    from framework.run import run

    if not has_mixtures():
        stage("note: this framework has no data.mixture; continuing on the domain source alone")
    results["train_overrides"] = overrides  # the same run by hand: python3 -m framework train <these>
    results["train_metrics"] = run(compose_train_config(overrides), run_dir)
    stage("evaluating AFTER continued pretraining")
    results["after"] = evaluate(run_dir / "checkpoints" / "last.ckpt", data, tok_path, args)
    print("\n" + report(results, out) + f"\n\nwritten: {out / 'domain_adapt.json'}, {out / 'domain_adapt.md'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
