"""The package root reads as library vs commands: every console command is one module of framework/commands/,
installed as fw-<name> and runnable as ``python3 -m framework <name>``; nothing else parses a command line."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from framework.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "framework"


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_pyproject_scripts_are_exactly_the_commands():
    assert _scripts() == {f"fw-{name}": f"framework.commands.{name}:main" for name in COMMANDS}
    modules = {p.stem for p in (PACKAGE / "commands").glob("*.py")} - {"__init__", "errors"}
    assert modules == set(COMMANDS)  # a module in commands/ that is no command, or a command without a module


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_module_has_a_main_and_runs_as_main(name):
    module = importlib.import_module(f"framework.commands.{name}")
    assert callable(module.main)
    tree = ast.parse(Path(module.__file__).read_text())
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(guards) == 1, f"framework/commands/{name}.py has no `if __name__ == '__main__'` block"


def test_no_library_module_parses_a_command_line():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.name == "__main__.py":
            continue
        text = path.read_text()
        if "import argparse" in text or '__name__ == "__main__"' in text:
            offenders.append(str(rel))
    assert not offenders, f"command-line code outside framework/commands/: {offenders}"


def _python_m(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "framework", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_python_m_framework_lists_and_dispatches():
    listing = _python_m("--help")
    assert listing.returncode == 0 and all(name in listing.stdout for name in COMMANDS)
    unknown = _python_m("trian")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "trian" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    plan = _python_m("plan", "--help")  # the command's own parser, under its fw- name
    assert plan.returncode == 0 and plan.stdout.startswith("usage: fw-plan")
