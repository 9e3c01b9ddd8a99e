"""GPU check of the throughput callback: FLOPs per step, tokens/s and MFU for one family, bf16-mixed.

    python3 bench/mfu_per_family.py <preset> <objective> <micro_batch> <seq_len> <steps>
    python3 bench/mfu_per_family.py gpt2-small clm 16 1024 40

Trains on random tokens (vocab 32000) through Lightning with the ThroughputMonitor, prints the measured
FLOPs per step beside the planner's closed-form count and 6*N*B*T, the callback's last tokens/s and MFU,
and FlopCounterMode on the real GPU step (which also counts the flash-attention backward's recompute).
Needs CUDA. Results go in bench/RESULTS.md with the device, the command and the date.
"""
import csv, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import lightning as L
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from framework.callbacks.throughput import ThroughputMonitor, measure_training_flops
from framework.data.tokenizer import SpecialIds
from framework.models import ModelConfig
from framework.objectives import objective_class
from framework.data.objective_batches import batch_collator, window_length
from framework.objectives.base import module_kwargs
from framework.objectives.config import ObjectiveConfig, OptimConfig
from framework.scaling.flops import training_flops_per_step

if not torch.cuda.is_available():
    sys.exit("bench/mfu_per_family.py needs a CUDA GPU; on a CPU the throughput callback reports no MFU.")
torch.set_float32_matmul_precision("high")
preset, objective, B, T, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
special = SpecialIds(0, 1, 2, 3, 4, tuple(range(5, 105)))
cfg = ModelConfig.from_name(preset, vocab_size=32000)
cls = objective_class(objective)
module = cls(**module_kwargs(cfg, OptimConfig(warmup_steps=5), ObjectiveConfig(name=objective), special, steps))
window = window_length(module.objective_config, T)
collate = batch_collator(module.objective_config, T, special, cfg.vocab_size)
g = torch.Generator().manual_seed(0)
data = [torch.randint(105, 32000, (window,), generator=g) for _ in range(B * steps)]
loader = DataLoader(data, batch_size=B, collate_fn=(lambda xs: collate(torch.stack(xs))) if collate else None)
out = os.environ.get("OUT", "/tmp")
mon = ThroughputMonitor(window=10)
trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, precision="bf16-mixed",
                    logger=L.pytorch.loggers.CSVLogger(out, name=preset), callbacks=[mon], log_every_n_steps=1,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
t0 = time.time()
trainer.fit(module, train_dataloaders=loader)
rows = [r for r in csv.DictReader(open(next(Path(out, preset).rglob("metrics.csv")))) if r.get("throughput/mfu")]
last = rows[-1]
batch = next(iter(loader))
formula = training_flops_per_step(cfg, B, T, batch["labels"].shape[1] if objective == "span_corruption" else None,
                                  head_rows=int((batch["labels"] != -100).sum()) if objective == "mlm" else None)
print(f"{preset} {objective} B={B} T={T}: params {cfg.num_parameters():,}; measured FLOPs/step {mon.flops_per_micro_batch:.4e}; "
      f"planner formula (first batch) {formula:.4e}; 6*N*B*T {6 * cfg.num_parameters() * B * T:.4e}")
print(f"  step {last['step']}: tokens/s {float(last['throughput/tokens_per_sec']):,.0f}  samples/s "
      f"{float(last['throughput/samples_per_sec']):.1f}  step {float(last['throughput/step_time_s'])*1e3:.1f} ms  "
      f"FLOP/s {float(last['throughput/flops_per_sec']):.4e}  MFU {float(last['throughput/mfu']):.4f}  "
      f"cum FLOPs {float(last['compute/flops']):.4e}  PF-days {float(last['compute/pf_days']):.3e}  wall {time.time()-t0:.1f}s")
module.cuda()
batch = {k: v.cuda() for k, v in batch.items()} if isinstance(batch, dict) else batch.cuda()
counter = FlopCounterMode(display=False)
with counter, torch.autocast("cuda", dtype=torch.bfloat16):
    loss, _ = module.compute_loss(batch)
    loss.backward()
print(f"  FlopCounterMode on the real GPU step {counter.get_total_flops():.6e} vs meta measurement "
      f"{measure_training_flops(module, batch):.6e}")
