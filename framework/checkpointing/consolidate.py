"""Consolidate a sharded checkpoint (FSDP2 / DeepSpeed ZeRO directory) into one Lightning ``.ckpt`` file.

    python3 -m framework.checkpointing.consolidate runs/x/checkpoints/step0001000.ckpt step1000-full.ckpt
    fw-consolidate runs/x/checkpoints/last.ckpt last-full.ckpt

The output is what a single-device or DDP run saves: ``state_dict`` with the same ``model.<...>`` keys
(float32), ``optimizer_states`` in torch's format (state keyed by parameter index in ``param_groups``
order), and everything else the run saved (``hyper_parameters``, ``global_step``, loops, LR schedulers,
the DataModule position, RNG states). So it resumes under DDP (``resume=<file>``), loads into FSDP
(Lightning reads full checkpoints too) and is what ``framework.export`` reads. Only plain containers and
tensors are written, so it loads with ``torch.load(weights_only=True)``.

Two layouts are recognised:
- torch.distributed.checkpoint (Lightning's ``ModelParallelStrategy``): ``.metadata`` + ``*.distcp``
  shards holding ``state_dict`` and ``optimizer_0`` (keyed by parameter name), and ``meta.pt`` with the rest;
- DeepSpeed (Lightning's ``DeepSpeedStrategy``): ``latest`` + ``<tag>/`` with ``*_model_states.pt`` and one
  ``*_optim_states.pt`` per rank holding flat float32 partitions; merged with DeepSpeed's own
  ``zero_to_fp32`` reconstruction, applied to the weights and to Adam's two moments alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LIGHTNING_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def checkpoint_kind(path: str | Path) -> str:
    """"dcp", "deepspeed" or "file" (already one file)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / ".metadata").is_file() and (path / LIGHTNING_META).is_file():  # Lightning writes meta.pt last
        return "dcp"
    if (path / "latest").is_file():
        return "deepspeed"
    raise ValueError(f"{path} is neither a checkpoint file nor a complete sharded checkpoint directory "
                     f"(no .metadata + {LIGHTNING_META}, or latest, inside); pass a step*.ckpt or last.ckpt written "
                     "by the run.")


# ---------------------------------------------------------------------------------------------- FSDP (DCP)
def _named_to_indexed(optim: dict) -> dict:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) -> torch's format (keyed by the
    parameter's position across ``param_groups``), which ``Optimizer.load_state_dict`` expects."""
    index: dict[str, int] = {}
    groups = []
    for group in optim["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    state = {index[name]: value for name, value in optim["state"].items()}
    return {"state": state, "param_groups": groups}


def consolidate_dcp(path: str | Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    sharded: dict[str, Any] = {}
    # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, kept in memory
    _load_state_dict(sharded, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in sharded["state_dict"].items()}
    optimizers = sorted((k for k in sharded if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_named_to_indexed(sharded[k]) for k in optimizers]
    return checkpoint


# ---------------------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_tag_dir(path: Path, tag: str | None) -> Path:
    tag = tag or (path / "latest").read_text().strip()
    return path / tag


def consolidate_deepspeed(path: str | Path, tag: str | None = None) -> dict[str, Any]:
    from deepspeed.utils import zero_to_fp32 as z

    path = Path(path)
    ds_dir = _deepspeed_tag_dir(path, tag)
    model_files = z.get_model_state_files(str(ds_dir))
    model_states = z.parse_model_states(model_files)
    optim_files = z.get_optim_files(str(ds_dir))
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage, world = shards[0]["zero_stage"], shards[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(shards):
        raise ValueError(f"{ds_dir} has {len(shards)} optimizer shards but was saved by {world} ranks; "
                         "the checkpoint is incomplete: consolidate an earlier one.")
    flat_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    paddings = shards[0].get("param_alignment_paddings")

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-rank flat float32 partitions (laid out like the master weights) -> full tensors by name."""
        merged: dict[str, Any] = {}
        if stage <= 2:
            z._zero2_merge_trainable_params(merged, world, flat_groups, model_states, paddings)
        else:
            z._zero3_merge_trainable_params(merged, world, flat_groups, model_states)
        return {k: v.contiguous().clone() for k, v in merged.items()}

    weights = merge([s[flat_key] for s in shards])
    # Adam's moments sit in the base optimizer's state, one entry per flat group, same layout as the weights
    base = [s["base_optimizer_state"] if stage <= 2 else s["optimizer_state_dict"] for s in shards]
    n_groups = len(shards[0][flat_key])
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        if all(key in b["state"].get(g, {}) for b in base for g in range(n_groups)):
            moments[key] = merge([[b["state"][g][key] for g in range(n_groups)] for b in base])

    # names per optimizer group in DeepSpeed's order (the client optimizer's param_groups order)
    group_names = [list(shapes.keys()) for shapes in model_states[0].param_shapes]
    if stage == 3 and len(group_names) != len(base[0]["param_groups"]):
        group_names = [[n for shapes in model_states[0].param_shapes for n in shapes]]
    index = {name: i for i, name in enumerate(n for names in group_names for n in names)}
    state = {}
    for g, names in enumerate(group_names):
        step = base[0]["state"].get(min(g, n_groups - 1), {}).get("step")
        for name in names:
            if moments:
                state[index[name]] = {"step": torch.as_tensor(step, dtype=torch.float32).clone() if step is not None
                                      else torch.tensor(0.0), **{k: moments[k][name] for k in moments}}
    groups = [{**{k: v for k, v in pg.items() if k != "params"}, "params": [index[n] for n in names]}
              for pg, names in zip(base[0]["param_groups"], group_names)]

    state_dict = dict(model_states[0].buffers)
    state_dict.update(weights)
    for alias, source in model_states[0].shared_params:  # tied weights (e.g. lm_head = embed)
        if source in state_dict:
            state_dict[alias] = state_dict[source]
    client = torch.load(z.get_model_state_file(str(ds_dir), stage), map_location="cpu", weights_only=False)
    # the module's own key order (as a DDP run saves it); ZeRO-3 stores empty placeholders under these keys
    order = [k for k in client.get("module", {}) if k in state_dict]
    state_dict = {**{k: state_dict[k] for k in order}, **{k: v for k, v in state_dict.items() if k not in order}}
    deepspeed_keys = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                      "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version", "buffer_names",
                      "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
                      "sparse_tensor_module_names", "data_sampler", "random_ltd", "param_alignment_paddings",
                      "checkpoint_parallel_dimensions"}
    checkpoint = {k: v for k, v in client.items() if k not in deepspeed_keys}
    checkpoint["state_dict"] = state_dict
    checkpoint["optimizer_states"] = [{"state": state, "param_groups": groups}] if moments else []
    return checkpoint


# ---------------------------------------------------------------------------------------------- one file
def consolidate(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the one-file checkpoint for ``path`` to ``out`` (atomically) and return it."""
    kind = checkpoint_kind(path)
    if kind == "file":
        raise ValueError(f"{path} is already a single-file checkpoint; nothing to consolidate.")
    checkpoint = consolidate_dcp(path) if kind == "dcp" else consolidate_deepspeed(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    return checkpoint
