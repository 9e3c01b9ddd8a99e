"""Training speed per model family on one device: Lightning beside a raw PyTorch loop (issue 8).

    python3 bench/train_speed.py                        # the GPU table: 124M / 350M / 1.3B causal LM, BERT-base MLM,
                                                        # T5-base span corruption; bf16-mixed, compiled blocks
    python3 bench/train_speed.py --rows gpt2-small:clm:32:1024 --steps 50
    python3 bench/train_speed.py --tiny                 # CPU check at a tiny size (fp32, no compile)

For every row the same model is trained twice from the same seed and weights, on the same batches in the
same order: once through Lightning as ``framework.run`` drives it (``PretrainModule`` of the objective,
``PretrainDataModule`` over memory-mapped token shards, ``ThroughputMonitor``, the RNG-state and preemption
callbacks, gradient clipping, the framework's per-block ``torch.compile``; no checkpoint writes), once by a plain loop (the same ``compute_loss``, the optimizer and
schedule from ``configure_optimizers``, the same autocast, clipping and loader). Both are timed the same way:
the device is synchronised at the two edges of the measured window only (after the ``--warmup`` steps and
after the last step), so the ratio of their step times is Lightning's overhead.

The data are random token ids written as one uint16 shard (the framework's real loader path: ``PackedWindows``,
``MixtureSampler``, the objective's collator in ``num_workers`` processes, pinned memory on CUDA), so the
data-wait fraction (seconds blocked in the loader's ``next()`` / window seconds, counted by
``TimedDataLoader``) is the real loader's.

Columns: tokens/s = input tokens per step (``batch_tokens``: T5 counts encoder input tokens) / step time;
F/step = FLOPs of one training step, matrix multiplies only, measured by ``FlopCounterMode`` on a meta copy
(``measure_training_flops``; the convention of ``framework/scaling/flops.py``: attention scores Q K^T and A V
counted over the full T x T, causal or not; recomputation not counted), so
MFU = F/step / (step time x P) with P the device's dense peak (PaLM's model FLOPs utilization, Chowdhery et
al. 2022, App. B); peak memory = ``torch.cuda.max_memory_allocated`` over the Lightning run; planner = the
planner's estimate (``framework.scaling.memory.estimate_memory``, strategy auto, 1 GPU, no checkpointing);
both in GB = 1e9 bytes. attention = the SDPA backends that accept this model's attention calls, each tried
alone on one micro-batch (forward + backward).

``--optim muon`` trains every row with Muon for the blocks' matrices and AdamW for the rest (``optim=muon``;
the ``optimizer`` column): its step time beside an ``--optim adamw`` run is Muon's cost (Newton-Schulz
matrix multiplies, not counted in F/step or MFU).

Imports nothing that the GPU image lacks (no hydra, datasets, wandb, deepspeed).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from framework.callbacks.preemption import PreemptionCallback  # noqa: E402
from framework.callbacks.throughput import ThroughputMonitor, measure_training_flops, resolve_peak_flops  # noqa: E402
from framework.data.datamodule import PretrainDataModule  # noqa: E402
from framework.data.objective_batches import window_length  # noqa: E402
from framework.data.prepare import PreparedData  # noqa: E402
from framework.data.tokenizer import SpecialIds  # noqa: E402
from framework.checkpointing.checkpoints import ResumeStateCallback  # noqa: E402
from framework.distributed.config import StrategyConfig  # noqa: E402
from framework.distributed.parallelize import Parallelizer  # noqa: E402
from framework.models import ModelConfig  # noqa: E402
from framework.objectives import objective_class  # noqa: E402
from framework.objectives.base import module_kwargs  # noqa: E402
from framework.objectives.config import ObjectiveConfig, OptimConfig  # noqa: E402
from framework.scaling.hardware import detect_accelerator  # noqa: E402
from framework.catalogue import PRECISION_BY_MODE  # noqa: E402
from framework.scaling.memory import GB, estimate_memory  # noqa: E402
from framework.scaling.planner import sequence_lengths  # noqa: E402

SPECIAL = SpecialIds(0, 1, 2, 3, 4, tuple(range(5, 105)))
FIRST_REGULAR_ID = 105
# vocabularies of the reference models: GPT-2's BPE, BERT's WordPiece, T5's SentencePiece (+ 100 sentinels)
VOCAB = {"clm": 50257, "mlm": 30522, "span_corruption": 32100}
# issue 8's sizes: causal LM ~124M / 350M / 1.3B, BERT-base MLM, T5-base span corruption (micro-batches sized
# for one 80 GB H100 without activation checkpointing)
GPU_ROWS = ("gpt2-small:clm:32:1024", "gpt2-medium:clm:16:1024", "gpt-1.3b:clm:8:2048", "bert-base:mlm:64:512",
            "t5-base:span_corruption:64:512")
TINY_ROWS = ("tiny:clm:4:32", "bert-tiny:mlm:4:32", "t5-tiny:span_corruption:4:32")
MODE_PRECISION = {mode: spec.option for mode, spec in PRECISION_BY_MODE.items()}  # "bf16-mixed" -> "bf16"
COLUMNS = ("model", "objective", "optimizer", "params", "seq len", "batch", "tokens/s", "MFU", "F/step",
           "Lightning step ms", "raw step ms", "Lightning/raw", "data wait", "peak mem GB", "planner GB", "peak/planner", "attention")


@dataclass
class Row:
    preset: str
    objective: str
    micro_batch: int
    seq_len: int
    vocab_size: int = 0  # 0 = the objective's reference vocabulary (VOCAB)

    @classmethod
    def parse(cls, text: str, vocab_size: int = 0) -> "Row":
        try:
            preset, objective, b, t = text.split(":")
            return cls(preset, objective, int(b), int(t), vocab_size)
        except ValueError:
            raise SystemExit(f"--rows entry {text!r} is not preset:objective:micro_batch:seq_len "
                             "(e.g. gpt2-small:clm:32:1024).") from None


@dataclass
class Options:
    device: str = "cuda"
    precision: str = "bf16-mixed"
    compile: bool = True
    warmup: int = 10  # steps before the measured window (compilation, allocator warm-up)
    steps: int = 30  # measured steps
    num_workers: int = -1  # data.num_workers: -1 = auto
    gradient_clip: float = 1.0
    log_every_n_steps: int = 10  # the framework's default (conf/trainer/default.yaml)
    peak_flops: float = 0.0  # 0 = the device's from framework/scaling/hardware.py (none on CPU)
    seed: int = 1234
    raw: bool = True
    fingerprints: bool = False  # record a checksum of every batch in both runs (tests: the same batches)
    profile_dir: str = ""  # profile the last PROFILE_STEPS warm-up steps of the Lightning run into this folder
    optim: str = "adamw"  # optim.name: adamw, or muon (Muon for the blocks' matrices + AdamW for the rest)
    document_mask: bool = False  # data.document_mask: attention inside each packed document
    label: str = ""  # the row's name in the table (gpu_check.sh); "" = the preset
    document_tokens: int = 0  # mean document length of the random data (an <eos> planted on average this often)


# ------------------------------------------------------------------ data: random tokens as a memory-mapped shard
def random_token_data(directory: Path, tokens: int, vocab_size: int, seed: int = 0,
                      document_tokens: int = 0) -> PreparedData:
    """A ``PreparedData`` of ``tokens`` uniform random ids in [105, vocab_size) (no special ids), split 15:1;
    ``document_tokens`` > 0: documents of geometric length with that mean, each closed by an ``<eos>``."""
    shard_dir = Path(directory) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    val = max(tokens // 16, 4096)
    for name, n in (("train_00000.bin", tokens), ("val_00000.bin", val)):
        ids = rng.integers(FIRST_REGULAR_ID, vocab_size, n, dtype=np.uint16)
        if document_tokens:
            ids[rng.random(n) < 1.0 / document_tokens] = SPECIAL.eos
        ids.tofile(shard_dir / name)
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "tokenizer_hash": f"random-{seed}",
            "shards": {"train": ["train_00000.bin"], "val": ["val_00000.bin"]},
            "special_ids": dataclasses.asdict(SPECIAL)}
    return PreparedData(Path(directory), meta)


# ------------------------------------------------------------------ shared construction
def build_module(row: Row, opts: Options, vocab_size: int):
    """The objective's LightningModule from ``opts.seed`` (identical weights on every call), with the
    framework's per-block compile as its parallelizer."""
    cfg = ModelConfig.from_name(row.preset, vocab_size=vocab_size)
    cls = objective_class(row.objective)
    total = opts.warmup + opts.steps
    optim = OptimConfig(warmup_steps=max(1, total // 10), name=opts.optim)
    torch.manual_seed(opts.seed)
    module = cls(**module_kwargs(cfg, optim, ObjectiveConfig(name=row.objective), SPECIAL, total))
    module.parallelizer = Parallelizer(StrategyConfig(name="auto", compile=opts.compile), opts.precision)
    return module


def build_datamodule(module, row: Row, opts: Options, prepared: PreparedData, num_workers: int | None = None
                     ) -> PretrainDataModule:
    workers = opts.num_workers if num_workers is None else num_workers
    return PretrainDataModule.for_objective(prepared, module.objective_config, row.seq_len, row.micro_batch,
                                            document_mask=opts.document_mask, vocab_size=module.model_config.vocab_size,
                                            seed=opts.seed, num_workers=workers, val_windows=row.micro_batch)


def first_batch(module, row: Row, opts: Options, prepared: PreparedData):
    """The first training batch both runs see (loaded in this process)."""
    return next(iter(build_datamodule(module, row, opts, prepared, num_workers=0).train_dataloader()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_fingerprint(batch) -> torch.Tensor:
    """A position-weighted checksum of a batch's tensors, on their device (no synchronisation)."""
    tensors = [batch[k] for k in sorted(batch)] if isinstance(batch, dict) else [batch]
    return sum((t.long().flatten() * torch.arange(1, t.numel() + 1, device=t.device)).sum() for t in tensors)


def _to_device(batch, device: torch.device):
    # as Lightning's move_data_to_device: non-blocking copies to CUDA (the loader pins the memory)
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items()}
    return batch.to(device, non_blocking=device.type == "cuda")


@dataclass
class Measurement:
    losses: list[float]  # per step, all steps
    step_s: float  # mean seconds per step over the measured window
    wait_s: float  # seconds blocked in the loader's next() in the window
    peak_bytes: float | None = None
    fingerprints: list[int] | None = None


PROFILE_STEPS = 3


class ProfileWarmupSteps(L.Callback):
    """torch.profiler over the last ``PROFILE_STEPS`` warm-up micro-batches (after compilation, before the
    timed window, so the timing is not disturbed): writes a Chrome trace and the top operators by device
    time (CPU time on a CPU) to ``directory``."""

    def __init__(self, directory: Path, warmup: int, name: str) -> None:
        self.directory, self.name = Path(directory), name
        self.first, self.last = warmup - PROFILE_STEPS, warmup - 1  # 0-based batch indices
        self.profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last and self.profiler is not None:
            _sync(pl_module.device)
            self.profiler.__exit__(None, None, None)
            self.directory.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.directory / f"{self.name}.trace.json"))
            sort = "self_cuda_time_total" if pl_module.device.type == "cuda" else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort, row_limit=25)
            (self.directory / f"{self.name}.top_ops.txt").write_text(table)
            self.profiler = None


