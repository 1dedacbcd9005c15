"""docs/configuration.md is generated from the settings dataclasses and must match them."""

from pathlib import Path

from lmserve.configdoc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date():
    assert DOC.read_text() == render(), "run: python -m lmserve.configdoc > docs/configuration.md"



def test_every_setting_is_documented():
    missing = [line.split("|")[1].strip() for line in render().splitlines()
               if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert missing == []
