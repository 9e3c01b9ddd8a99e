"""A plan (``framework.scaling.planner``) written as an experiment the train command runs as is: the library of
``fw-plan`` (``framework.commands.plan``).

``write_plan`` writes ``<conf>/experiment/<name>.yaml`` (the shape, batch, steps, strategy and precision as
overrides), ``<name>.plan.json`` (every figure) and ``<name>.plan.md`` (the same for a reader: N_opt and D_opt with
the equations used, training FLOPs by 6ND and exactly, memory per GPU for every strategy x precision, the time
estimate), after the experiment has composed and passed ``framework.validate`` on the plan's GPU; a plan training
would refuse is not written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from framework.catalogue import PRECISIONS, family_spec
from framework.scaling.planner import REPO_CONF, Plan, PlanRequest

MODEL_FIELDS = ("family", "d_model", "n_layers", "n_decoder_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                "max_seq_len", "tie_embeddings", "position")


def experiment_dict(plan: Plan, name: str) -> dict:
    """The experiment config: ``# @package _global_`` overrides of the train config's groups and fields."""
    m = plan.model
    preset = next(k for k, v in _presets().items() if v["family"] == m["family"])
    accum = plan.accumulate_grad_batches
    val_every_steps = max(1, min(1000, plan.steps // 10))
    exp: dict = {
        "defaults": [
            {"override /objective": plan.request["objective"]},
            {"override /strategy": plan.strategy},
            {"override /precision": plan.precision},
        ],
        "name": name,
        "model": {"preset": preset, **{k: m[k] for k in MODEL_FIELDS}, "vocab_size": 0},
        "data": {"vocab_size": plan.request["vocab_size"], "seq_len": plan.seq_len,
                 "micro_batch_size": plan.micro_batch},
        "trainer": {"max_steps": plan.steps, "accumulate_grad_batches": accum, "devices": plan.devices,
                    "num_nodes": plan.num_nodes,
                    "val_check_interval": val_every_steps * accum},  # Lightning counts micro-batches here
        "optim": {"lr": float(f"{plan.lr:.3g}"), "warmup_steps": plan.warmup_steps},
    }
    if plan.activation_checkpointing:
        exp["strategy"] = {"activation_checkpointing": True}
    return exp


def _presets() -> dict:
    from framework.models.config import PRESETS

    return PRESETS


def render_markdown(plan: Plan, name: str, run_command: str) -> str:
    m = plan.model
    shape = (f"{m['family']}: d_model {m['d_model']}, {m['n_layers']} layers"
             + (f" + {m['n_decoder_layers']} decoder layers" if family_spec(m["family"]).has_decoder_stack else "")
             + f", {m['n_heads']} heads of {m['head_dim']} ({m['n_kv_heads']} KV heads), SwiGLU d_ff {m['d_ff']}, "
             f"vocab {m['vocab_size']} (padded to a multiple of {m['pad_vocab_multiple']}), tied embeddings "
             f"{m['tie_embeddings']}")
    mem = plan.chosen_memory
    lines = [
        f"# Compute-optimal plan `{name}`",
        "",
        f"Budget: {plan.budget_description} = {plan.budget_flops:.4g} FLOPs = {plan.budget_pf_days:.4g} PF/s-days "
        f"(1 PF/s-day = 8.64e19 FLOPs). Objective `{plan.request['objective']}`, law `{plan.law}`.",
        "",
        "## Allocation",
        *[f"- {eq}" for eq in plan.equations],
        f"- N_opt = {plan.n_opt:.4g} parameters, D_opt = {plan.d_opt:.4g} tokens "
        f"({plan.d_opt / plan.n_opt:.1f} tokens/parameter)",
        f"- model: {shape}",
        f"- exact parameters: {plan.n_params:,} ({plan.n_params / plan.n_opt - 1:+.2%} vs N_opt)",
        f"- tokens: {plan.tokens:,} = {plan.steps:,} steps x {plan.global_batch} sequences x "
        f"{plan.tokens_per_sequence} tokens ({plan.tokens_per_param:.1f} tokens/parameter)",
        f"- predicted loss L(N, D) = {plan.predicted_loss:.4f} nats/token (at N_opt, D_opt: "
        f"{plan.predicted_loss_at_opt:.4f}); on another corpus or tokenizer only the trend carries over",
        "",
        "## Compute",
        f"- 6ND = {plan.flops_6nd:.4g} FLOPs; exact per-layer count = {plan.flops_exact:.4g} FLOPs "
        f"({plan.flops_exact / plan.flops_6nd:.3f} x 6ND)",
        f"- per step: {plan.flops_per_step:.4g} FLOPs (forward breakdown: "
        + ", ".join(f"{k} {v:.3g}" for k, v in plan.flops_breakdown_per_step.items() if k not in ("forward", "training"))
        + ")",
        f"- batch: {plan.global_batch} sequences of {plan.seq_len} tokens"
        + (f" (decoder targets {plan.target_len})" if plan.target_len else "")
        + f" = {plan.global_batch * plan.tokens_per_sequence:,} tokens/step; micro-batch {plan.micro_batch} x "
        f"accumulation {plan.accumulate_grad_batches} x {plan.n_gpus} GPUs; lr {plan.lr:.3g}, warmup "
        f"{plan.warmup_steps} steps (DeepSeek LLM 2024 eq. 1)",
        f"- time: {plan.wall_clock_hours:.3g} h wall-clock on {plan.n_gpus} x {plan.gpu} at MFU "
        f"{plan.request['mfu']:g} ({plan.peak_flops_per_gpu / 1e12:.1f} TFLOP/s peak each) = "
        f"{plan.gpu_hours:.4g} GPU-hours",
        "",
        "## Memory per GPU",
        f"Chosen: **{plan.strategy}** + {plan.precision} ({PRECISIONS[plan.precision].mode})"
        + (" with activation checkpointing" if plan.activation_checkpointing else "")
        + f": weights {mem['weights_gb']:.2f} + gradients {mem['gradients_gb']:.2f} + optimizer "
        f"{mem['optimizer_gb']:.2f} + activations {mem['activations_gb']:.2f} + buffers {mem['buffers_gb']:.2f} + "
        f"autocast weight copies {mem.get('weight_copies_gb', 0.0):.2f} = "
        f"**{mem['total_gb']:.2f} GB** of {plan.gpu_memory_gb:.0f} GB (fits under 90%)",
        "",
        f"Total GB per GPU at micro-batch {plan.micro_batch} (no activation checkpointing / with); "
        "`-` = not in conf/strategy, `x` = refused by the strategy x precision matrix on this GPU:",
        "",
        "| strategy | " + " | ".join(PRECISIONS) + " |",
        "|---|" + "---|" * len(PRECISIONS),
    ]
    rows: dict[str, dict[str, list]] = {}
    for r in plan.memory_table:
        rows.setdefault(r["strategy"], {}).setdefault(r["precision"], []).append(r)
    for strategy, by_precision in rows.items():
        cells = []
        for precision in PRECISIONS:
            no_ckpt, ckpt = sorted(by_precision[precision], key=lambda r: r["checkpointing"])
            mark = " -" if not no_ckpt["available"] else " x" if no_ckpt.get("refused") else ""
            cells.append(f"{no_ckpt['total_gb']:.1f} / {ckpt['total_gb']:.1f}{mark}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Run", "", f"    {run_command}", ""]
    if plan.notes:
        lines += ["## Notes", *[f"- {n}" for n in plan.notes], ""]
    return "\n".join(lines)


def run_command(name: str, conf_root: Path) -> str:
    cmd = f"python3 -m framework train experiment={name}"
    if Path(conf_root).resolve() != REPO_CONF.resolve():
        cmd += f" 'hydra.searchpath=[file://{Path(conf_root).resolve()}]'"
    return cmd


def write_plan(plan: Plan, name: str, conf_root: Path = REPO_CONF) -> dict[str, Path]:
    """Write ``<conf_root>/experiment/<name>.yaml`` and ``.plan.json`` / ``.plan.md`` beside it, after the
    experiment has composed and passed ``framework.validate`` on the plan's GPU (nothing written otherwise)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--name {name!r} may only hold letters, digits, '_', '-' and '.'.")
    out = Path(conf_root) / "experiment"
    cmd = run_command(name, conf_root)
    exp = OmegaConf.to_yaml(OmegaConf.create(experiment_dict(plan, name)))
    header = (f"# @package _global_\n# Written by fw-plan: {plan.budget_description}, law {plan.law}: "
              f"N = {plan.n_params:,} parameters, D = {plan.tokens:,} tokens, strategy {plan.strategy}.\n"
              f"# Details in {name}.plan.md / {name}.plan.json. Run: {cmd}\n")
    validate_experiment(header + exp, name, plan, conf_root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"experiment": out / f"{name}.yaml", "json": out / f"{name}.plan.json", "markdown": out / f"{name}.plan.md"}
    paths["experiment"].write_text(header + exp)
    paths["json"].write_text(json.dumps({"name": name, "run": cmd, **plan.as_dict()}, indent=2, default=str))
    paths["markdown"].write_text(render_markdown(plan, name, cmd))
    return paths


def validate_experiment(text: str, name: str, plan: Plan, conf_root: Path = REPO_CONF) -> None:
    """Compose ``experiment=<name>`` from ``text`` (written to a scratch config root searched before
    ``conf_root``) and run the training config's checks on a device like the plan's GPU: a plan that training
    would refuse is not written."""
    import tempfile

    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from framework.config import compose as compose_train_config
    from framework.distributed.precision import DeviceInfo
    from framework.scaling.hardware import get_accelerator
    from framework.validate import validate

    acc = get_accelerator(plan.request["gpu"])
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "experiment").mkdir()
        (Path(scratch) / "experiment" / f"{name}.yaml").write_text(text)
        custom = Path(conf_root).resolve()
        roots = [Path(scratch)] + ([custom] if custom != REPO_CONF.resolve() and custom.is_dir() else [])
        GlobalHydra.instance().clear()
        try:
            cfg = compose_train_config([f"hydra.searchpath=[{','.join(f'file://{r}' for r in roots)}]",
                                        f"experiment={name}"])
        except HydraException as err:
            raise ValueError(f"the plan's experiment does not compose ({err}).".replace("\n", " ")) from err
        finally:
            GlobalHydra.instance().clear()
    try:
        validate(cfg, device=DeviceInfo("cuda", acc.name, "bf16" in acc.peak_flops))
    except ValueError as err:
        raise ValueError(f"the plan would not train: {err}") from err


def default_name(req: PlanRequest) -> str:
    return f"plan_{req.objective}_{req.budget.flops:.2e}".replace("+", "").replace(".", "p")
