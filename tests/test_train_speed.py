"""bench/train_speed.py at a tiny size on the CPU, and the speed work it measures: no host reads between
logging steps, fused AdamW selection, loader settings, the data-wait measurement."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch

from framework.callbacks.throughput import ThroughputMonitor
from framework.data.datamodule import PREFETCH_FACTOR, TimedDataLoader, resolve_num_workers
from framework.models import ModelConfig
from framework.objectives.base import adamw_kernel
from framework.scaling.flops import training_flops_per_step
from framework.scaling.memory import GB, estimate_memory
from framework.scaling.planner import sequence_lengths

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
ts = importlib.util.module_from_spec(_spec)
sys.modules["train_speed"] = ts  # dataclasses look their module up
_spec.loader.exec_module(ts)

PEAK = 1e11  # a nominal CPU peak, so the table's MFU column can be recomputed
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """The three tiny rows: Lightning and the raw loop, fp32 on the CPU, no compile, 2 + 3 steps."""
    opts = ts.Options(device="cpu", precision="32-true", compile=False, warmup=2, steps=3, peak_flops=PEAK,
                      num_workers=0, fingerprints=True)
    root = tmp_path_factory.mktemp("bench")
    results = []
    for text in ts.TINY_ROWS:
        row = ts.Row.parse(text)
        prepared = ts.random_token_data(root / text.replace(":", "-"), 20_000, VOCAB, seed=opts.seed)
        results.append(ts.bench_row(row, opts, prepared))
    return opts, results


def test_raw_loop_sees_the_same_batches_and_gives_the_same_losses(tiny_results):
    _, results = tiny_results
    assert [r["objective"] for r in results] == ["clm", "mlm", "span_corruption"]
    for r in results:
        assert len(r["lightning_batches"]) == len(r["raw_batches"]) == 5
        assert r["lightning_batches"] == r["raw_batches"], r["objective"]  # same batches, same order
        assert len(set(r["raw_batches"])) == 5  # and a new batch every step
        # the same model from the same weights: per-step losses agree (fp32, CPU)
        torch.testing.assert_close(torch.tensor(r["lightning_losses"]), torch.tensor(r["raw_losses"]),
                                   rtol=0, atol=1e-5)
        assert r["lightning_losses"][0] == pytest.approx(math.log(VOCAB), abs=0.3)  # ~uniform at initialisation
        assert r["lightning_losses"] != r["lightning_losses"][::-1]  # training moves the loss


def test_table_has_every_column_and_its_figures_recompute(tiny_results):
    opts, results = tiny_results
    text = ts.format_table(results, opts)
    assert "MFU = F/step / (Lightning step time x P)" in text and "attention scores" in text
    rows = ts.parse_table(text)
    assert [r["model"] for r in rows] == ["tiny", "bert-tiny", "t5-tiny"]
    for row, result in zip(rows, results):
        assert set(row) == set(ts.COLUMNS)
        step_s = float(row["Lightning step ms"]) / 1e3
        flops = float(row["F/step"])
        # MFU from the printed fields (4 significant digits each)
        assert float(row["MFU"]) == pytest.approx(flops / (step_s * PEAK), rel=2e-3)
        batch, seq = int(row["batch"]), int(row["seq len"].split("/")[0])
        assert float(row["tokens/s"].replace(",", "")) == pytest.approx(batch * seq / step_s, rel=2e-3)
        assert float(row["Lightning/raw"]) == pytest.approx(step_s / (float(row["raw step ms"]) / 1e3), rel=2e-3)
        assert 0.0 <= float(row["data wait"]) <= 1.0
        assert row["peak mem GB"] == "n/a" and row["peak/planner"] == "n/a"  # no invented CPU memory figure
        cfg = ModelConfig.from_name(result["model"], vocab_size=VOCAB)
        assert int(row["params"].replace(",", "")) == cfg.num_parameters()
        planner = estimate_memory(cfg, cfg.num_parameters(), "auto", "fp32", 1, batch, seq,
                                  target_len=result["target_len"], head_rows=sequence_lengths(result["objective"], seq)[1])
        assert result["planner_memory_gb"] == pytest.approx(planner.total / GB)
    # the measured FLOPs are the planner's exact count where the objective's head runs on every position
    clm, _, span = results
    assert clm["flops_per_step"] == training_flops_per_step(ModelConfig.from_name("tiny", vocab_size=VOCAB), 4, 32)
    assert span["target_len"] == 8 and span["flops_per_step"] == training_flops_per_step(
        ModelConfig.from_name("t5-tiny", vocab_size=VOCAB), 4, 32, 8)


def test_cli_end_to_end_with_profile(tmp_path, capsys):
    """main(): the table printed, the row saved, the warm-up profile written, and the saved row re-tabled."""
    jsonl = tmp_path / "rows.jsonl"
    ts.main(["--tiny", "--rows", "tiny:clm:2:16", "--warmup", "4", "--steps", "1", "--no-raw", "--peak-flops", "1e11",
             "--profile", str(tmp_path / "prof"), "--jsonl", str(jsonl), "--data-dir", str(tmp_path / "data")])
    printed = ts.parse_table(capsys.readouterr().out.split("\n\n")[-1])
    assert [r["model"] for r in printed] == ["tiny"] and printed[0]["raw step ms"] == "n/a"
    assert "aten::mm" in (tmp_path / "prof" / "tiny-clm.top_ops.txt").read_text()
    assert (tmp_path / "prof" / "tiny-clm.trace.json").stat().st_size > 0
    ts.main(["--table-from", str(jsonl)])
    assert ts.parse_table(capsys.readouterr().out)[0]["MFU"] == printed[0]["MFU"]
    with pytest.raises(SystemExit, match="--warmup 5 or more"):
        ts.main(["--tiny", "--warmup", "3", "--profile", str(tmp_path / "prof")])


def test_cli_refuses_bad_rows_and_missing_gpu():
    with pytest.raises(SystemExit, match="preset:objective:micro_batch:seq_len"):
        ts.Row.parse("gpt2-small:clm:32")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            ts.main(["--device", "cuda"])


# ------------------------------------------------------------------ no host-device synchronisation per step
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def test_no_host_reads_of_tensors_between_logging_steps(tmp_path, monkeypatch):
    """Between logging steps nothing reads a tensor's value on the host (on CUDA each read waits for the GPU):
    no .item()/.tolist()/float()/int()/bool() outside the optimizer's own CPU step counters and the sampler,
    and only the device-side loss is passed to self.log."""
    reads = {"n": 0, "batch": -1}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            stack = traceback.extract_stack(limit=30)[:-1]
            if not any("torch/optim" in f.filename or "torch/utils/data" in f.filename for f in stack):
                reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logged: list[tuple[int, str, bool]] = []
    original_log = L.LightningModule.log

    def log(self, name, value, *args, **kwargs):
        logged.append((reads["batch"], name, isinstance(value, torch.Tensor) and value.device == self.device
                       and value.requires_grad))
        return original_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", log)

    class Reads(L.Callback):
        def __init__(self):
            self.at_start: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.at_start.append(reads["n"])
            reads["batch"] = batch_idx

        def on_train_end(self, trainer, pl_module):
            self.at_start.append(reads["n"])

    opts = ts.Options(device="cpu", precision="32-true", compile=False, warmup=2, steps=3, num_workers=0)
    row = ts.Row.parse("tiny:clm:4:32")
    prepared = ts.random_token_data(tmp_path / "data", 20_000, VOCAB)
    module = ts.build_module(row, opts, VOCAB)
    probe = Reads()
    trainer = L.Trainer(max_steps=9, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[probe, ThroughputMonitor(window=5, peak_flops_per_device=PEAK)],
                        gradient_clip_val=1.0, log_every_n_steps=3, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=ts.build_datamodule(module, row, opts, prepared))
    per_step = [b - a for a, b in zip(probe.at_start, probe.at_start[1:])]  # reads from one step's start to the next
    logging_steps = {2, 5, 8}  # steps 3, 6, 9 (0-based 2, 5, 8) are the loggers' steps
    assert len(per_step) == 9
    assert all(n == 0 for step, n in enumerate(per_step) if step not in logging_steps), per_step
    assert all(per_step[step] > 0 for step in logging_steps)  # the loggers do read the values, once per interval
    for step, name, is_device_loss in logged:
        if step not in logging_steps:
            assert name == "train/loss" and is_device_loss, (step, name)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert sorted({int(r["step"]) for r in rows if r.get("throughput/tokens_per_sec")}) == [2, 5, 8]
    assert all(0.0 <= float(r["throughput/data_wait_fraction"]) <= 1.0 for r in rows
               if r.get("throughput/data_wait_fraction"))


# ops whose output size depends on tensor values (or that return a value to the host): on CUDA each one waits
# for the GPU; boolean-mask indexing runs aten.nonzero underneath
_DATA_DEPENDENT_OPS = {"aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::unique",
                       "aten::_unique2", "aten::repeat_interleave", "aten::masked_scatter"}


@pytest.mark.parametrize("row_text", ["tiny:clm:4:32", "bert-tiny:mlm:4:32", "t5-tiny:span_corruption:4:32"])
def test_loss_step_has_no_data_dependent_shapes(tmp_path, row_text):
    """Every objective's forward + backward on a collated batch runs no op whose output size depends on the
    data: the masked LM's selected rows come as host-computed indices (the collator's predict_index)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    opts = ts.Options(device="cpu", precision="32-true", compile=False, warmup=2, steps=3, num_workers=0)
    row = ts.Row.parse(row_text)
    module = ts.build_module(row, opts, VOCAB)
    batch = ts.first_batch(module, row, opts, ts.random_token_data(tmp_path / "data", 20_000, VOCAB))
    ops = Ops()
    with ops:
        loss, count = module.compute_loss(batch)
        loss.backward()
    assert ops.names & _DATA_DEPENDENT_OPS == set(), sorted(ops.names & _DATA_DEPENDENT_OPS)
    assert "aten::mm" in ops.names or "aten::addmm" in ops.names or "aten::bmm" in ops.names  # the probe saw the step


