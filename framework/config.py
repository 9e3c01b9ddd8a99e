"""The training run's typed schema, registered in Hydra's ConfigStore, and ``compose``.

The defaults are written here and in each subsystem's ``config.py``, once: ``TrainConfig()`` is the run
``fw-train`` trains with no overrides. ``conf/train.yaml`` starts its defaults list with ``train_schema`` and
only selects group options, and each option file only sets what differs from these defaults. Every group's
YAML is merged into these dataclasses: an unknown key, a value of the wrong type or a name outside a closed set
(``framework.choices``) is an error at composition time, not a silently ignored setting.

``compose(overrides)`` is the one way to build a ``TrainConfig`` from ``conf/`` and command-line overrides
(fw-train's check, fw-prepare, fw-submit, recipes, benches, tests); its errors are ``ConfigError``, one
sentence each (``framework.config_errors``). ``to_run_config`` turns a composed DictConfig into plain dataclass
objects; nothing below ``framework.run`` ever sees the raw config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from framework.catalogue import OBJECTIVES
from framework.choices import Family, ModelPreset, Position, plain
from framework.cluster.config import ClusterConfig
from framework.config_errors import ConfigError, check_known_keys, explain
from framework.data.config import DataConfig
from framework.distributed.config import PrecisionConfig, StrategyConfig
from framework.models.config import ModelConfig
from framework.objectives.config import ObjectiveConfig, OptimConfig
from framework.tracking.config import LoggerConfig


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_CHOICE_FIELDS = {"family": Family, "position": Position}  # ModelConfig's closed sets, checked at composition


def _model_spec_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(ModelConfig)
    return [(f.name, Optional[_CHOICE_FIELDS.get(f.name, hints[f.name])], None)
            for f in dataclasses.fields(ModelConfig) if f.name != "name"]


# ``model.preset`` names a shape in framework.models.config.PRESETS; any other field overrides it. The default
# is the default objective's model (framework.catalogue), the one conf/train.yaml selects.
ModelSpec = dataclasses.make_dataclass(
    "ModelSpec", [("preset", ModelPreset, OBJECTIVES[ObjectiveConfig.name].default_model)] + _model_spec_fields())


def resolve_model(spec: Any) -> ModelConfig:
    overrides = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "preset"}
    return ModelConfig.from_name(spec.preset, **overrides)


@dataclass
class TrainerConfig:
    max_steps: int = 300
    val_check_interval: int = 100  # optimizer steps between validations
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
    """Validate against the schema and return dataclass objects of plain values (a typo, a bad type or an
    unknown name raises ``ConfigError`` here; a setting a subsystem refuses raises its ValueError)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_known_keys(cfg, TrainConfig)  # `+trainer.max_stepz=10` adds a key Hydra's struct mode lets through
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return plain(OmegaConf.to_object(merged))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain(err)) from err


def compose_config(overrides: Sequence[str] = (), *, hydra_config: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as fw-train composes it; with ``hydra_config`` the
    ``hydra`` node (run and sweep directories) is kept. A bad override raises ``ConfigError``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(explain(err, overrides)) from err


def compose(overrides: Sequence[str] = ()) -> TrainConfig:
    """The run ``fw-train <overrides>`` trains: ``compose([]) == TrainConfig()``."""
    return to_run_config(compose_config(overrides))
