"""Help that teaches: every flag's default in ``--help``, and an unknown flag answered with the
subcommand's own usage and the nearest flag it has ("did you mean --nodes?")."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from gossipfl.config import RunConfig

__all__ = ["config_defaults", "parse_args", "show_defaults"]


def config_defaults() -> dict[str, Any]:
    """The built-in value of every configuration key (what a flag left out means)."""
    cfg = RunConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def show_defaults(parser: argparse.ArgumentParser, defaults: Mapping[str, Any], *,
                  special: Mapping[str, str] | None = None) -> None:
    """Append ``(default: X)`` to the help of every option that does not say its default yet:
    ``special[dest]`` if given, else the parser's own default, else the configuration's."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        text = action.help or ""
        if "default" in text:
            continue
        if special and action.dest in special:
            shown = special[action.dest]
        elif action.default not in (None, argparse.SUPPRESS) and not isinstance(action, argparse._CountAction):
            if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
                continue
            shown = _shown(action.default)
        elif action.dest in defaults:
            if isinstance(action, argparse._StoreConstAction):
                continue  # an on/off switch: its help says what it turns on
            shown = _shown(defaults[action.dest])
        else:
            continue
        action.help = f"{text} (default: {shown})" if text else f"(default: {shown})"


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown option gets the subcommand's usage and a suggestion."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = _subparser(parser, getattr(args, "command", None))
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    unknown = next((e for e in extra if e.startswith("-")), extra[0])
    guess = difflib.get_close_matches(unknown.split("=")[0], flags, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]}?" if guess else f"; `{sub.prog} --help` lists them"
    _error(sub, f"unrecognized arguments: {' '.join(extra)}{hint}")


def _error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    parser.exit(2, f"{parser.prog}: error: {message}\n")
