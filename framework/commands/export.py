"""``fw-export`` (= ``python3 -m framework export``): a training checkpoint as a transformers directory.

    fw-export runs/default/checkpoints/last.ckpt exported/ [--tokenizer T] [--overwrite]

The mapping and what the directory holds: ``framework.export``. A missing or damaged checkpoint, or a non-empty
directory without ``--overwrite``, is one line on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json

from framework.commands import COMMANDS
from framework.commands.errors import user_errors
from framework.export import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fw-export", description=COMMANDS["export"])
    parser.add_argument("checkpoint", help="a single-file Lightning checkpoint written by fw-train (.ckpt)")
    parser.add_argument("out_dir", help="directory to write the transformers model into")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json of the run (default: the path recorded in the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty out_dir, replacing its files")
    args = parser.parse_args(argv)
    with user_errors("fw-export"):
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, overwrite=args.overwrite)
    info = json.loads((out / "framework_export.json").read_text())
    print(f"exported a {info['family']} model ({info['parameters']:,} parameters) as {info['architecture']} to {out}; "
          f"load it with transformers.{info['auto_class']}.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
