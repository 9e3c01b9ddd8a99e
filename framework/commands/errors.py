"""Mistakes a user can make, caught at a console command's boundary: one line on stderr, exit status 2, no
traceback (``FRAMEWORK_TRACEBACK=1`` shows it). Also the one-sentence form of an error that Hydra words for its
own developers: an override naming no setting.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

# what a bad setting, a missing or unreadable input file, or an existing output raises in this framework
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                                 IsADirectoryError, NotADirectoryError)


def one_line(err: BaseException) -> str:
    """The error's message as one line, with a Hydra override error's cause made plain."""
    message = str(err).strip("'\"")
    try:
        from hydra.errors import HydraException
    except ImportError:  # pragma: no cover - hydra is a dependency
        HydraException = ()  # noqa: N806
    if isinstance(err, HydraException):
        message = override_message(err)
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def override_message(err: BaseException) -> str:
    """``Could not override 'data.nope'. To append ...`` -> one sentence naming the key and what to do."""
    text = str(err)
    cause = err.__cause__
    if text.startswith("Could not override '") and cause is not None:
        key = text.split("'")[1]
        return (f"{key} is not a setting of the training config ({str(cause).splitlines()[0]}); check the spelling "
                "against conf/ (python3 -m framework train --cfg job lists every setting).")
    return text


@contextmanager
def user_errors(prog: str = "", extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a user error raised inside into ``[prog: ]error: <one line>`` on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS + extra as err:
        if os.environ.get("FRAMEWORK_TRACEBACK"):
            raise
        print(f"{prog + ': ' if prog else ''}error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
