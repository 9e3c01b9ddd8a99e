"""Every strategy x precision pair on one GPU through Lightning: final loss, tokens/s, peak memory.

    python3 bench/strategy_precision.py                      # all 10 strategies x 4 precisions, 30 steps each
    python3 bench/strategy_precision.py --strategies ddp fsdp --precisions bf16 fp32 --steps 50
    python3 bench/strategy_precision.py --per-block          # + fsdp/ddp with activation checkpointing, compile

Each pair trains the same model from the same seed on the same batches (the embedded stdlib corpus), in a
fresh forked process (its own CUDA context, process group, memory counters and DeepSpeed state; the parent
imports the libraries once and never touches CUDA, so forking is safe), so the final losses should
agree to within the precision's rounding and any difference in speed or memory is the strategy's.
A pair the framework refuses is listed with its one-sentence reason instead of numbers.
tokens/s is measured over the steps after the first ``--warmup`` (CUDA synchronised); peak memory is
``torch.cuda.max_memory_allocated`` over the whole run. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without a CUDA context
sys.path.insert(0, str(REPO))

from framework.catalogue import PRECISIONS, STRATEGIES  # noqa: E402  every conf/strategy and conf/precision option

PER_BLOCK = [("ddp", "bf16", ["strategy.compile=true"]), ("fsdp", "bf16", ["strategy.activation_checkpointing=true"]),
             ("fsdp", "bf16", ["strategy.compile=true"]),
             ("deepspeed_zero2", "bf16", ["strategy.activation_checkpointing=true"]),
             ("deepspeed_zero3", "bf16", ["strategy.activation_checkpointing=true"])]


def overrides(args, strategy: str, precision: str, extra: list[str]) -> list[str]:
    return [
        f"model={args.model}", "data=stdlib", f"data.seq_len={args.seq_len}", f"data.micro_batch_size={args.micro_batch}",
        f"data.cache_dir={args.cache_dir}", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000000",
        "trainer.log_every_n_steps=1000000", "trainer.accelerator=gpu", "trainer.devices=1",
        "trainer.enable_progress_bar=false", "callbacks.checkpoint_every_n_steps=1000000", "logger=csv",
        f"optim.warmup_steps={max(1, args.steps // 5)}", f"strategy={strategy}", f"precision={precision}",
        "resume=never", "seed=1234", *extra,
    ]


def compose(overrides_: list[str]):
    from framework.config import compose as compose_run

    # optional callbacks of other subsystems that would only add time here
    return compose_run([*overrides_, "callbacks.throughput=false", "callbacks.model_card=false"])


def run_one(args, strategy: str, precision: str, extra: list[str]) -> dict:
    """In this process: train one pair and return its numbers (or the refusal)."""
    import lightning as L
    import torch

    from framework.distributed.precision import check_strategy_precision, detect_device
    from framework.run import build_run

    cfg = compose(overrides(args, strategy, precision, extra))
    try:
        check_strategy_precision(cfg.strategy, cfg.precision.mode, detect_device(cfg.trainer.accelerator))
    except ValueError as err:
        return {"refused": str(err)}

    class Meter(L.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = None
            self.timed_steps = 0
            self.loss = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = float(outputs["loss"])
            if trainer.global_step == args.warmup:
                torch.cuda.synchronize()
                self.t0 = time.perf_counter()
            elif trainer.global_step > args.warmup:
                self.timed_steps += 1
            if trainer.global_step == args.steps:
                torch.cuda.synchronize()
                self.t1 = time.perf_counter()

    run_dir = Path(args.cache_dir).parent / "bench_runs" / f"{strategy}-{precision}-{'-'.join(extra) or 'plain'}"
    torch.cuda.reset_peak_memory_stats()
    trainer, module, dm, _ = build_run(cfg, run_dir)
    meter = Meter()
    trainer.callbacks.append(meter)
    trainer.fit(module, datamodule=dm)
    tokens = meter.timed_steps * args.micro_batch * args.seq_len * trainer.world_size
    return {"loss": meter.loss, "tokens_per_s": tokens / (meter.t1 - meter.t0),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "params": module.model_config.num_parameters()}


def _child(send, args, strategy: str, precision: str, extra: list[str]) -> None:
    try:
        result = run_one(args, strategy, precision, extra)
    except BaseException as err:  # report, do not raise: the parent goes on with the next pair
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"[:300]}
    send.send(result)
    send.close()
    os._exit(0)  # skip atexit/teardown of a half-torn-down distributed state


def table(rows: list[tuple[str, str, str, dict]]) -> str:
    lines = ["| strategy | precision | options | loss at end (nats) | tokens/s | peak memory (GiB) |",
             "|---|---|---|---:|---:|---:|"]
    for strategy, precision, extra, r in rows:
        if "refused" in r:
            lines.append(f"| {strategy} | {precision} | {extra} | refused: {r['refused']} | | |")
        elif "error" in r:
            lines.append(f"| {strategy} | {precision} | {extra} | FAILED: {r['error']} | | |")
        else:
            lines.append(f"| {strategy} | {precision} | {extra} | {r['loss']:.4f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['peak_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--per-block", action="store_true", help="also time activation checkpointing and compile")
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from tokens/s")
    parser.add_argument("--cache-dir", default=str(REPO / "bench" / ".cache" / "data"))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per pair")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--jsonl", help="append each pair's result to this file as it finishes")
    parser.add_argument("--table-from", nargs="+", metavar="JSONL", help="print the table of earlier --jsonl files")
    args = parser.parse_args()
    if args.table_from:
        rows = [json.loads(line) for path in args.table_from for line in Path(path).read_text().splitlines() if line]
        print(table([(r["strategy"], r["precision"], r["options"], r["result"]) for r in rows]))
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/strategy_precision.py needs a CUDA GPU (it times Lightning's GPU strategies, and DeepSpeed "
                 "runs only on CUDA); run it on a GPU node. The CPU equivalents are tests/test_fsdp.py and "
                 "tests/test_deepspeed_cpu.py.")
    import multiprocessing

    import framework.run  # noqa: F401  (imported once here; every forked child reuses it)
    from framework.data.prepare import prepare_data

    prepare_data(compose(overrides(args, "ddp", "fp32", [])).data, progress=False)  # once, before the children
    pairs = [(s, p, []) for s in args.strategies for p in args.precisions]
    if args.per_block:
        pairs += PER_BLOCK
    rows = []
    for strategy, precision, extra in pairs:
        start = time.time()
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_child, args=(send, args, strategy, precision, extra))
        child.start()
        send.close()
        result = {"error": f"timed out after {args.timeout} s"}
        if receive.poll(args.timeout):
            try:
                result = receive.recv()
            except EOFError:
                result = {"error": f"the run died (exit code {child.exitcode})"}
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        rows.append((strategy, precision, " ".join(extra) or "-", result))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"strategy": strategy, "precision": precision, "options": rows[-1][2],
                                    "result": result, "seconds": round(time.time() - start, 1)}) + "\n")
        print(f"{strategy:>24} {precision:>9} {' '.join(extra) or '-':>40}  {time.time() - start:5.0f} s  "
              f"{json.dumps(result)[:160]}", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(0)
    header = (f"{name}, torch {torch.__version__}, {datetime.date.today().isoformat()}; model={args.model}, "
              f"seq_len={args.seq_len}, micro_batch={args.micro_batch}, {args.steps} steps (tokens/s over the last "
              f"{args.steps - args.warmup})\ncommand: python3 bench/strategy_precision.py {' '.join(sys.argv[1:])}\n")
    text = header + "\n" + table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
