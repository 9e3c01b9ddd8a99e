"""``fw-plan`` (= ``python3 -m framework plan``): from a compute budget to a compute-optimal experiment.

    fw-plan --flops 1e21                                   # Besiroglu et al. 2024 law, causal LM, 8 x H100
    fw-plan --pf-days 10 --law hoffmann2022 --objective mlm
    fw-plan --gpu-hours 1000 --gpu H100 --mfu 0.4 --precision bf16 --gpus 16 --name my_run
    python3 -m framework train experiment=my_run           # run the plan

Prints N_opt and D_opt with the equations used, the model shape, the predicted loss, training FLOPs (6ND
and exact), batch and steps, memory per GPU for every strategy x precision, the strategy chosen, and the
estimated wall-clock time; writes ``<conf>/experiment/<name>.yaml`` plus ``<name>.plan.json`` and
``<name>.plan.md`` beside it (``framework.scaling.experiment``). The maths lives in ``framework.scaling``.
A bad budget or setting is one line on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framework.commands import COMMANDS
from framework.catalogue import OBJECTIVES, PRECISIONS
from framework.scaling import laws
from framework.scaling.experiment import default_name, write_plan
from framework.scaling.planner import REPO_CONF, PlanRequest, make_budget, make_plan, positive_number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fw-plan", description=COMMANDS["plan"],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    b = p.add_argument_group("budget (give one)")
    b.add_argument("--flops", help="training compute in FLOPs, e.g. 1e21")
    b.add_argument("--pf-days", help="training compute in petaflop/s-days (1 = 8.64e19 FLOPs)")
    b.add_argument("--gpu-hours", help="GPU-hours on --gpu at --mfu")
    p.add_argument("--gpu", default="H100", help="GPU type from framework/scaling/hardware.py (V100, A100, H100, H200)")
    p.add_argument("--mfu", default="0.4", help="assumed model FLOPs utilization, 0-1 (default 0.4)")
    p.add_argument("--precision", default="bf16", help=f"one of {', '.join(PRECISIONS)} (default bf16)")
    p.add_argument("--objective", default="clm",
                   help=", ".join(f"{o.name} ({o.family})" for o in OBJECTIVES.values()) + " (default clm)")
    p.add_argument("--law", default=laws.DEFAULT_LAW,
                   help=f"one of {', '.join(laws.LAWS)} (default {laws.DEFAULT_LAW}), or a fit.json from recipes/isoflop.py")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=0.0, help="memory per GPU in GB (default: the GPU's)")
    p.add_argument("--seq-len", type=int, default=2048, help="model sequence length (encoder input length)")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary (sets data.vocab_size)")
    p.add_argument("--name", default="", help="experiment name (default plan_<objective>_<budget>)")
    p.add_argument("--conf-dir", default=str(REPO_CONF),
                   help="config root to write experiment/<name>.yaml into (default: the repo's conf/)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of Markdown")
    return p


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--flops -3e20`` -> ``--flops=-3e20``: argparse takes "-3e20" for an option, and the user should hear
    that a budget must be positive instead."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_attach_negative_values(argv))
    try:
        if args.precision not in PRECISIONS:
            raise ValueError(f"--precision {args.precision!r} is not one of {', '.join(PRECISIONS)}.")
        budget = make_budget(flops=args.flops, pf_days=args.pf_days, gpu_hours=args.gpu_hours, gpu=args.gpu,
                             mfu=args.mfu, precision=args.precision)
        mfu = positive_number(args.mfu, "--mfu", "0.4")
        if mfu > 1:
            raise ValueError(f"--mfu is a fraction of peak between 0 and 1, got {args.mfu!r}.")
        req = PlanRequest(budget=budget, objective=args.objective, law=args.law, gpu=args.gpu, n_gpus=args.gpus,
                          gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb, mfu=mfu,
                          precision=args.precision, seq_len=args.seq_len, vocab_size=args.vocab_size)
        plan = make_plan(req)
        name = args.name or default_name(req)
        paths = write_plan(plan, name, Path(args.conf_dir))
    except ValueError as e:
        print(f"fw-plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(paths["json"].read_text())
    else:
        print(paths["markdown"].read_text())
        print(f"wrote {paths['experiment']} (+ .plan.json, .plan.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
