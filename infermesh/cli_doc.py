"""Writes docs/cli.md, the reference of every `infermesh` command and option, from the
argument parsers themselves (the help and default each `--help` prints), so the reference
cannot drift from the code. tests/unit/test_cli_reference.py fails when the file is stale.

    python -m infermesh.cli_doc            # rewrite docs/cli.md
    python -m infermesh.cli_doc --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infermesh.cli_help import DELEGATE
from infermesh.docgen import generated_doc_main

DEFAULT_OUT = Path("docs/cli.md")
REGENERATE = "python -m infermesh.cli_doc"
# What the parsers may read from the environment is left out while they are built (defaults
# read from INFERMESH_*, REDIS_URL, OTEL_* ... would otherwise differ between machines).
_KEPT_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")

HEADER = f"""# Command-line reference

Generated from the argument parsers by `{REGENERATE}`: edit the `help=` in the code, not
this file (tests/unit/test_cli_reference.py fails when it is stale). `infermesh COMMAND
--help` prints the same. Where a default comes from the environment, the help says which
variable; the services' variables are in [settings.md](settings.md).
"""


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("infermesh", "jobs", "submit")
    parser: argparse.ArgumentParser
    summary: str  # its line in the parent command's --help

    @property
    def name(self) -> str:
        return " ".join(self.path)


@contextmanager
def documented_environment() -> Iterator[None]:
    """The environment the reference is built in: none of the variables defaults come from."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({name: value for name, value in saved.items() if name in _KEPT_VARIABLES})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _resolved(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A delegated subcommand's own parser (cli_help.add_delegated), else `parser`."""
    module = parser.get_default(DELEGATE)
    if module is None:
        return parser
    built: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    return built


def _walk(path: tuple[str, ...], parser: argparse.ArgumentParser, summary: str) -> Iterator[Command]:
    parser = _resolved(parser)
    yield Command(path, parser, summary)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield from _walk((*path, name), sub, summaries.get(name, ""))


def commands() -> list[Command]:
    """`infermesh` and every subcommand, depth first, in the order --help lists them."""
    from infermesh.cli import build_parser

    return list(_walk(("infermesh",), build_parser(), ""))


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a reference lists: all but --help and the subcommand choice."""
    return [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
    ]


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of `action` as `parser`'s --help prints it, `(default: ...)` included."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _label(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    if not action.option_strings:
        return formatter._format_args(action, action.dest)
    label = ", ".join(action.option_strings)
    if action.nargs != 0:
        label += " " + formatter._format_args(action, action.dest.upper())
    return label


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(command: Command) -> str:
    return "-".join(command.path)


def _description(command: Command) -> list[str]:
    """The description's first paragraph as text; further ones (examples) as written."""
    text = (command.parser.description or command.summary or "").strip()
    if not text:
        return []
    first, _, rest = text.partition("\n\n")
    lines = [" ".join(first.split()), ""]
    if rest.strip():
        lines += ["```text", rest.rstrip(), "```", ""]
    return lines


def _section(command: Command, everything: list[Command]) -> str:
    lines = [f'<a id="{_anchor(command)}"></a>', f"## `{command.name}`", "", *_description(command)]
    subcommands = [c for c in everything if c.path[:-1] == command.path]
    if subcommands:
        lines += ["| Command | What it does |", "|---|---|"]
        lines += [f"| [`{c.path[-1]}`](#{_anchor(c)}) | {_cell(c.summary)} |" for c in subcommands]
        lines.append("")
    listed = arguments(command.parser)
    if listed:
        lines += ["| Argument | Meaning |", "|---|---|"]
        lines += [
            f"| `{_cell(_label(command.parser, action))}` | {_cell(expanded_help(command.parser, action))} |"
            for action in listed
        ]
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    with documented_environment():
        everything = commands()
        return "\n".join([HEADER, *(_section(command, everything) for command in everything)])


def main(argv: list[str] | None = None) -> int:
    return generated_doc_main(REGENERATE, (__doc__ or "").splitlines()[0], DEFAULT_OUT, render, argv)


if __name__ == "__main__":
    sys.exit(main())
