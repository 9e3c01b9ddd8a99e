"""``fw-prepare`` (= ``python3 -m framework prepare``): tokenize and shard the configured data, no training.

    fw-prepare [hydra overrides]                                  # tokenize and shard the configured data, no training
    fw-prepare --tokenizer-only [overrides]                       # split job, step 1: the one tokenizer
    fw-prepare --task-index I --num-tasks N [overrides]           # step 2, for every I in 0..N-1 (in parallel)
    fw-prepare --merge --num-tasks N [overrides]                  # step 3: meta.json only (the last task also merges)

The composed config passes ``framework.validate`` first
(the checks fw-train runs, but the device's), so a run training would refuse is refused before tokenizing. A
mistake a user can make (a task index out of range, a merge with tasks missing, a task without a tokenizer, a
bad override, a key that is not a setting) is one line on stderr and exit code 2 (``framework.commands.errors``);
``FRAMEWORK_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from hydra.errors import HydraException

from framework.commands import COMMANDS
from framework.commands.errors import user_errors
from framework.config import compose as compose_train_config
from framework.data.mixture import prepare_sources
from framework.data.prepare import merge_prepared, prepare_task, prepare_tokenizer
from framework.validate import validate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fw-prepare", description=COMMANDS["prepare"])
    p.add_argument("--tokenizer-only", action="store_true", help="only create the tokenizer (step 1 of a split job)")
    p.add_argument("--task-index", type=int, help="this task's index, 0..N-1 (SLURM: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, help="N: the number of tasks the corpus is split into")
    p.add_argument("--merge", action="store_true", help="write meta.json from the N finished tasks")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fw-train")
    return p


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if (args.task_index is None) != (args.num_tasks is None) and not (args.merge and args.num_tasks is not None):
        _usage_error("--task-index and --num-tasks go together (--merge takes --num-tasks alone).")
    if args.merge and args.num_tasks is None:
        _usage_error("--merge needs --num-tasks N, the number of tasks the corpus was split into.")
    with user_errors(extra=(HydraException,)):
        _prepare(args)


def _prepare(args: argparse.Namespace) -> None:
    cfg = compose_train_config(args.overrides)
    validate(cfg, check_device=False)  # the checks fw-train runs first; preparation may run on a CPU node
    split_job = args.tokenizer_only or args.merge or args.task_index is not None
    if cfg.data.mixture and split_job:
        raise ValueError("a mixture is prepared source by source; split one source into tasks with its own "
                         "overrides (data.source=..., data.tokenizer_path=<the mixture's tokenizer>).")
    if args.tokenizer_only:
        print(f"tokenizer ready at {prepare_tokenizer(cfg.data)}")
        return
    if args.merge:
        prepared = merge_prepared(cfg.data, args.num_tasks)
    elif args.task_index is not None:
        prepared = prepare_task(cfg.data, args.task_index, args.num_tasks)
        if prepared is None:
            print(f"task {args.task_index} of {args.num_tasks} done; the last task to finish merges")
            return
    else:  # what training prepares: the one source, or each source of the mixture with one shared tokenizer
        sources = prepare_sources(cfg.data)
        if sources.is_mixture:
            for name, part in sources.parts.items():
                print(f"{name} (weight {sources.meta['mixture'][name]:.4g}) ready at {part.directory}: "
                      f"{part.meta['tokens']['train']:,} train / {part.meta['tokens']['val']:,} val tokens")
            print(f"shared tokenizer {sources.meta['tokenizer_hash']} ({sources.vocab_size} tokens): "
                  f"{sources.tokenizer_path}")
            return
        prepared = sources.parts[sources.names[0]]
    m = prepared.meta
    print(f"data ready at {prepared.directory}: {m['tokens']['train']:,} train / {m['tokens']['val']:,} val tokens, "
          f"vocab {m['vocab_size']}, tokenizer {m['tokenizer_hash']}")


if __name__ == "__main__":
    main()
