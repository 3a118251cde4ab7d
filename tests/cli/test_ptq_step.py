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


def test_a_calibration_named_in_the_recipe_wins():
    assert ptq_overrides(SENTENCES, scheme="static", calibration="entropy")["method"] == "entropy"


def test_the_dynamic_scheme_gets_no_calibration_method():
    assert "method" not in ptq_overrides(SENTENCES)


def test_a_missed_goal_names_the_size_when_that_is_what_broke():
    from edgeslim.pipeline import _fidelity

    report = {"goal_met": False, "drop": 0.0, "config": {"max_size_ratio": 0.27},
              "metrics": {"top1_agreement": 1.0, "size_ratio": 0.4}}
    # it read "top1_agreement 1.0000, a drop of 0.0000": a missed goal with nothing missed
    assert _fidelity(report) == ("top1_agreement 1.0000, a drop of 0.0000; size_ratio 0.400 "
                                 "over max_size_ratio 0.27")
    report["metrics"]["size_ratio"] = 0.26
    assert "size_ratio" not in _fidelity(report)


@pytest.mark.parametrize(("wl", "mode"), [(SENTENCES, True), (PHOTOS, "unpaired")],
                         ids=["sentences", "photos"])
def test_7_bit_weights_are_int8_kernels_on_the_reduced_range(wl, mode):
    """bits: 7 asks for int8 kernels that are exact and fast without VNNI: every weight on the
    reduced range for the dynamic scheme, only those whose channels do not pair for the static
    QOperator one (ptq/exact.py, narrow_unpaired)."""
    overrides = ptq_overrides(wl, bits=7)
    assert overrides["reduce_range"] == mode and "bits" not in overrides
    assert type(overrides["reduce_range"]) is type(mode)
    assert "reduce_range" not in ptq_overrides(wl)
