"""The README documents every setting, so configuration never drifts from the code."""

from __future__ import annotations

from pathlib import Path

from encoder_service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [
        f"ENCODER_{name.upper()}"
        for name in Settings.model_fields
        if f"ENCODER_{name.upper()}" not in text
    ]
    assert not missing, f"README lacks {missing}"
