"""``fw-eval`` (= ``python3 -m framework eval``): a checkpoint on local lm-evaluation-harness tasks, 0- to few-shot.

    fw-eval runs/default/checkpoints/last.ckpt --tasks docstring_topic,docstring_return --shots 0,1,3
    fw-eval runs/default/checkpoints/last.ckpt --tasks docstring_topic --num-fewshot 5 --limit 20

Prints a table (task, shots, metric, value, standard error, examples) and writes the results as JSON to
``<run_dir>/eval/<checkpoint name>.json`` (or ``--out``). An unknown task name, a missing or damaged checkpoint
are one sentence on stderr and exit status 2, checked before the harness or the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

from framework.commands import COMMANDS
from framework.evaluation.local_tasks import check_eval_settings, parse_shots


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fw-eval", description=COMMANDS["eval"])
    p.add_argument("checkpoint", help="a single-file .ckpt written by training (<run_dir>/checkpoints/last.ckpt)")
    p.add_argument("--tasks", required=True, help="comma-separated local task names, e.g. docstring_topic")
    shots = p.add_mutually_exclusive_group()
    shots.add_argument("--num-fewshot", type=int, default=None, help="one number of in-context examples")
    shots.add_argument("--shots", default=None, help="several, comma-separated, e.g. 0,1,5 (default: 0)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples of each task (0 = all)")
    p.add_argument("--include-path", action="append", default=[], help="another directory of task YAMLs")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot example draw")
    p.add_argument("--batch-size", type=int, default=16, help="decoder rows per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run directory's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON results path (default: <run_dir>/eval/<checkpoint>.json)")
    return p


class UsageError(ValueError):
    """A mistake in the command line or its files; ``main`` prints it as one line and exits with status 2."""


def default_out(checkpoint: Path) -> Path:
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / "eval" / f"{checkpoint.stem}.json"


def _load(checkpoint: Path, tokenizer: str | None):
    """The model and tokenizer, or one sentence saying why not (any failure to read a user's file)."""
    if not checkpoint.is_file():
        raise UsageError(f"no checkpoint file at {checkpoint}; give a .ckpt written by training "
                         "(<run_dir>/checkpoints/last.ckpt; a sharded directory needs fw-consolidate first).")
    if not zipfile.is_zipfile(checkpoint):  # torch.save writes a zip archive; checked before torch is imported
        raise UsageError(f"{checkpoint} is not a PyTorch checkpoint (not a zip archive: damaged, truncated or another "
                         "file); give a .ckpt written by training.")
    try:
        from framework.evaluation.harness import load_for_eval

        return load_for_eval(checkpoint, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err).strip("'\"")) from err
    except Exception as err:  # a truncated or foreign file: torch.load's many error types
        raise UsageError(f"cannot read the checkpoint {checkpoint} ({type(err).__name__}); it is damaged or not a "
                         ".ckpt written by training.") from err


def evaluate(argv: list[str] | None = None) -> dict:
    """The results table as a dict (also printed and written as JSON), for callers and tests."""
    args = _parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:  # before the harness or the model is loaded
        shots = [args.num_fewshot] if args.num_fewshot is not None else parse_shots(args.shots or "0")
        check_eval_settings(tasks, shots, args.include_path)
    except ValueError as err:
        raise UsageError(str(err)) from err
    checkpoint = Path(args.checkpoint)
    model, family, special, tok = _load(checkpoint, args.tokenizer)
    import torch

    from framework.evaluation.harness import FrameworkLM, format_table, run_evaluation

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = FrameworkLM(model=model.to(device), family=family, special=special, tokenizer_obj=tok,
                     batch_size=args.batch_size)
    results = run_evaluation(lm, tasks, shots, args.limit, args.include_path, args.seed)
    print(format_table(results))
    out = Path(args.out) if args.out else default_out(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(checkpoint.resolve()), "family": family, "limit": args.limit,
                               "seed": args.seed, "results": results}, indent=2))
    print(f"results written to {out}")
    return results


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    try:
        evaluate(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
