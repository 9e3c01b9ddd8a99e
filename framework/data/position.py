"""The data position in a checkpoint: GLOBAL samples consumed, so a run resumes on any number of ranks.

A DataModule's checkpoint state (``PretrainDataModule.state_dict``; a mixture adds its own keys):

- ``global_samples_consumed``: windows consumed by all ranks together = the next global stream position;
- ``world_size``, ``micro_batch_size``: how many ranks wrote it and each rank's micro-batch (informational:
  the position alone decides what comes next, on any world size);
- ``order``: ``DATA_ORDER``, the definition of the global order (framework/data/permutation.py);
- ``seed``, ``window_length``, ``tokenizer_hash``: what the order and the windows depend on;
- ``seq_len``: the model sequence length the windows were cut for (``checkpoint_seq_len``: model card, recipes);
- ``mixture`` (the weights; None for a single source) and ``source_windows`` (windows drawn from each source).

Checkpoints written before the global position (``samples_consumed`` per rank) are converted when the number of
ranks that wrote them is known (the length of their per-rank RNG list, ``ResumeStateCallback.RNG_KEY``) and
refused otherwise. Their windows followed the former per-epoch ``randperm`` order, so the rest of the epoch they
stopped in follows the new order instead (one warning says so).

Sharded checkpoints: a DeepSpeed ZeRO directory holds one optimizer partition per data-parallel rank and cannot be
loaded by another number of ranks; ``check_resume_world_size`` refuses it before anything is loaded and points
at ``fw-consolidate`` (a single file resumes on any world size). torch.distributed.checkpoint directories
(FSDP2) are resharded by DCP at load time and pass.
"""

from __future__ import annotations

import warnings
from pathlib import Path

DATA_ORDER = "feistel-v1"  # global stream; epoch e = position // n in FeistelPermutation(n, seed, e) order
RNG_KEY = "rng_states"  # framework.checkpointing.checkpoints.ResumeStateCallback.RNG_KEY: one entry per rank


def saved_global_position(state: dict) -> int:
    """The global stream position of a DataModule state, converting the per-rank position of older checkpoints
    (``upgrade_data_state`` records how many ranks wrote those)."""
    if "global_samples_consumed" in state:
        return int(state["global_samples_consumed"])
    if "global_position" in state:  # an older mixture checkpoint: its position was already global
        _warn_old_order(int(state["global_position"]))
        return int(state["global_position"])
    checkpoint_world_size = state.get("checkpoint_world_size")
    if checkpoint_world_size is None:
        raise ValueError("this checkpoint stores its data position per rank but not how many ranks wrote it, so its "
                         "global position is unknown; start a new run (resume=never).")
    position = int(state["samples_consumed"]) * checkpoint_world_size
    _warn_old_order(position)
    return position


def _warn_old_order(position: int) -> None:
    warnings.warn(f"this checkpoint was written with the former per-epoch randperm order; training continues at "
                  f"global sample {position:,} in the new order ({DATA_ORDER}), so the rest of the current epoch may "
                  "repeat or skip some of its windows once.", stacklevel=3)


LEGACY_STATE_KEYS = ("MixtureDataModule",)  # where a mixture's data state was kept before one DataModule served all


def upgrade_data_state(checkpoint: dict) -> None:
    """Bring an older checkpoint's data state to the current form, while the checkpoint loads and before the
    DataModule restores (``PretrainModule.on_load_checkpoint``: Lightning calls the module's hook first, with the
    whole checkpoint, while the DataModule's ``load_state_dict`` sees its own entry only): a state written under a
    former DataModule class name moves to ``PretrainDataModule``, the key Lightning restores it from, and a per-rank
    position gets the number of ranks that wrote it (their RNG states, one per rank)."""
    for key in LEGACY_STATE_KEYS:
        if key in checkpoint:
            checkpoint.setdefault("PretrainDataModule", checkpoint.pop(key))
    state, ranks = checkpoint.get("PretrainDataModule"), checkpoint.get(RNG_KEY)
    if isinstance(state, dict) and "samples_consumed" in state and ranks:
        state.setdefault("checkpoint_world_size", len(ranks))


def checkpoint_seq_len(ckpt: dict) -> int | None:
    """The sequence length a checkpoint was trained at: its DataModule's state (``PretrainDataModule.state_dict``),
    or, for checkpoints written before the data side kept it, the module's hyper_parameters."""
    for state in ckpt.values():
        if isinstance(state, dict) and state.get("seq_len") is not None and "global_samples_consumed" in state:
            return int(state["seq_len"])
    return (ckpt.get("hyper_parameters") or {}).get("seq_len")


def sharded_world_size(path: str | Path) -> int | None:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint directory (one ``*optim_states.pt`` partition each), or
    None for anything else (a single file, a DCP directory, a directory without a complete tag)."""
    path = Path(path)
    if not (path / "latest").is_file():
        return None
    tag_dir = path / (path / "latest").read_text().strip()
    partitions = list(tag_dir.glob("*optim_states.pt"))
    return len(partitions) or None


def check_resume_world_size(path: str | Path | None, world_size: int) -> None:
    """Refuse, before loading, a sharded checkpoint that cannot be loaded by ``world_size`` ranks."""
    if not path:
        return
    saved = sharded_world_size(path)
    if saved is not None and saved != world_size:
        raise ValueError(f"{path} is a DeepSpeed ZeRO checkpoint partitioned over {saved} ranks, which {world_size} "
                         f"ranks cannot load; resume on {saved} ranks, or run fw-consolidate {path} full.ckpt and "
                         "resume from that file (resume=full.ckpt) with strategy=ddp or fsdp on any number of ranks.")