class WindowTimer(L.Callback):
    """Synchronises and reads the clock after micro-batch ``warmup`` and after the last one; keeps each step's
    loss on the device (read once at the end, no per-step synchronisation)."""

    def __init__(self, warmup: int, total: int, fingerprints: bool = False) -> None:
        self.warmup, self.total, self.record_fingerprints = warmup, total, fingerprints
        self.losses: list[torch.Tensor] = []
        self.fingerprints: list[torch.Tensor] = []
        self.edges: list[tuple[float, float]] = []  # (seconds, loader wait seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())
        if self.record_fingerprints:
            self.fingerprints.append(batch_fingerprint(batch))
        if len(self.losses) in (self.warmup, self.total):
            _sync(pl_module.device)
            self.edges.append((time.perf_counter(), float(getattr(trainer.train_dataloader, "wait_s", 0.0))))


def run_lightning(row: Row, opts: Options, prepared: PreparedData) -> tuple[Measurement, dict]:
    module = build_module(row, opts, prepared.vocab_size)
    datamodule = build_datamodule(module, row, opts, prepared)
    total = opts.warmup + opts.steps
    timer = WindowTimer(opts.warmup, total, opts.fingerprints)
    monitor = ThroughputMonitor(window=opts.steps, peak_flops_per_device=opts.peak_flops)
    # framework.run's per-step callbacks too (checkpoint writes excluded): RNG bookkeeping, the preemption check
    callbacks = [timer, monitor, ResumeStateCallback(),
                 PreemptionCallback(Path(prepared.directory) / "checkpoints", requeue=False)]
    if opts.profile_dir:  # first: its trace is written before the timer's first edge
        callbacks.insert(0, ProfileWarmupSteps(Path(opts.profile_dir), opts.warmup, f"{row.preset}-{row.objective}"))
    device = torch.device(opts.device)
    baseline = 0
    if device.type == "cuda":  # peak over this run only: what earlier rows left allocated is subtracted
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = L.Trainer(
        max_steps=total, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=opts.precision,
        gradient_clip_val=opts.gradient_clip or None, logger=False, callbacks=callbacks,
        log_every_n_steps=opts.log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    (t0, w0), (t1, w1) = timer.edges
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    batch = first_batch(module, row, opts, prepared)
    info = {"flops_per_step": monitor.flops_per_micro_batch or measure_training_flops(module, batch),
            "params": module.model_config.num_parameters(), "tokens_per_step": module.batch_tokens(batch),
            "batch_shapes": {k: list(v.shape) for k, v in batch.items()} if isinstance(batch, dict) else list(batch.shape)}
    if isinstance(batch, dict) and "labels" in batch and row.objective == "span_corruption":
        info["target_len"] = int(batch["labels"].shape[1])
    measurement = Measurement([float(x) for x in torch.stack(timer.losses).cpu()], (t1 - t0) / opts.steps, w1 - w0, peak,
                              [int(x) for x in timer.fingerprints])
    del trainer, module
    return measurement, info


def run_raw(row: Row, opts: Options, prepared: PreparedData) -> Measurement:
    """The same model, batches, optimizer, schedule, autocast, clipping and compile, in a plain loop."""
    device = torch.device(opts.device)
    module = build_module(row, opts, prepared.vocab_size)
    module.parallelizer(module.model, None)  # per-block compile, as configure_model does
    module.to(device).train()
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]  # Lightning clips these
    loader = build_datamodule(module, row, opts, prepared).train_dataloader()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if opts.precision == "bf16-mixed"
                else torch.autocast(device.type, dtype=torch.float16) if opts.precision == "16-mixed"
                else contextlib.nullcontext())
    total = opts.warmup + opts.steps
    losses, edges, fingerprints = [], [], []
    batches = iter(loader)
    for step in range(1, total + 1):
        batch = _to_device(next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = module.compute_loss(batch)
        loss.backward()
        if opts.gradient_clip:
            torch.nn.utils.clip_grad_norm_(params, opts.gradient_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if opts.fingerprints:
            fingerprints.append(batch_fingerprint(batch))
        if step in (opts.warmup, total):
            _sync(device)
            edges.append((time.perf_counter(), loader.wait_s))
    (t0, w0), (t1, w1) = edges
    measurement = Measurement([float(x) for x in torch.stack(losses).cpu()], (t1 - t0) / opts.steps, w1 - w0,
                              fingerprints=[int(x) for x in fingerprints])
    del module, optimizer
    return measurement


def attention_backends(row: Row, opts: Options, prepared: PreparedData) -> str:
    """The SDPA backends that accept this model's attention calls: each one alone, forward + backward of one
    eager micro-batch of 1 sequence under bf16 autocast (the backward kernel follows the forward's choice).
    'n/a' on CPU (only the C++ math/flash CPU kernels)."""
    device = torch.device(opts.device)
    if device.type != "cuda":
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    one = dataclasses.replace(row, micro_batch=1)
    module = build_module(one, opts, prepared.vocab_size).to(device)
    batch = _to_device(first_batch(module, one, opts, prepared), device)
    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = module.compute_loss(batch)
            loss.backward()
            ok.append(backend.name.replace("_ATTENTION", "").lower())
        except RuntimeError:
            pass
        module.zero_grad(set_to_none=True)
    del module
    return "+".join(ok) or "math only"


# ------------------------------------------------------------------ one row, the table
def peak_for(opts: Options) -> tuple[float | None, str]:
    """The device's dense peak FLOP/s for the run's precision, as the throughput callback resolves it."""
    if opts.peak_flops > 0:
        return opts.peak_flops, "--peak-flops"
    gpu = detect_accelerator() if opts.device.startswith("cuda") else None
    peak, source = resolve_peak_flops(gpu, opts.precision)
    return peak, (f"{source} dense" if peak else "unknown on this device (give --peak-flops)")


def bench_row(row: Row, opts: Options, prepared: PreparedData) -> dict:
    lightning, info = run_lightning(row, opts, prepared)
    raw = run_raw(row, opts, prepared) if opts.raw else None
    attention = attention_backends(row, opts, prepared)
    torch._dynamo.reset()  # compiled blocks of this row's modules are not reused; let them go
    gc.collect()
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    cfg = ModelConfig.from_name(row.preset, vocab_size=prepared.vocab_size)
    planner = estimate_memory(cfg, info["params"], "auto", MODE_PRECISION.get(opts.precision, "fp32"), 1,
                              row.micro_batch, row.seq_len, target_len=info.get("target_len"),
                              head_rows=sequence_lengths(row.objective, row.seq_len)[1])  # MLM: selected rows
    peak, _ = peak_for(opts)
    step_s = lightning.step_s
    result = {
        "model": row.preset, "label": opts.label, "document_mask": opts.document_mask, "objective": row.objective,
        "optim": opts.optim, "params": info["params"], "seq_len": row.seq_len,
        "target_len": info.get("target_len"), "micro_batch": row.micro_batch, "vocab_size": prepared.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size, "tokens_per_step": info["tokens_per_step"],
        "tokens_per_sec": info["tokens_per_step"] / step_s, "flops_per_step": info["flops_per_step"],
        "peak_flops": peak, "mfu": info["flops_per_step"] / (step_s * peak) if peak else None,
        "lightning_step_s": step_s, "raw_step_s": raw.step_s if raw else None,
        "lightning_over_raw": step_s / raw.step_s if raw else None,
        "data_wait_fraction": lightning.wait_s / (step_s * opts.steps),
        "raw_data_wait_fraction": raw.wait_s / (raw.step_s * opts.steps) if raw else None,
        "peak_memory_gb": lightning.peak_bytes / GB if lightning.peak_bytes is not None else None,
        "planner_memory_gb": planner.total / GB, "attention": attention,
        "lightning_losses": lightning.losses, "raw_losses": raw.losses if raw else None,
        "lightning_batches": lightning.fingerprints, "raw_batches": raw.fingerprints if raw else None,
        "device": torch.cuda.get_device_name(0) if opts.device.startswith("cuda") else "cpu",
        "precision": opts.precision, "compile": opts.compile, "warmup": opts.warmup, "steps": opts.steps,
    }
    return result


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: list[dict], opts: Options) -> str:
    peak, source = peak_for(opts)
    lines = [
        f"MFU = F/step / (Lightning step time x P); F/step = FLOPs of one training step (forward + backward, matrix "
        f"multiplies only, attention scores Q.K^T and A.V included over the full T x T, no recomputation; "
        f"FlopCounterMode on a meta copy); P = {_fmt(peak, '.4g')} FLOP/s ({source}). tokens/s from the "
        f"Lightning step time; data wait = loader next() seconds / window seconds (Lightning run); memory in GB "
        f"= 1e9 bytes; {opts.precision}, compile={opts.compile}, {opts.warmup} warm-up + {opts.steps} measured steps.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("model", "objective", "optimizer", "attention") else "---:" for c in COLUMNS) + "|",
    ]
    for r in results:
        seq = f"{r['seq_len']}/{r['target_len']}" if r.get("target_len") else str(r["seq_len"])
        ratio = r["peak_memory_gb"] / r["planner_memory_gb"] if r["peak_memory_gb"] is not None else None
        cells = [r.get("label") or r["model"], r["objective"] + (" +docmask" if r.get("document_mask") else ""), r.get("optim", "adamw"), f"{r['params']:,}", seq, str(r["micro_batch"]),
                 f"{r['tokens_per_sec']:,.0f}", _fmt(r["mfu"], ".4f"), f"{r['flops_per_step']:.4e}",
                 f"{r['lightning_step_s'] * 1e3:.2f}", _fmt(r["raw_step_s"] and r["raw_step_s"] * 1e3, ".2f"),
                 _fmt(r["lightning_over_raw"], ".4f"), f"{r['data_wait_fraction']:.4f}",
                 _fmt(r["peak_memory_gb"], ".3g"), f"{r['planner_memory_gb']:.3g}", _fmt(ratio, ".3f"), r["attention"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a table ``format_table`` printed, as {column: cell} (for tests and for merging runs)."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in rows[1:]]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", help="preset:objective:micro_batch:seq_len (default: issue 8's five rows)")
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny presets, fp32, no compile, few steps")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed; --tiny: 32-true)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw PyTorch loop")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=-1, help="data.num_workers (-1 = auto)")
    parser.add_argument("--vocab-size", type=int, default=0, help="one vocabulary for every row (0 = per objective)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s of the device (default: table)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 1 with --tiny: on a "
                        "loaded machine OpenMP threads that wait for each other make tiny steps ~50x slower)")
    parser.add_argument("--jsonl", default="", help="append each row's full result (losses included) here")
    parser.add_argument("--data-dir", default="", help="where the random-token shard is written (default: a temp dir)")
    parser.add_argument("--profile", default="", help="folder for a torch.profiler trace + top-ops table of the "
                        f"last {PROFILE_STEPS} warm-up steps of each Lightning run (needs --warmup > {PROFILE_STEPS})")
    parser.add_argument("--label", default="", help="the row's name in the table (default: the model preset)")
    parser.add_argument("--document-mask", action="store_true", help="data.document_mask=true; the random data get "
                        "documents of --document-tokens tokens on average")
    parser.add_argument("--document-tokens", type=int, default=256, help="mean document length with --document-mask")
    parser.add_argument("--optim", default="adamw", choices=("adamw", "muon"),
                        help="optimizer of every row (muon: Muon for the blocks' matrices, AdamW for the rest)")
    parser.add_argument("--table-from", nargs="+", default=[], help="print the table of rows saved by --jsonl, run nothing")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = [json.loads(line) for path in args.table_from for line in Path(path).read_text().splitlines() if line]
        first = saved[0]
        opts = Options(device="cuda" if first["device"] != "cpu" else "cpu", precision=first["precision"],
                       compile=first["compile"], warmup=first["warmup"], steps=first["steps"],
                       peak_flops=first["peak_flops"] or 0.0)
        print(f"device: {first['device']}")
        print(format_table(saved, opts))
        return saved

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is visible; use --device cpu (or --tiny).")
    opts = Options(device=device, precision=args.precision or ("32-true" if args.tiny or device == "cpu" else "bf16-mixed"),
                   compile=not (args.no_compile or args.tiny or device == "cpu"), raw=not args.no_raw,
                   warmup=args.warmup if args.warmup is not None else (2 if args.tiny else 10),
                   steps=args.steps if args.steps is not None else (4 if args.tiny else 30),
                   num_workers=args.num_workers, peak_flops=args.peak_flops, profile_dir=args.profile,
                   optim=args.optim, document_mask=args.document_mask, label=args.label,
                   document_tokens=args.document_tokens if args.document_mask else 0)
    if opts.warmup < 1 or opts.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the window's first edge follows a warm-up step).")
    if opts.profile_dir and opts.warmup <= PROFILE_STEPS:
        raise SystemExit(f"--profile traces the last {PROFILE_STEPS} warm-up steps after the first one; "
                         f"use --warmup {PROFILE_STEPS + 2} or more.")
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    threads = args.threads or (1 if args.tiny else 0)
    if threads:
        torch.set_num_threads(threads)
    rows = [Row.parse(r, args.vocab_size) for r in (args.rows or (TINY_ROWS if args.tiny else GPU_ROWS))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(args.data_dir or tmp)
        total = opts.warmup + opts.steps
        for row in rows:
            vocab = row.vocab_size or (512 if args.tiny else VOCAB[row.objective])
            window = window_length(ObjectiveConfig(name=row.objective), row.seq_len)
            tokens = 2 * total * row.micro_batch * window + 8 * window  # two epochs' worth never needed; slack
            prepared = random_token_data(data_root / f"{row.preset}-{row.objective}-{vocab}", tokens, vocab, opts.seed,
                                         opts.document_tokens)
            result = bench_row(row, opts, prepared)
            results.append(result)
            print(format_table([result], opts).splitlines()[-1], flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(result) + "\n")
    print()
    print(format_table(results, opts))
    return results


if __name__ == "__main__":
    main()
