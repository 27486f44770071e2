"""The argument parsers of `infermesh` and its subcommands, made alike.

Every option's help ends with its default, `(default: 8080)`, unless the help already says
what the default is in words (`default $INFERMESH_DATA_DIR or ./.infermesh`): a value read
from the environment or worked out at run time is documented as such, not as whatever the
machine that printed it had. Flags (off unless given) and options without a value show none.
docs/cli.md is generated from these same parsers (infermesh.cli_doc).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Actions whose default is implied by their kind: a flag is off unless given.
_IMPLIED_DEFAULT = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._StoreConstAction,
    argparse._AppendConstAction,
    argparse._CountAction,
    argparse._HelpAction,
    argparse._VersionAction,
    argparse._SubParsersAction,
)
# Raised by a file or directory the user named (missing, a directory, not readable): the
# message names the path, so it is shown as it is, without a traceback.
_USER_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
# Where a subcommand's own parser lives (see add_delegated).
DELEGATE = "_delegate"


def shows_default(action: argparse.Action) -> bool:
    """Whether --help appends `(default: <value>)` to this argument's help."""
    if isinstance(action, _IMPLIED_DEFAULT):
        return False
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        return False
    if isinstance(default, str | list | tuple | dict) and not default:
        return False  # nothing to show: the help says what leaving it out does
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return False  # a required positional
    text = action.help or ""
    return "default" not in text.lower() and "%(default)" not in text


def help_text(action: argparse.Action) -> str:
    """The help of `action` as --help prints it, default included, before %-expansion."""
    text = action.help or ""
    return f"{text} (default: %(default)s)" if shows_default(action) else text


class DefaultsHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        return help_text(action)


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """For descriptions laid out by hand (examples, one per line)."""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows defaults; its subcommands' parsers are too."""

    def __init__(
        self,
        prog: str | None = None,
        *,
        formatter_class: type[argparse.HelpFormatter] = DefaultsHelpFormatter,
        **kwargs: Any,
    ) -> None:
        super().__init__(prog, formatter_class=formatter_class, **kwargs)


def add_delegated(commands: argparse._SubParsersAction[Any], name: str, module: str, summary: str) -> None:
    """A subcommand whose parser is `module`'s build_parser(): its arguments, --help
    included, are left to that parser, which `module`.main(argv) runs."""
    sub = commands.add_parser(name, help=summary, add_help=False)
    sub.set_defaults(**{DELEGATE: module})


def run_delegated(args: argparse.Namespace, rest: Sequence[str]) -> int | None:
    """Run the subcommand `args` chose if it is a delegated one (its exit status), else None."""
    module = getattr(args, DELEGATE, None)
    if module is None:
        return None
    try:
        return int(importlib.import_module(module).main(list(rest)) or 0)
    except _USER_FILE_ERRORS as error:  # a path the user gave: their mistake, told in one line
        print(f"{_prog(module)}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `infermesh status --json | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


def _prog(module: str) -> str:
    """The command's name as its --help writes it (`infermesh models import`)."""
    build = getattr(importlib.import_module(module), "build_parser", None)
    return build().prog if build is not None else "infermesh"


def group_parser(prog: str, description: str, commands: Mapping[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """A command group (`infermesh models`, `infermesh drift`): every subcommand delegated to
    a module, `commands` mapping its name to (module, one-line summary)."""
    parser = CommandParser(prog=prog, description=description)
    subcommands = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in commands.items():
        add_delegated(subcommands, name, module, summary)
    return parser


def run_group(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv` with a group_parser and run the subcommand it names."""
    args, rest = parser.parse_known_args(argv)
    delegated = run_delegated(args, rest)
    assert delegated is not None  # every subcommand of a group is delegated
    return delegated


def whole_number(minimum: int, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` (to `at_most`), else a usage error saying so."""
    bound = f"from {minimum}" + (f" to {at_most}" if at_most is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give a whole number {bound}")
        return value

    return parse


def whole_numbers(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated whole numbers from `minimum` (at least one)."""
    each = whole_number(minimum)

    def parse(text: str) -> list[int]:
        try:
            values = [each(part) for part in text.split(",") if part.strip()]
        except argparse.ArgumentTypeError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give whole numbers from {minimum}, comma-separated")
        return values

    return parse


def number(
    *, above: float | None = None, at_least: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a finite number above `above` or from `at_least`, and at most
    `at_most` when given (nan and inf refused)."""
    bound = f"above {above:g}" if above is not None else f"from {at_least:g}"
    bound += f" and at most {at_most:g}" if at_most is not None else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        in_range = (
            (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (at_most is None or value <= at_most)
        )
        if not math.isfinite(value) or not in_range:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give a finite number {bound}")
        return value

    return parse


# An argparse type: a TCP port.
port = whole_number(1, at_most=65535)
