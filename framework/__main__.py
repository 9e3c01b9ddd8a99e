"""``python3 -m framework <command> [args]``: the ``fw-<command>`` console scripts without installing them.

The command's module runs as ``__main__`` (``runpy``), exactly as ``python3 -m framework.commands.<command>``
would run it, so a process it relaunches (Lightning's DDP launcher re-runs ``python -m <__main__'s module>``
with the same arguments) runs the same command.
"""

from __future__ import annotations

import runpy
import sys

from framework.commands import COMMANDS, module_name


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "usage: python3 -m framework <command> [args]  (each is also fw-<command>)\n\ncommands:\n" + "\n".join(lines)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command = sys.argv[1]
    if command not in COMMANDS:
        print(f"error: {command!r} is not a command; choose one of {', '.join(COMMANDS)} "
              "(python3 -m framework --help).", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"{sys.argv[0]} {command}", *sys.argv[2:]]
    runpy.run_module(module_name(command), run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
