"""IsoFLOP recipe: train several model sizes at a few fixed compute budgets, fit L(N, D), plot the curves.

Hoffmann et al. 2022 sec. 3.2 (approach 2: IsoFLOP profiles) and 3.3 (approach 3: a parametric fit):

1. for each budget C (FLOPs, counted as 6 N D like Hoffmann et al. eq. 4) and each model size N, train for
   D = C / (6 N) tokens (steps = D / tokens per step), one Hydra multirun over generated experiment files;
2. read each run's ``final_metrics.json`` (validation loss in nats/token, N, tokens seen);
3. fit E, A, B, alpha, beta by Huber loss on log-loss (``framework.scaling.fit``);
4. plot loss against N for each budget, the fitted law along each IsoFLOP line and its optimum
   N_opt(C) = G (C/6)^a, to a PNG; print the fitted law and the optima.

    python3 -m recipes.isoflop                         # 3 budgets x 3 sizes on CPU (about 10 min on 2 cores)
    python3 -m recipes.isoflop --schedule wsd --out runs/isoflop_wsd   # one run per model size + cooldown branches
    python3 -m recipes.isoflop --fit-only              # refit and replot the runs already in --out
    python3 -m recipes.isoflop --budgets 1e17,3e17,1e18 --sizes-per-budget 5 --seq-len 512 --vocab-size 8192 \\
        --micro-batch 32 -- hydra/launcher=submitit_slurm trainer.accelerator=gpu   # on a cluster

With ``--schedule wsd`` (warmup-stable-decay, Hägele et al. 2024) the points of one model size share one run:
the size's largest budget trains straight through with its decay over the last ``--decay-fraction`` of its
steps, and every smaller budget is a cooldown branch (``branch_from``) started from that run's checkpoint at its
own decay start, so the sweep pays for one run per size plus the decays instead of one run per point. Steps are
rounded so that each decay starts on a checkpoint (a multiple of ``--checkpoint-interval``).

The defaults are tiny so the recipe runs on a laptop CPU: the stdlib corpus, a 512-token vocabulary, 64-token
sequences, models of 30k to 200k parameters and budgets of 1e11 to 1e12 FLOPs. At that scale the fit says
something about this corpus and these tiny models only; its constants are not Chinchilla's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from framework.models.config import ModelConfig
from framework.objectives.config import decay_start
from framework.scaling import laws
from framework.scaling.fit import COARSE_GRID, fit_parametric_law
from framework.scaling.flops import training_flops_per_step

REPO = Path(__file__).resolve().parent.parent

# (d_model, n_layers) of the tiny decoders the CPU default may pick, head_dim 16 (d 32) or 32
TINY_SHAPES = [(32, 1), (32, 2), (64, 1), (64, 2), (64, 3), (64, 4), (128, 2), (128, 3), (128, 4), (192, 4),
               (256, 4), (256, 6), (384, 6), (512, 8), (768, 12), (1024, 16)]


@dataclass(frozen=True)
class Point:
    name: str
    budget: float  # 6ND FLOPs
    d_model: int
    n_layers: int
    n_params: int
    steps: int
    tokens: int
    exact_flops: int
    warmup: int = 0  # 0 = steps // 10
    trunk: str = ""  # wsd: the run this point branches from ("" = it trains from step 0)
    branch_step: int = 0  # wsd: the trunk's step its decay starts from

    @property
    def trained_steps(self) -> int:
        """Steps this point's own run trains (a branch starts at ``branch_step``)."""
        return self.steps - self.branch_step


