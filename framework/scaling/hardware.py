"""Peak dense FLOP/s and memory per accelerator and dtype: the one table the planner and MFU both use.

Figures are the vendors' dense (no structured sparsity) tensor-core peaks for the SXM parts:
- V100 SXM2: NVIDIA Tesla V100 datasheet (fp16 tensor 125 TFLOP/s; no bf16).
- A100 SXM4: NVIDIA A100 datasheet (bf16/fp16 312, tf32 156, fp32 19.5 TFLOP/s).
- H100 SXM5 / H200 SXM: NVIDIA H100 and H200 datasheets (bf16/fp16 989.4, tf32 494.7, fp32 66.9 TFLOP/s),
  the datasheets' "with sparsity" figures halved.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # device memory, 1 GB = 1e9 bytes
    peak_flops: dict[str, float]  # dtype -> dense peak FLOP/s


ACCELERATORS: dict[str, Accelerator] = {
    "V100": Accelerator("V100", 32.0, {"fp32": 15.7e12, "tf32": 15.7e12, "fp16": 125e12}),
    "A100": Accelerator("A100", 80.0, {"fp32": 19.5e12, "tf32": 156e12, "fp16": 312e12, "bf16": 312e12}),
    "A100-40GB": Accelerator("A100-40GB", 40.0, {"fp32": 19.5e12, "tf32": 156e12, "fp16": 312e12, "bf16": 312e12}),
    "H100": Accelerator("H100", 80.0, {"fp32": 66.9e12, "tf32": 494.7e12, "fp16": 989.4e12, "bf16": 989.4e12,
                                       "fp8": 1978.9e12}),
    "H200": Accelerator("H200", 141.0, {"fp32": 66.9e12, "tf32": 494.7e12, "fp16": 989.4e12, "bf16": 989.4e12,
                                        "fp8": 1978.9e12}),
}

_ALIASES = {"V100-SXM2": "V100", "A100-SXM4-80GB": "A100", "A100-80GB": "A100", "A100-SXM4-40GB": "A100-40GB",
            "H100-SXM": "H100", "H100-80GB": "H100", "H200-SXM": "H200"}

# Lightning precision mode -> the dtype whose peak bounds the matrix multiplies
PRECISION_DTYPE = {"32-true": "fp32", "32": "fp32", "16-mixed": "fp16", "16-true": "fp16", "bf16-mixed": "bf16",
                   "bf16-true": "bf16", "bf16_true": "bf16"}  # Lightning modes, and conf/precision's bf16_true


def get_accelerator(name: str) -> Accelerator:
    key = _ALIASES.get(name.upper(), name.upper())
    if key not in ACCELERATORS:
        raise ValueError(f"unknown GPU {name!r}; pick one of: {', '.join(ACCELERATORS)}.")
    return ACCELERATORS[key]


def peak_flops(gpu: str, dtype: str) -> float:
    acc = get_accelerator(gpu)
    dtype = PRECISION_DTYPE.get(dtype, dtype)
    if dtype not in acc.peak_flops:
        raise ValueError(f"{acc.name} has no {dtype} peak (supported: {', '.join(acc.peak_flops)}); "
                         f"pick another precision.")
    return acc.peak_flops[dtype]


def detect_accelerator() -> str | None:
    """The table's name for the local CUDA device, or None (CPU, or a device not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).upper()
    for key in ("H200", "H100", "A100", "V100"):
        if key in name:
            if key == "A100" and "40GB" in name:
                return "A100-40GB"
            return key
    return None
