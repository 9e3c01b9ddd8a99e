"""Append a ``bench/gpu_check.sh`` output folder to ``bench/RESULTS.md``: the device, the date, the command, the
table and each row's status, so every GPU figure in the repository says where and when it was measured.

    python3 bench/merge_gpu_results.py OUTDIR [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path


def section(out: Path) -> str:
    table = (out / "table.md").read_text().strip() if (out / "table.md").exists() else "(no table: every row failed)"
    status = (out / "status.txt").read_text().strip() if (out / "status.txt").exists() else ""
    env = (out / "environment.txt").read_text() if (out / "environment.txt").exists() else ""
    device = next((ln.strip(" |") for ln in env.splitlines() if "NVIDIA" in ln and "Driver" not in ln), "unknown device")
    versions = next((ln for ln in env.splitlines() if ln.startswith("torch ")), "")
    day = dt.datetime.fromtimestamp((out / "status.txt").stat().st_mtime, dt.timezone.utc).date().isoformat() \
        if (out / "status.txt").exists() else dt.date.today().isoformat()
    return (f"\n## GPU check {day}: {device}\n\n`bash bench/gpu_check.sh OUTDIR` ({versions}); rows as "
            f"`bench/train_speed.py` measures them (columns explained at its top).\n\n{table}\n\n"
            f"Row status (rc 124 = cut at its time limit):\n\n```\n{status}\n```\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = p.parse_args(argv)
    out = Path(args.outdir)
    if not (out / "status.txt").exists():
        print(f"merge_gpu_results: error: {out} holds no status.txt; give the folder bench/gpu_check.sh wrote.",
              file=sys.stderr)
        return 2
    with open(args.results, "a") as f:
        f.write(section(out))
    print(f"appended {out} to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