def test_masked_lm_index_path_equals_the_boolean_mask_path(tmp_path):
    opts = ts.Options(device="cpu", precision="32-true", compile=False, warmup=2, steps=3, num_workers=0)
    row = ts.Row.parse("bert-tiny:mlm:4:32")
    module = ts.build_module(row, opts, VOCAB)
    batch = ts.first_batch(module, row, opts, ts.random_token_data(tmp_path / "data", 20_000, VOCAB))
    selected = batch["labels"] != -100
    assert torch.equal(batch["predict_index"], selected.view(-1).nonzero().squeeze(1))
    loss, count = module.compute_loss(batch)
    without = {k: v for k, v in batch.items() if k != "predict_index"}  # the fallback derives the indices itself
    loss_without, count_without = module.compute_loss(without)
    full = module.model(batch["input_ids"])  # (B, T, V): every position through the head
    reference = torch.nn.functional.cross_entropy(full[selected].float(), batch["labels"][selected])
    assert int(count) == int(count_without) == int(selected.sum())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_without, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on CUDA only")
@pytest.mark.parametrize("row_text", ["tiny:clm:4:32", "bert-tiny:mlm:4:32", "t5-tiny:span_corruption:4:32"])
def test_no_cuda_synchronisation_between_logging_steps(tmp_path, row_text):
    """torch's sync debug mode raises on any synchronising call during steps 3-4 (log_every_n_steps=5)."""
    class SyncGuard(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("error" if batch_idx in (2, 3) else "default")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    opts = ts.Options(device="cuda", precision="bf16-mixed", compile=False, warmup=2, steps=3, num_workers=0)
    row = ts.Row.parse(row_text)
    module = ts.build_module(row, opts, VOCAB)
    datamodule = ts.build_datamodule(module, row, opts, ts.random_token_data(tmp_path / "data", 20_000, VOCAB))
    trainer = L.Trainer(max_steps=5, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        callbacks=[SyncGuard(), ThroughputMonitor()], gradient_clip_val=1.0, log_every_n_steps=5,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 5
    assert module.trainer.optimizers[0].defaults["fused"] is True


# ------------------------------------------------------------------ optimizer and loader settings
def test_adamw_kernel_selection():
    assert adamw_kernel({"cuda"}) == {"fused": True}  # plain tensors and FSDP2 DTensors on CUDA
    assert adamw_kernel({"cuda"}, deepspeed=True) == {"foreach": True}  # ZeRO swaps the parameters for partitions
    assert adamw_kernel({"cpu"}) == {} and adamw_kernel({"cpu", "cuda"}) == {} and adamw_kernel({"meta"}) == {}
    module = ts.build_module(ts.Row.parse("tiny:clm:4:32"), ts.Options(device="cpu", compile=False), VOCAB)
    optimizer = module.configure_optimizers()["optimizer"]
    assert not optimizer.defaults["fused"]  # parameters on the CPU: torch's default implementation
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_worker_count_resolution():
    assert resolve_num_workers(3, on_cuda=True) == 3 and resolve_num_workers(0, on_cuda=True) == 0
    assert resolve_num_workers(-1, on_cuda=False, cpus=64) == 0  # CPU training: load in the main process
    assert resolve_num_workers(-1, on_cuda=True, local_devices=1, cpus=16) == 8  # capped
    assert resolve_num_workers(-1, on_cuda=True, local_devices=2, cpus=12) == 5  # 6 cores each, one for the process
    assert resolve_num_workers(-1, on_cuda=True, local_devices=8, cpus=8) == 1  # at least one
    with pytest.raises(ValueError, match="data.num_workers=-2"):
        resolve_num_workers(-2, on_cuda=True)


def test_loader_kwargs_pin_and_persist(tmp_path, monkeypatch):
    prepared = ts.random_token_data(tmp_path / "data", 20_000, VOCAB)
    row = ts.Row.parse("tiny:clm:4:32")
    module = ts.build_module(row, ts.Options(device="cpu", compile=False), VOCAB)
    datamodule = ts.build_datamodule(module, row, ts.Options(num_workers=2), prepared)
    monkeypatch.setattr(type(datamodule), "_on_cuda", lambda self: False)
    assert datamodule.loader_kwargs() == {"num_workers": 2, "pin_memory": False, "persistent_workers": True,
                                          "prefetch_factor": PREFETCH_FACTOR}
    monkeypatch.setattr(type(datamodule), "_on_cuda", lambda self: True)
    assert datamodule.loader_kwargs()["pin_memory"] is True
    datamodule.num_workers = 0
    assert datamodule.loader_kwargs() == {"num_workers": 0, "pin_memory": True}  # no worker-only options
    monkeypatch.setattr(type(datamodule), "_on_cuda", lambda self: False)
    loader = datamodule.train_dataloader()
    assert isinstance(loader, TimedDataLoader) and all(isinstance(v, TimedDataLoader) for v in datamodule.val_dataloader())
    assert loader.batch_size == 4 and loader.drop_last and not loader.pin_memory


class _SlowCollate:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, items):
        time.sleep(self.seconds)
        return torch.stack(items)


def test_timed_loader_counts_the_seconds_spent_in_next():
    loader = TimedDataLoader([torch.zeros(3)] * 10, batch_size=2, collate_fn=_SlowCollate(0.03))
    start = time.perf_counter()
    batches = list(loader)
    elapsed = time.perf_counter() - start
    assert len(batches) == 5 and loader.batches_fetched == 6  # 5 batches + the StopIteration call
    assert 5 * 0.03 <= loader.wait_s <= elapsed


def test_monitor_reports_the_data_wait_fraction(tmp_path):
    """A loader that sleeps 0.2 s per batch under a model step of a few ms: most of each window is waiting."""
    module = ts.build_module(ts.Row.parse("tiny:clm:2:16"), ts.Options(device="cpu", compile=False), VOCAB)
    windows = [torch.randint(105, VOCAB, (17,)) for _ in range(12)]
    loader = TimedDataLoader(windows, batch_size=2, collate_fn=_SlowCollate(0.2))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[ThroughputMonitor(window=3)], log_every_n_steps=3, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    fractions = [float(r["throughput/data_wait_fraction"]) for r in rows if r.get("throughput/data_wait_fraction")]
    assert len(fractions) == 2 and all(0.5 < f <= 1.0 for f in fractions), fractions


# ------------------------------------------------------------------ bench/activation_memory.py
_mspec = importlib.util.spec_from_file_location("activation_memory", ROOT / "bench" / "activation_memory.py")
am = importlib.util.module_from_spec(_mspec)
sys.modules["activation_memory"] = am
_mspec.loader.exec_module(am)


def test_saved_activation_accounting_by_hand(tmp_path):
    """Tiny decoder, vocab 512: autocast's weight copies are 2 bytes per matrix parameter (the tied embedding
    once, through the LM head), the float32 logits 4 B T V are kept, activations grow exactly linearly in B."""
    def measure(batch: int, precision: str) -> dict:
        row = ts.Row("tiny", "clm", batch, 32, VOCAB)
        return am.measure_row(row, "cpu", precision, tmp_path / f"{batch}-{precision}")

    cfg = ModelConfig.from_name("tiny", vocab_size=VOCAB)
    module = ts.build_module(ts.Row("tiny", "clm", 1, 32, VOCAB), ts.Options(device="cpu", compile=False), VOCAB)
    matrix_params = sum(p.numel() for p in module.parameters() if p.dim() == 2)
    one, two, four = (measure(b, "bf16-mixed") for b in (1, 2, 4))
    for r in (one, two, four):
        assert r["saved_weight_copies_bytes"] == 2 * matrix_params
        assert r["saved_fp32_bytes"] >= 4 * r["micro_batch"] * 32 * cfg.padded_vocab_size  # log-softmax output
    per_sequence = two["saved_activations_bytes"] - one["saved_activations_bytes"]
    # linear up to the int64 targets (B=1: a view of the (B, T+1) batch; B>1: a (B, T) copy): < 1 KiB
    assert per_sequence > 0
    assert abs(four["saved_activations_bytes"] - two["saved_activations_bytes"] - 2 * per_sequence) <= 1024
    fp32 = measure(2, "32-true")
    assert fp32["saved_weight_copies_bytes"] == 0  # no autocast, no copies
    for r in (two, fp32):  # the planner's terms are derived from these blocks (tests/test_memory.py)
        assert r["saved_activations_bytes"] == pytest.approx(r["planner_activation_bytes"], rel=1e-3)
        assert r["saved_weight_copies_bytes"] == r["planner_weight_copy_bytes"]
    assert "| tiny | clm | 2 | 32 |" in am.format_table([two])
