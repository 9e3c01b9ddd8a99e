"""The console commands, one module each; everything else in ``framework`` is library code they call.

Each command is ``fw-<name>`` once the package is installed (``pyproject.toml``'s scripts) and
``python3 -m framework <name>`` without the scripts on PATH (``framework/__main__.py``); both run the module's
``main``. ``COMMANDS`` is the one list: tests/test_commands.py checks pyproject.toml against it.
"""

COMMANDS: dict[str, str] = {  # name -> what it does (its module is framework.commands.<name>)
    "train": "pretrain as configured (Hydra overrides; -m sweeps)",
    "prepare": "tokenize and shard the configured data without training (or one task of a split job)",
    "plan": "from a compute budget to a compute-optimal experiment config",
    "submit": "render a SLURM batch script for a run and submit it",
    "consolidate": "one single-file checkpoint from a sharded checkpoint directory",
    "export": "a checkpoint as a Hugging Face transformers directory",
    "generate": "sample text from a checkpoint",
    "eval": "evaluate a checkpoint on local lm-evaluation-harness tasks",
}


def module_name(command: str) -> str:
    return f"framework.commands.{command}"
