"""The evaluation tasks that ship with the repository, found without importing lm-evaluation-harness.

Each task is an lm-evaluation-harness task YAML under ``framework/evaluation/tasks/`` (or a directory given with
``--include-path``) whose data is a local file (``dataset_path: json`` + ``dataset_kwargs.data_files``), so no
evaluation needs the Hugging Face Hub. Task names are checked here, in milliseconds, before any data is prepared
or model loaded; the harness itself (a 6 s import) is imported only to run them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class _TolerantLoader(yaml.SafeLoader):
    """Reads task YAMLs that use the harness's ``!function module.name`` tags without resolving them."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_dirs(include_paths: list[str | Path] | tuple = ()) -> list[Path]:
    return [TASKS_DIR, *(Path(p) for p in include_paths)]


def local_tasks(include_paths: list[str | Path] | tuple = ()) -> dict[str, Path]:
    """{task name: its YAML}, from the shipped tasks and ``include_paths`` (a later directory's task of the same
    name wins, as in the harness's TaskManager)."""
    found: dict[str, Path] = {}
    for directory in task_dirs(include_paths):
        for path in sorted(directory.rglob("*.yaml")):
            config = yaml.load(path.read_text(), Loader=_TolerantLoader)
            if isinstance(config, dict) and isinstance(config.get("task"), str):
                found[config["task"]] = path
    return found


def resolve_tasks(names: list[str] | tuple, include_paths: list[str | Path] | tuple = ()) -> dict[str, Path]:
    """{name: YAML} for the requested names; an unknown name is one sentence listing the available tasks."""
    for directory in include_paths:
        if not Path(directory).is_dir():
            raise ValueError(f"task directory {directory} does not exist; pass a directory of task YAMLs.")
    available = local_tasks(include_paths)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no evaluation task given; choose from the local tasks: {', '.join(sorted(available))}.")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown evaluation task {', '.join(map(repr, unknown))}; the local tasks are: "
                         f"{', '.join(sorted(available))} (add your own with a task YAML directory).")
    return {n: available[n] for n in names}


def parse_shots(text: str | list | tuple) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")] if isinstance(text, str) else [int(s) for s in text]
    except (TypeError, ValueError):
        values = []
    if not values or any(v < 0 for v in values):
        raise ValueError(f"shots={text!r} must be non-negative integers such as 0,1,5.")
    return values


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("evaluation runs through lm-evaluation-harness, which is not installed; "
                         "pip install 'lm-eval==0.4.13' (or the framework's [eval] extra).")


def check_eval_settings(tasks: list[str], shots: list[int], include_paths: list[str | Path] | tuple = ()) -> None:
    """Everything about an evaluation request a user can get wrong, checked before any data or model exists."""
    resolve_tasks(tasks, include_paths)
    parse_shots(shots)
    require_lm_eval()