def shape(d_model: int, n_layers: int, vocab_size: int, seq_len: int) -> ModelConfig:
    head_dim = 16 if d_model < 64 else 32 if d_model < 256 else 64
    return ModelConfig(name="isoflop", family="decoder", d_model=d_model, n_layers=n_layers,
                       n_heads=d_model // head_dim, head_dim=head_dim, vocab_size=vocab_size, max_seq_len=seq_len)


def make_points(budgets: list[float], sizes_per_budget: int, vocab_size: int, seq_len: int, micro_batch: int,
                min_steps: int = 20, spread: float = 2.0) -> list[Point]:
    """For each budget, ``sizes_per_budget`` distinct shapes whose counts are nearest N_c x spread^k, k centred
    on 0, where N_c = sqrt(C / 120) is the 20-tokens-per-parameter size (moving up to the next larger shape
    when two targets meet the same one); D = C / (6 N) rounded to whole steps."""
    shapes = sorted(((cfg.num_parameters(), cfg) for cfg in (shape(d, n, vocab_size, seq_len) for d, n in TINY_SHAPES)),
                    key=lambda s: s[0])
    tokens_per_step = micro_batch * seq_len
    points = []
    for i, c in enumerate(budgets):
        centre = math.sqrt(c / 120)
        picked: list[int] = []
        for k in range(sizes_per_budget):
            target = centre * spread ** (k - (sizes_per_budget - 1) / 2)
            idx = min(range(len(shapes)), key=lambda t: abs(math.log(shapes[t][0] / target)))
            idx = max(idx, picked[-1] + 1) if picked else idx
            if idx < len(shapes):
                picked.append(idx)
        chosen = [shapes[t] for t in picked]
        for j, (n, cfg) in enumerate(chosen):
            steps = round(c / (6 * n * tokens_per_step))
            if steps < min_steps:
                continue
            exact = training_flops_per_step(cfg, micro_batch, seq_len) * steps
            points.append(Point(f"iso_c{i}_n{j}", c, cfg.d_model, cfg.n_layers, n, steps, steps * tokens_per_step, exact))
    return points


def plan_cooldown_branches(points: list[Point], decay_fraction: float, interval: int) -> list[Point]:
    """WSD sweep: per model shape, the point with the most steps is the trunk; every other point of that shape
    branches from the trunk's checkpoint at its own decay start. Steps move to the nearest count whose decay
    starts on a multiple of ``interval`` (a checkpoint); all points of a shape share the shortest one's warmup."""
    def on_checkpoint(steps: int) -> int:
        return min((t for t in range(max(interval, steps - 3 * interval), steps + 3 * interval + 1)
                    if decay_start(t, decay_fraction) % interval == 0 and decay_start(t, decay_fraction) > 0),
                   key=lambda t: abs(t - steps))

    planned = []
    for key in sorted({(p.d_model, p.n_layers) for p in points}):
        group = sorted((p for p in points if (p.d_model, p.n_layers) == key), key=lambda p: p.steps)
        group = [replace(p, steps=on_checkpoint(p.steps), tokens=p.tokens * on_checkpoint(p.steps) // p.steps,
                         exact_flops=p.exact_flops * on_checkpoint(p.steps) // p.steps) for p in group]
        warmup = max(1, min(decay_start(group[0].steps, decay_fraction), group[0].steps // 10))
        trunk = replace(group[-1], warmup=warmup)
        planned += [replace(p, warmup=warmup, trunk=trunk.name, branch_step=decay_start(p.steps, decay_fraction))
                    for p in group[:-1]] + [trunk]
    return planned


def write_experiments(points: list[Point], conf_root: Path, vocab_size: int, seq_len: int, micro_batch: int,
                      lr: float, torch_threads: int = 1, decay_fraction: float = 0.0, interval: int = 10) -> None:
    """One ``experiment/<name>.yaml`` per point: everything the run needs, so each can be rerun alone.
    ``decay_fraction`` > 0: the WSD schedule; trunks keep a checkpoint every ``interval`` steps, branches start
    from their trunk's (its run directory is the sibling ``runs/<trunk>``)."""
    (conf_root / "experiment").mkdir(parents=True, exist_ok=True)
    for p in points:
        cfg = shape(p.d_model, p.n_layers, vocab_size, seq_len)
        exp = {
            "defaults": [{"override /objective": "clm"}, {"override /strategy": "auto"},
                         {"override /precision": "fp32"}, {"override /logger": "csv"}],
            "name": p.name,
            "model": {"preset": "tiny", "family": "decoder", "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                      "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "d_ff": cfg.d_ff,
                      "max_seq_len": seq_len},
            "data": {"vocab_size": vocab_size, "seq_len": seq_len, "micro_batch_size": micro_batch, "num_proc": 1},
            "trainer": {"max_steps": p.steps, "val_check_interval": 10**9, "enable_progress_bar": False},
            "optim": {"lr": lr, "warmup_steps": p.warmup or max(1, p.steps // 10)},
            "callbacks": {"checkpoint_every_n_steps": 10**9, "model_card": False},
            "torch_threads": torch_threads,  # tiny models gain nothing from intra-op threads; 1 avoids oversubscription
        }
        if decay_fraction:
            exp["optim"].update(schedule="wsd", decay_fraction=decay_fraction)
            if p.trunk:
                trunk_dir = conf_root.parent.resolve() / "runs" / p.trunk
                exp["branch_from"] = str(trunk_dir / "checkpoints" / f"step{p.branch_step:07d}.ckpt")
            else:
                exp["callbacks"].update(checkpoint_every_n_steps=interval, keep_checkpoints=-1)
        text = (f"# @package _global_\n# IsoFLOP point: C = {p.budget:.3g} FLOPs (6ND), N = {p.n_params:,}, "
                f"D = {p.tokens:,} tokens\n") + OmegaConf.to_yaml(OmegaConf.create(exp))
        (conf_root / "experiment" / f"{p.name}.yaml").write_text(text)


def multirun_command(points: list[Point], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "framework", "train", "-m", f"hydra.searchpath=[file://{(out / 'conf').resolve()}]",
            "experiment=" + ",".join(p.name for p in points), f"hydra.sweep.dir={(out / 'runs').resolve()}",
            "hydra.sweep.subdir=${name}", *extra]


def collect(points: list[Point], out: Path) -> list[dict]:
    """Final metrics of every finished point (N = exact parameters, D = tokens seen, L = validation loss)."""
    rows = []
    for p in points:
        f = out / "runs" / p.name / "final_metrics.json"
        if f.exists():
            m = json.loads(f.read_text())
            rows.append({"name": p.name, "budget": p.budget, "n_params": m["parameters"], "tokens": m["tokens_seen"],
                         "loss": m["val_loss_nats"], "exact_flops": p.exact_flops})
    return rows


def plot_isoflops(rows: list[dict], law: laws.ParametricLaw, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({r["budget"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    for c, color in zip(budgets, colors):
        pts = sorted((r for r in rows if r["budget"] == c), key=lambda r: r["n_params"])
        ax.scatter([r["n_params"] for r in pts], [r["loss"] for r in pts], color=color, zorder=3)
        lo, hi = min(r["n_params"] for r in pts) / 2, max(r["n_params"] for r in pts) * 2
        n = np.geomspace(lo, hi, 200)
        ax.plot(n, [law.loss(x, c / (6 * x)) for x in n], color=color, label=f"C = {c:.0e} FLOPs")
        n_opt, d_opt = law.optimal_allocation(c)
        ax.scatter([n_opt], [law.loss(n_opt, d_opt)], marker="*", s=160, color=color, edgecolor="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"IsoFLOP curves; fit E={law.E:.2f} A={law.A:.3g} B={law.B:.3g} "
                 f"alpha={law.alpha:.2f} beta={law.beta:.2f} (stars: fitted optimum)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train(points: list[Point], out: Path, overrides: list[str]) -> int:
    """One Hydra multirun over the points not finished yet; its exit status."""
    todo = [pt for pt in points if not (out / "runs" / pt.name / "final_metrics.json").exists()]
    if not todo:
        return 0
    cmd = multirun_command(todo, out, ["trainer.accelerator=cpu", *overrides])
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode


def jackknife_se(rows: list[dict], budgets: list[float]) -> dict:
    """Leave-one-out (jackknife) standard errors of the fitted exponents a, b and of log10 N_opt(C) at each budget:
    se = sqrt((n - 1) / n * sum_i (theta_i - mean theta)^2) over the n fits that each drop one run (Efron & Stein
    1981). It measures how much the law rests on single runs; two sweeps agree when they differ by less than
    about two combined standard errors."""
    fits = []
    for i in range(len(rows)):
        rest = rows[:i] + rows[i + 1:]
        law = fit_parametric_law([r["n_params"] for r in rest], [r["tokens"] for r in rest], [r["loss"] for r in rest],
                                 grid=COARSE_GRID, name="jackknife").law
        fits.append({"a": law.a, "b": law.b,
                     **{str(c): math.log10(law.optimal_allocation(c)[0]) for c in budgets}})
    n = len(fits)

    def se(key: str) -> float:
        values = [f[key] for f in fits]
        mean = sum(values) / n
        return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in values))

    return {"a": se("a"), "b": se("b"), "log10_n_opt": {str(c): se(str(c)) for c in budgets}, "fits": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m recipes.isoflop", description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="1e11,3e11,1e12", help="comma-separated 6ND budgets in FLOPs")
    p.add_argument("--sizes-per-budget", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per run (0 = torch's default)")
    p.add_argument("--out", default="runs/isoflop", help="folder for the experiment files, runs, fit and plot")
    p.add_argument("--fit-only", action="store_true", help="do not train; fit and plot the runs already in --out")
    p.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine",
                   help="cosine: one run per point; wsd: one run per model size plus cooldown branches")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of each point's steps that decay")
    p.add_argument("--checkpoint-interval", type=int, default=10, help="wsd: steps between the trunks' checkpoints")
    p.add_argument("--no-uncertainty", action="store_true", help="skip the leave-one-out refits (one fit per run)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        print(f"isoflop: error: --budgets must be comma-separated numbers such as 1e11,3e11,1e12, got "
              f"{args.budgets!r}.", file=sys.stderr)
        return 2
    if args.schedule == "wsd" and not 0.0 < args.decay_fraction <= 1.0:
        print(f"isoflop: error: --decay-fraction must be in (0, 1], got {args.decay_fraction}.", file=sys.stderr)
        return 2
    out = Path(args.out)
    points = make_points(budgets, args.sizes_per_budget, args.vocab_size, args.seq_len, args.micro_batch)
    decay_fraction = args.decay_fraction if args.schedule == "wsd" else 0.0
    if decay_fraction:
        points = plan_cooldown_branches(points, decay_fraction, args.checkpoint_interval)
    print(f"{len(points)} runs:")
    for pt in points:
        print(f"  {pt.name}: C={pt.budget:.3g} N={pt.n_params:,} (d={pt.d_model}, L={pt.n_layers}) steps={pt.steps} "
              f"D={pt.tokens:,} tokens, exact FLOPs {pt.exact_flops:.3g}"
              + (f", branch of {pt.trunk} at step {pt.branch_step}" if pt.trunk else ""))
    trained = sum(pt.exact_flops * pt.trained_steps // pt.steps for pt in points)
    print(f"compute trained: {trained:.3g} FLOPs ({trained / sum(pt.exact_flops for pt in points):.2f} of one run "
          "per point)")
    if not args.fit_only:
        write_experiments(points, out / "conf", args.vocab_size, args.seq_len, args.micro_batch, args.lr,
                          args.torch_threads, decay_fraction, args.checkpoint_interval)
        for stage in ([pt for pt in points if not pt.trunk], [pt for pt in points if pt.trunk]):  # trunks first
            rc = _train(stage, out, args.overrides)
            if rc != 0:
                print(f"isoflop: error: the Hydra multirun exited with {rc}; see its output above.", file=sys.stderr)
                return rc
    rows = collect(points, out)
    if len(rows) < 5:
        print(f"isoflop: error: {len(rows)} finished runs in {out}/runs; the fit needs at least 5.", file=sys.stderr)
        return 2
    fit = fit_parametric_law([r["n_params"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows],
                             grid=COARSE_GRID, name="isoflop_fit")
    law = fit.law
    summary = {"law": {k: getattr(law, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b")},
               "schedule": args.schedule, "compute_trained_flops": trained,
               "huber_objective": fit.objective, "runs": rows,
               "optima": [{"budget": c, "n_opt": law.optimal_allocation(c)[0], "d_opt": law.optimal_allocation(c)[1]}
                          for c in budgets]}
    if not args.no_uncertainty:
        summary["jackknife_se"] = jackknife_se(rows, budgets)
    (out / "fit.json").write_text(json.dumps(summary, indent=2))
    plot_isoflops(rows, law, out / "isoflop.png")
    print("\nrun, C (6ND), N, D, loss:")
    for r in rows:
        print(f"  {r['name']}: {r['budget']:.3g} {r['n_params']:,} {r['tokens']:,} {r['loss']:.4f}")
    print("\nfitted: " + law.equations()[0].split(" (")[0])
    se = summary.get("jackknife_se", {})
    print(f"  N_opt grows as C^{law.a:.3f}" + (f" (jackknife s.e. {se['a']:.3f})" if se else "")
          + f", D_opt as C^{law.b:.3f}")
    for o in summary["optima"]:
        err = f" (s.e. of log10 N_opt {se['log10_n_opt'][str(o['budget'])]:.3f})" if se else ""
        print(f"  C = {o['budget']:.3g}: N_opt = {o['n_opt']:.3g}{err}, D_opt = {o['d_opt']:.3g} "
              f"({o['d_opt'] / o['n_opt']:.1f} tokens/parameter)")
    print(f"wrote {out / 'fit.json'} and {out / 'isoflop.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
