"""Activation memory of one micro-batch: what autograd keeps for backward, beside the planner's formula.

    python3 bench/activation_memory.py                          # issue 8's models, 1 sequence each, CPU, bf16 autocast
    python3 bench/activation_memory.py --rows gpt2-small:clm:4:1024 --device cuda

One eager forward of the objective's loss under the run's autocast inside
``torch.autograd.graph.saved_tensors_hooks``: every distinct storage autograd saves is summed once
(parameters excluded), split into autocast's 16-bit copies of the weights (a saved matrix with a
parameter's shape or its transpose), float32 tensors and 16-bit tensors. Beside it, the planner's
``framework.scaling.memory.activation_bytes`` (Korthikanti et al. 2022, eq. 1, fused attention, plus the
float32 logits 4 s b V). This explains a gap between ``bench/train_speed.py``'s measured peak and the
planner before a GPU is at hand; it runs at full model size on a CPU in seconds.

Eager, so neither compiler fusion nor recomputation: ``torch.compile``'s min-cut partitioner recomputes
cheap pointwise ops in backward and saves less. On a CPU, attention with an additive bias (T5) takes the
math kernel, which saves the (B, heads, T, S) probabilities; on a GPU the efficient kernel does not.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import train_speed as ts  # noqa: E402
from framework.models import ModelConfig  # noqa: E402
from framework.scaling.memory import GB, PRECISION_STATE_BYTES, activation_bytes  # noqa: E402

ROWS = ("gpt2-small:clm:1:1024", "gpt2-medium:clm:1:1024", "gpt-1.3b:clm:1:2048", "bert-base:mlm:1:512",
        "t5-base:span_corruption:1:512")
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


_COPY_OR_VIEW = ("ToCopyBackward", "TBackward", "ViewBackward", "PermuteBackward", "TransposeBackward")


def is_weight_copy(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter cast (autocast's 16-bit copy), possibly transposed or viewed: its autograd
    history is copies and views ending at a leaf parameter's AccumulateGrad."""
    node = t.grad_fn
    for _ in range(4):
        if node is None or not type(node).__name__.startswith(_COPY_OR_VIEW):
            return False
        node = next((n for n, _ in node.next_functions if n is not None), None)
        if node is not None and type(node).__name__ == "AccumulateGrad":
            return True
    return False


def saved_tensor_bytes(module, batch, device_type: str, autocast_dtype: torch.dtype | None) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves in one forward of ``module.compute_loss(batch)``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            if is_weight_copy(t):
                kind = "weight_copies"
            else:
                kind = "fp32" if t.dtype == torch.float32 else "other"
            saved[storage.data_ptr()] = (kind, storage.nbytes())
        return t

    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss, _ = module.compute_loss(batch)
    del loss
    out = {"weight_copies": 0, "fp32": 0, "other": 0}
    for kind, nbytes in saved.values():
        out[kind] += nbytes
    out["activations"] = out["fp32"] + out["other"]  # everything but the weight copies
    return out


def measure_row(row: ts.Row, device: str, precision: str, data_dir: Path) -> dict:
    vocab = row.vocab_size or ts.VOCAB[row.objective]
    opts = ts.Options(device=device, precision=precision, compile=False, num_workers=0)
    window = ts.objective_class(row.objective).window_length(row.seq_len, ts.ObjectiveConfig(name=row.objective))
    prepared = ts.random_token_data(data_dir / f"{row.preset}-{row.objective}", 4 * row.micro_batch * window + 8 * window,
                                    vocab)
    module = ts.build_module(row, opts, vocab).to(device)
    batch = ts._to_device(ts.first_batch(module, row, opts, prepared), torch.device(device))
    saved = saved_tensor_bytes(module, batch, torch.device(device).type, AUTOCAST.get(precision))
    cfg = ModelConfig.from_name(row.preset, vocab_size=vocab)
    target_len = int(batch["labels"].shape[1]) if row.objective == "span_corruption" else None
    state = PRECISION_STATE_BYTES[ts.MODE_PRECISION.get(precision, "fp32")]
    planner = activation_bytes(cfg, row.micro_batch, row.seq_len, state, target_len=target_len)
    return {"model": row.preset, "objective": row.objective, "micro_batch": row.micro_batch, "seq_len": row.seq_len,
            "target_len": target_len, "params": cfg.num_parameters(), "precision": precision, "device": device,
            **{f"saved_{k}_bytes": v for k, v in saved.items()}, "planner_activation_bytes": planner}


def format_table(results: list[dict]) -> str:
    lines = ["| model | objective | batch | seq len | saved activations GB | of which fp32 GB | weight copies GB "
             "| planner activations GB | saved / planner |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        seq = f"{r['seq_len']}/{r['target_len']}" if r["target_len"] else str(r["seq_len"])
        lines.append(f"| {r['model']} | {r['objective']} | {r['micro_batch']} | {seq} | "
                     f"{r['saved_activations_bytes'] / GB:.3f} | {r['saved_fp32_bytes'] / GB:.3f} | "
                     f"{r['saved_weight_copies_bytes'] / GB:.3f} | {r['planner_activation_bytes'] / GB:.3f} | "
                     f"{r['saved_activations_bytes'] / r['planner_activation_bytes']:.2f} |")
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
