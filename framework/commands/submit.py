"""``fw-submit`` (= ``python3 -m framework submit``): compose, render the batch script, call sbatch.

    fw-submit cluster.nodes=4 cluster.devices_per_node=8 cluster.partition=gpu model=gpt2-small name=gpt2-4n
    fw-submit --dry-run name=smoke trainer.max_steps=10        # print the script, submit nothing

What it writes and when: ``framework.cluster.submit``.
"""

from __future__ import annotations

import argparse
import sys

from framework.commands import COMMANDS
from framework.cluster.submit import submit


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """Console entry: a user error (a bad override, no sbatch, a run directory in use, sbatch refusing the
    script) is one line on stderr and exit status 2, with nothing written."""
    parser = argparse.ArgumentParser(prog="fw-submit", description=COMMANDS["submit"])
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fw-train")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        sub = submit(args.overrides, dry_run=args.dry_run)
    except (ValueError, OSError, HydraException, OmegaConfBaseException) as err:
        print(f"fw-submit: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        print(sub.script)
    else:
        print(f"submitted job {sub.job_id}; run directory {sub.run_dir}")


if __name__ == "__main__":
    main()
