"""Composition errors as one sentence, and fw-train's check of its command line before Hydra's run starts.

Hydra and OmegaConf report an unknown key, a value of the wrong type, a name outside a closed set or an unknown
group option in several lines (the config search path, reference types) and ``fw-train`` exited 1 with them.
``explain`` turns each into one sentence naming the key or value and what to do (the valid names, the closest
key); ``check_command_line`` composes every run a command line asks for (each point of a ``-m`` sweep) before
``hydra.main`` creates a run directory, and exits 2 with that sentence.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import sys
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
    """A config a user can fix; its message is one sentence."""


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0].strip() if str(text).strip() else ""


def _field_type(object_type: Any, key: Any) -> Any:
    """The annotated type of ``key`` in the dataclass ``object_type`` (Optional unwrapped), or None."""
    if not (isinstance(object_type, type) and dataclasses.is_dataclass(object_type)):
        return None
    hint = typing.get_type_hints(object_type).get(str(key))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _choices(enum_type: type[enum.Enum]) -> str:
    return ", ".join(m.name for m in enum_type)


def _unknown_key(err: Any) -> str:
    full_key, key = str(err.full_key or err.key), str(err.key)
    parent = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else ""
    object_type = getattr(err, "object_type", None)
    known = ([f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type)
             else [str(k) for k in (err.parent_node.keys() if err.parent_node is not None else [])])
    close = difflib.get_close_matches(key, known, n=1)
    where = f"{parent}." if parent else ""
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    return (f"{full_key} is not a setting{hint}; the settings{' of ' + parent if parent else ''} are "
            f"{', '.join(known)}.")


def _bad_value(err: Any, overrides: Sequence[str]) -> str:
    full_key = str(err.full_key or err.key)
    match = re.search(r"(?:Value|Invalid value) '(.*?)'", str(err.msg))
    value = match.group(1) if match else _override_value(full_key, overrides)
    kind = _field_type(getattr(err, "object_type", None), err.key)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return f"{full_key}={value} is not one of {_choices(kind)}; pick one of those."
    if kind in _KINDS:
        return f"{full_key}={value} is not {_KINDS[kind]}; give {full_key} {_KINDS[kind]}."
    return f"{full_key}={value} is not valid here: {_first_line(err.msg)}."


def _override_value(key: str, overrides: Sequence[str]) -> str:
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key:
            return value
    return "?"


def _missing_option(err: Any) -> str:
    group, _, option = str(err.missing_cfg_file).rpartition("/")
    if not group or err.options is None:
        return f"{_first_line(err)}; check the name of the config file."
    return (f"{group}={option} is not an option of the {group} group; pick one of {', '.join(err.options)} "
            f"(files in conf/{group}/).")


def _bad_syntax(overrides: Sequence[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as err:  # noqa: BLE001 - any parse failure names this override
            return (f"the override {override!r} is not valid override syntax ({_first_line(err)}); quote values "
                    "with spaces, brackets or commas, e.g. 'data.paths=[a.jsonl,b.jsonl]'.")
    return "an override is not valid override syntax; see https://hydra.cc/docs/advanced/override_grammar/basic/."


def explain(err: BaseException, overrides: Sequence[str] = ()) -> str:
    """One sentence for a Hydra or OmegaConf composition error: the key or value, and what to do."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, OverrideParseException):
        return _bad_syntax(overrides)
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) and err.__cause__ is not None else err
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):  # a key the schema does not have
        return _unknown_key(cause)
    if isinstance(cause, MissingMandatoryValue):
        return f"{cause.full_key} must be given (it is ??? in the composed config); add {cause.full_key}=<value>."
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return _bad_value(cause, overrides)
    ambiguous = re.match(r"Ambiguous value for argument '(.*?)'", str(err))
    if ambiguous:
        return (f"{ambiguous.group(1)} gives several values; add -m to sweep over them, write key=[a,b] for a list "
                "or quote the value for a string.")
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text.rstrip(".") + "."


def check_known_keys(cfg: Any, schema: type) -> None:
    """Raise ConfigKeyError for a key of ``cfg`` that the dataclass ``schema`` lacks (a ``+key=value`` override
    bypasses struct mode), in dataclass-typed nodes at any depth."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError

    names = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in names:
            err = ConfigKeyError(f"Key {key!r} not in {schema.__name__!r}")
            err.key, err.full_key, err.object_type, err.parent_node = key, _full_key(cfg, key), schema, cfg
            raise err
        child, kind = cfg._get_node(key), _field_type(schema, key)
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(cfg, key) and child._is_none() is False:
            if dataclasses.is_dataclass(kind):
                check_known_keys(child, kind)
            elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
                for name in child.keys():
                    if isinstance(child._get_node(name), DictConfig):
                        check_known_keys(child._get_node(name), typing.get_args(kind)[1])


def _full_key(cfg: Any, key: str) -> str:
    prefix = cfg._get_full_key("") if hasattr(cfg, "_get_full_key") else ""
    return f"{prefix}.{key}" if prefix else str(key)


# ------------------------------------------------------------------------------------------- fw-train's check
def sweep_points(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The override lists of every run a command line asks for (one unless ``-m`` sweeps)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def check_command_line(argv: Sequence[str]) -> None:
    """Compose every run ``fw-train argv`` asks for; on a bad one print one sentence and exit 2 before Hydra
    creates any directory. Hydra's own flags (--help, --info, --cfg, a config path or name) are left to it."""
    from hydra._internal.utils import get_args_parser

    from framework.config import compose

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return  # Hydra's parser reports its own usage errors
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_name
            or args.config_dir or args.experimental_rerun):
        return
    try:
        points = sweep_points(args.overrides, args.multirun)
    except Exception as err:  # noqa: BLE001 - a sweep this check cannot expand (glob, range): Hydra reports it
        if _is_parse_error(err):
            _exit(_bad_syntax(args.overrides))
        return
    try:
        for point in points:
            compose(point)
    except ValueError as err:  # ConfigError, or a schema's own check (cluster.nodes=0)
        if os.environ.get("FRAMEWORK_TRACEBACK"):
            raise
        _exit(str(err).strip("'\""))


def _is_parse_error(err: BaseException) -> bool:
    from hydra.errors import OverrideParseException

    return isinstance(err, OverrideParseException)


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
