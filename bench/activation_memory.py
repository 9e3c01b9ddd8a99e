"""Activation memory of one micro-batch: what autograd keeps for backward, beside the planner's formula.

    python3 bench/activation_memory.py                          # issue 8's models, 1 sequence each, CPU, bf16 autocast
    python3 bench/activation_memory.py --rows gpt2-small:clm:4:1024 --device cuda

One eager forward of the objective's loss under the run's autocast, counted by
``framework.scaling.saved_tensors.saved_tensor_bytes``: every distinct storage autograd saves, once
(parameters and buffers excluded), split into autocast's 16-bit copies of the weights, float32 tensors and
the rest. Beside it, the planner's ``framework.scaling.memory.activation_terms`` (derived from our blocks:
total and float32 share) and its weight-copy line, and the reference point it replaced (Korthikanti et al.
2022, eq. 1, fused attention: 34 s b h per layer + the float32 logits 4 s b V). It runs at full model size
on a CPU in seconds.

Eager, so neither compiler fusion nor recomputation: ``torch.compile``'s min-cut partitioner recomputes
cheap pointwise ops in backward and saves less. On a CPU, attention with an additive bias (T5) would take
the math kernel and save the (B, heads, T, S) probabilities; ``efficient_attention_on_cpu`` makes it save
what the GPU's efficient kernel saves instead.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import train_speed as ts  # noqa: E402
from framework.models import ModelConfig  # noqa: E402
from framework.scaling.memory import (GB, PRECISION_STATE_BYTES, activation_terms,  # noqa: E402
                                      korthikanti_activation_bytes, weight_copy_bytes)
from framework.scaling.saved_tensors import efficient_attention_on_cpu, saved_tensor_bytes  # noqa: E402

ROWS = ("gpt2-small:clm:1:1024", "gpt2-medium:clm:1:1024", "gpt-1.3b:clm:1:2048", "bert-base:mlm:1:512",
        "t5-base:span_corruption:1:512")
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def measure_row(row: ts.Row, device: str, precision: str, data_dir: Path) -> dict:
    vocab = row.vocab_size or ts.VOCAB[row.objective]
    opts = ts.Options(device=device, precision=precision, compile=False, num_workers=0)
    window = ts.window_length(ts.ObjectiveConfig(name=row.objective), row.seq_len)
    prepared = ts.random_token_data(data_dir / f"{row.preset}-{row.objective}", 4 * row.micro_batch * window + 8 * window,
                                    vocab)
    module = ts.build_module(row, opts, vocab).to(device)
    batch = ts._to_device(ts.first_batch(module, row, opts, prepared), torch.device(device))
    with efficient_attention_on_cpu():  # T5's biased attention saves on the CPU what CUDA's efficient kernel saves
        saved = saved_tensor_bytes(lambda: module.compute_loss(batch)[0], module, torch.device(device).type,
                                   AUTOCAST.get(precision))
    cfg = ModelConfig.from_name(row.preset, vocab_size=vocab)
    target_len = int(batch["labels"].shape[1]) if row.objective == "span_corruption" else None
    # masked LM: the rows this batch selected for the head (the planner uses mask_probability x seq_len)
    head_rows = int((batch["labels"] != -100).sum()) / row.micro_batch if row.objective == "mlm" else None
    key = ts.MODE_PRECISION.get(precision, "fp32")
    terms = activation_terms(cfg, row.micro_batch, row.seq_len, key, target_len=target_len, head_rows=head_rows)
    reference = korthikanti_activation_bytes(cfg, row.micro_batch, row.seq_len, target_len=target_len,
                                             bytes_per_element=PRECISION_STATE_BYTES[key].activation_bytes)
    return {"model": row.preset, "objective": row.objective, "micro_batch": row.micro_batch, "seq_len": row.seq_len,
            "target_len": target_len, "params": cfg.num_parameters(), "precision": precision, "device": device,
            **{f"saved_{k}_bytes": v for k, v in saved.items()},
            "planner_activation_bytes": sum(t.bytes for t in terms),
            "planner_fp32_bytes": sum(t.bytes for t in terms if t.float32),
            "planner_weight_copy_bytes": weight_copy_bytes(cfg, key), "korthikanti_bytes": reference}


def format_table(results: list[dict]) -> str:
    lines = ["| model | objective | batch | seq len | saved activations GB | of which fp32 GB | weight copies GB "
             "| planner activations GB | of which fp32 GB | planner weight copies GB | saved / planner "
             "| Korthikanti 34 s b h GB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        seq = f"{r['seq_len']}/{r['target_len']}" if r["target_len"] else str(r["seq_len"])
        lines.append(f"| {r['model']} | {r['objective']} | {r['micro_batch']} | {seq} | "
                     f"{r['saved_activations_bytes'] / GB:.3f} | {r['saved_fp32_bytes'] / GB:.3f} | "
                     f"{r['saved_weight_copies_bytes'] / GB:.3f} | {r['planner_activation_bytes'] / GB:.3f} | "
                     f"{r['planner_fp32_bytes'] / GB:.3f} | {r['planner_weight_copy_bytes'] / GB:.3f} | "
                     f"{r['saved_activations_bytes'] / r['planner_activation_bytes']:.3f} | "
                     f"{r['korthikanti_bytes'] / GB:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="preset:objective:micro_batch:seq_len")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16-mixed", help="bf16-mixed, 16-mixed or 32-true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.rows:
            results.append(measure_row(ts.Row.parse(text), args.device, args.precision, Path(tmp)))
    print(f"{args.precision} autocast, eager, device {args.device}; GB = 1e9 bytes")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
