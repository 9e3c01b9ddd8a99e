"""The training run's typed schema, registered in Hydra's ConfigStore.

``conf/train.yaml`` starts its defaults list with ``train_schema``, so every group's YAML is merged into
these dataclasses: an unknown key or a value of the wrong type is an error at composition time, not a
silently ignored setting. ``to_run_config`` turns the composed DictConfig into plain dataclass objects;
nothing below ``framework.train`` ever sees the raw config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from framework.cluster.config import ClusterConfig
from framework.data.config import DataConfig
from framework.distributed.config import PrecisionConfig, StrategyConfig
from framework.models.config import ModelConfig
from framework.objectives.config import ObjectiveConfig, OptimConfig
from framework.tracking.config import LoggerConfig


def _model_spec_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(ModelConfig)
    return [(f.name, Optional[hints[f.name]], None) for f in dataclasses.fields(ModelConfig) if f.name != "name"]


# ``model.preset`` names a shape in framework.models.config.PRESETS; any other field overrides it.
ModelSpec = dataclasses.make_dataclass("ModelSpec", [("preset", str, "tiny")] + _model_spec_fields())


def resolve_model(spec: Any) -> ModelConfig:
    overrides = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "preset"}
    return ModelConfig.from_name(spec.preset, **overrides)


@dataclass
class TrainerConfig:
    max_steps: int = 300
    val_check_interval: int = 50  # optimizer steps between validations
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class SpikeGuardConfig:
    """framework/callbacks/spike_guard.py: skip the optimizer step of a spiking or non-finite batch; after
    ``max_consecutive`` in a row, roll back to the last checkpoint before them and skip their data."""

    enabled: bool = False
    window: int = 100  # accepted losses in the running mean and standard deviation
    sigma: float = 6.0  # a loss more than sigma standard deviations above the running mean is a spike
    min_history: int = 20  # losses needed before the z-score test starts (non-finite values are caught from step 0)
    max_consecutive: int = 3  # spikes in a row that trigger a rollback


@dataclass
class CallbacksConfig:
    checkpoint_every_n_steps: int = 100
    keep_checkpoints: int = 2  # newest step checkpoints kept beside last.ckpt (-1 keeps all)
    # throughput/* and compute/* metrics (framework.callbacks.throughput)
    throughput: bool = True
    throughput_window: int = 20  # micro-batches averaged for tokens/s, FLOP/s and MFU
    peak_flops_per_device: float = 0.0  # 0 = the table's peak for the detected GPU and precision; set it elsewhere
    # zero-/few-shot evaluation after training through lm-evaluation-harness (framework.evaluation.harness):
    # local task names (framework/evaluation/tasks/*.yaml), e.g. [docstring_topic]; [] = off
    eval_tasks: list[str] = field(default_factory=list)
    eval_shots: list[int] = field(default_factory=lambda: [0, 1, 3])  # one harness run per number of shots
    eval_limit: int = 0  # examples evaluated per task (the first N; 0 = all)
    icl_task: str = ""  # retired (fw-icl): refused with a pointer to eval_tasks
    model_card: bool = True  # README.md + model_card.json in the run directory at the end of training
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)


@dataclass
class TrainConfig:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    name: str = "default"  # the run's name; its directory is runs/<name> (Hydra's hydra.run.dir)
    run_dir: str = ""  # "" = Hydra's output directory for this run
    seed: int = 1234
    resume: str = "auto"  # auto (newest complete checkpoint in run_dir, if any) | never | <path to a .ckpt>
    # continued pretraining: a single-file framework checkpoint whose model weights initialise this run (step 0,
    # a fresh optimizer and schedule, unlike resume); "" = random initialisation. See recipes/domain_adapt.py.
    init_from: str = ""
    # a cooldown branch (framework/branch.py): the full training state of a checkpoint from the constant phase of
    # an optim.schedule=wsd run, continued in this new run with its own decay; "" = none
    branch_from: str = ""
    torch_threads: int = 0  # 0 = torch's default


def register_configs() -> None:
    cs = ConfigStore.instance()
    schema = OmegaConf.structured(TrainConfig)
    # name-keyed maps: `data.sources={legal:{...}}` adds names without a `+` (each SourceSpec stays strict)
    for node in (schema.data.sources, schema.data.mixture):
        OmegaConf.set_struct(node, False)
    cs.store(name="train_schema", node=schema)


def to_run_config(cfg: DictConfig) -> TrainConfig:
    """Validate against the schema and return dataclass objects (a typo or a bad type raises here)."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)
