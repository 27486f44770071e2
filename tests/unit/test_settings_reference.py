"""docs/settings.md is what `python -m infermesh.settings_doc` writes from the settings classes."""

from __future__ import annotations

from pathlib import Path

from gateway.service import GatewaySettings
from infermesh.settings_doc import REGENERATE, SERVICES, main, render

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_the_settings_reference_is_up_to_date() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/settings.md is stale: run `{REGENERATE}` from the repository root and commit the result"
    )


def test_every_variable_is_in_the_reference_with_a_meaning() -> None:
    text = render()
    for settings_cls in SERVICES.values():
        for name, field in settings_cls.model_fields.items():
            assert f"| `{settings_cls.variable(name)}` |" in text
            assert field.description, f"{settings_cls.variable(name)} has no Field(description=...)"
    for service in SERVICES:
        assert f"| `{service.upper()}_TLS_CLIENT_CA` |" in text


def test_a_row_shows_type_range_and_default() -> None:
    row = next(line for line in render().splitlines() if line.startswith("| `GATEWAY_FALLBACK_RESERVE` |"))
    assert "| number, >= 0, < 1 | `0.1` |" in row
    assert GatewaySettings.model_fields["fallback_reserve"].description in row


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "settings.md"
    stale.write_text("old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0
    assert main(["--check", "--out", str(stale)]) == 0
