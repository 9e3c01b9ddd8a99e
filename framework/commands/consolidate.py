"""``fw-consolidate`` (= ``python3 -m framework consolidate``): one single-file checkpoint from a sharded one.

    fw-consolidate runs/big/checkpoints/last.ckpt runs/big/consolidated.ckpt

For a checkpoint written on another number of GPUs, or for ``fw-export`` / ``fw-generate``, which read one file.
How each format is read: ``framework.checkpointing.consolidate``. A bad path is one line and exit status 2.
"""

from __future__ import annotations

import argparse

from framework.commands import COMMANDS
from framework.checkpointing.consolidate import consolidate
from framework.commands.errors import user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fw-consolidate", description=COMMANDS["consolidate"])
    parser.add_argument("checkpoint", help="a sharded checkpoint directory (FSDP or DeepSpeed)")
    parser.add_argument("out", help="the single .ckpt file to write")
    args = parser.parse_args(argv)
    with user_errors("fw-consolidate"):
        checkpoint = consolidate(args.checkpoint, args.out)
    print(f"wrote {args.out}: {len(checkpoint['state_dict'])} tensors, step {checkpoint.get('global_step', '?')}, "
          f"optimizer state {'included' if checkpoint.get('optimizer_states') else 'absent'}")


if __name__ == "__main__":
    main()
