"""Every `infermesh` command's --help lists its options with their defaults, and docs/cli.md
is what `python -m infermesh.cli_doc` writes from the same parsers."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from infermesh import cli
from infermesh.cli_doc import REGENERATE, arguments, commands, documented_environment, expanded_help, main, render
from infermesh.cli_help import DELEGATE, CommandParser, help_text, shows_default

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
_FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._VersionAction)


def test_the_cli_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/cli.md is stale: run `{REGENERATE}` from the repository root and commit the result"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text("old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0
    assert main(["--check", "--out", str(stale)]) == 0


def test_every_command_and_subcommand_is_in_the_reference() -> None:
    with documented_environment():
        found = {command.name: command for command in commands()}
    for name in cli.DELEGATED:
        assert f"infermesh {name}" in found
    for name in ("up", "jobs submit", "jobs bench", "models import", "features bench", "envoy render"):
        assert f"infermesh {name}" in found
    text = render()
    for name in found:
        assert f"## `{name}`" in text
    # A delegated subcommand is documented by its own parser, not by the stub that hands over.
    assert not [name for name, command in found.items() if command.parser.get_default(DELEGATE)]


def test_every_option_has_a_help_that_states_its_default() -> None:
    missing_help, missing_default = [], []
    with documented_environment():
        listed = [(command, action) for command in commands() for action in arguments(command.parser)]
    for command, action in listed:
        what = f"{command.name} {'/'.join(action.option_strings) or action.dest}"
        if not (action.help or "").strip():
            missing_help.append(what)
            continue
        default = action.default
        has_value = not isinstance(action, _FLAGS) and default not in (None, argparse.SUPPRESS, "", [], {}, ())
        if has_value and "default" not in expanded_help(command.parser, action).lower():
            missing_default.append(what)
    assert not missing_help, f"arguments without help=: {missing_help}"
    assert not missing_default, f"--help shows no default for: {missing_default}"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--help"], "(default: 1)"),  # --concurrency, through the delegation
        (["up", "--help"], "(default: 120.0)"),  # --timeout
        (["models", "import", "--help"], "(default 0.0001)"),  # two levels of delegation
        (["jobs", "bench", "--help"], "(default 100000)"),
        (["plan", "--help"], "(default: 0.6)"),
    ],
)
def test_help_prints_the_defaults(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"usage: infermesh {argv[0]}" in out
    assert expected in out


def test_a_default_is_shown_once_and_only_where_it_says_something() -> None:
    parser = CommandParser(prog="x")
    shown = parser.add_argument("--port", type=int, default=8080, help="the port")
    said = parser.add_argument("--dir", default="/tmp", help="where (default $X_DIR or /tmp)")
    templated = parser.add_argument("--rate", default=1.5, help="rate (%(default)s)")
    flag = parser.add_argument("--force", action="store_true", help="do it")
    unset = parser.add_argument("--out", default=None, help="a file")
    empty = parser.add_argument("--host", action="append", default=[], help="repeatable")
    assert shows_default(shown)
    assert not any(shows_default(a) for a in (said, templated, flag, unset, empty))
    assert help_text(shown) == "the port (default: %(default)s)"
    assert "the port (default: 8080)" in " ".join(parser.format_help().split())


def test_the_reference_ignores_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    expected = render()
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:1/0")
    monkeypatch.setenv("SCORING_MODEL_REPOSITORY", str(tmp_path))
    assert render() == expected
    assert os.environ["REDIS_URL"] == "redis://elsewhere:1/0"  # restored afterwards
