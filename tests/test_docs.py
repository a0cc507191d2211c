"""The documentation keeps up with the code: every setting is in .env.example and the README's table."""

from pathlib import Path

import pytest

from agent_app import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", [name.upper() for name in Settings.model_fields])
def test_every_setting_is_documented(name: str) -> None:
    assert f"{name}=" in (ROOT / ".env.example").read_text()
    assert f"`{name}`" in (ROOT / "README.md").read_text()


def test_the_readme_starts_with_the_two_commands() -> None:
    first_lines = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any("pip install -r requirements.txt" in line and "uvicorn agent_app:app" in line for line in first_lines)
    assert any(line.startswith("bash .ci/run") for line in first_lines)
