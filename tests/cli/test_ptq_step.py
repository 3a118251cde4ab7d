"""The settings a recipe's ptq step hands to the int8 preset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgeslim.ptq.presets import PRESET_SETTINGS
from edgeslim.recipe.steps import ptq_overrides

SENTENCES = SimpleNamespace(task="sentence-embedding", name="minilm-l6")
PHOTOS = SimpleNamespace(task="image-classification", name="efficientnet-lite0")


@pytest.mark.parametrize("wl", [SENTENCES, PHOTOS], ids=["sentences", "photos"])
def test_the_static_scheme_calibrates_with_the_documented_default(wl):
    # docs/recipes.md: calibration defaults to percentile (99.99); a sentence model given
    # scheme: static fell back to quantize's own minmax
    settings = {**PRESET_SETTINGS["embedding" if wl is SENTENCES else "classification"],
                **ptq_overrides(wl, scheme="static")}
    assert settings["method"] == "percentile"
    assert settings.get("percentile", 99.99) == 99.99


def test_a_calibration_named_in_the_recipe_wins():
    assert ptq_overrides(SENTENCES, scheme="static", calibration="entropy")["method"] == "entropy"


def test_the_dynamic_scheme_gets_no_calibration_method():
    assert "method" not in ptq_overrides(SENTENCES)
