"""``fw-train`` (= ``python3 -m framework train``): compose -> validate -> ``framework.run.run``.

    fw-train                                  # causal LM on the embedded stdlib corpus (CPU-friendly)
    fw-train objective=clm model=gpt2-small data.seq_len=1024 trainer.max_steps=10000
    fw-train -m optim.lr=1e-3,3e-4            # a Hydra multirun sweep

Every point of the command line (each point of a ``-m`` sweep) is composed and checked before Hydra starts
(``framework.config_errors``), so a bad override is one line on stderr and exit status 2 with no directory made.
A configuration error found later is one line and exit 2; a failed checkpoint write one line and exit 1; a run
stopped by a signal exits 128 + its number after saving. ``FRAMEWORK_TRACEBACK=1`` shows the tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.checkpointing.checkpoints import CheckpointWriteError
from framework.config import CONF_DIR, register_configs, to_run_config
from framework.config_errors import check_command_line
from framework.run import RUN_DIR_ENV, is_global_zero, run, run_lock
from framework.tracking.run_state import run_is_finished
from framework.validate import ConfigurationError, validate


def hydra_run_dir() -> Path:
    if os.environ.get(RUN_DIR_ENV) and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return Path(os.environ[RUN_DIR_ENV])  # a process launched by rank 0: share its directory
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


register_configs()


def main() -> None:
    """Console entry: every run the command line asks for is composed first, then Hydra runs."""
    check_command_line(sys.argv[1:])
    hydra_main()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra's entry: a configuration error is one line on stderr and exit code 2, a failed checkpoint write
    exit code 1; anything else propagates with its traceback."""
    try:
        return _main(cfg)
    except (ConfigurationError, CheckpointWriteError) as err:
        if os.environ.get("FRAMEWORK_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigurationError) else 1)


def _main(cfg: DictConfig) -> float:
    run_cfg = to_run_config(cfg)
    validate(run_cfg)  # every cross-field check, before anything is read or written
    run_dir = Path(run_cfg.run_dir) if run_cfg.run_dir else hydra_run_dir()
    with run_lock(run_dir):  # a second job with this name is refused before it overwrites config.yaml
        finished = run_cfg.resume == "auto" and run_is_finished(run_dir, run_cfg.trainer.max_steps)
        if is_global_zero() and not finished:  # a finished run keeps the config it ran with; run() says it is done
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        metrics = run(run_cfg, run_dir)
    if metrics.get("exit_status"):  # stopped by a signal before the end: 128 + its number (143 for SIGTERM)
        sys.exit(metrics["exit_status"])
    return metrics.get("val_loss_nats", float("nan"))


if __name__ == "__main__":
    main()
