"""model/card.py: round trips and validation errors naming the bad field."""

from __future__ import annotations

import json

import pytest
from osteogate.model.card import IMAGENET_MEAN, InputSpec, ModelCard


def test_defaults_follow_contract():
    card = ModelCard()
    assert card.classes == ("normal", "osteopenia", "osteoporosis")
    assert card.regions == ("knee", "spine")
    assert card.input.mode == "whole" and card.input.size == 224 and card.input.channels == 3
    assert card.input.mean == IMAGENET_MEAN and card.input.pooling == "mean"
    assert card.format_version == 1 and card.trained is False


def test_json_and_dict_round_trip():
    card = ModelCard(
        name="osteo", version="1.2.0", architecture="osteogate_smallcnn", trained=True, temperature=1.7,
        thresholds={"osteoporosis": 0.4}, metrics={"auc": 0.91}, training={"epochs": 3},
        input=InputSpec(mode="patches", patch_size=128, patches_per_image=6, working_size=512),
    )
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert ModelCard.from_dict(card.to_dict()) == card
    data = json.loads(card.to_json())
    assert data["input"]["mode"] == "patches" and data["classes"] == list(card.classes)
    assert InputSpec.from_dict(card.input.to_dict()) == card.input


def test_display_name_marks_untrained():
    assert ModelCard(name="osteo", version="1.0").display_name == "UNTRAINED osteo"
    assert ModelCard(name="osteo", version="1.0", trained=True).display_name == "osteo"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"classes": ["normal"]}, "classes"),
        ({"regions": ["knee", "knee"]}, "regions"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"trained": "yes"}, "trained"),
        ({"thresholds": {"normal": "high"}}, "thresholds"),
        ({"format_version": 2}, "format_version"),
        ({"input": {"mode": "tiles"}}, "input.mode"),
        ({"input": {"size": -1}}, "input.size"),
        ({"input": {"channels": 2}}, "input.channels"),
        ({"input": {"std": [0.2, 0.0, 0.2]}}, "input.std"),
        ({"input": {"mean": [0.5, 0.5]}}, "input.mean"),
        ({"input": {"patch_size": 600, "working_size": 512}}, "input.patch_size"),
        ({"input": {"pooling": "max"}}, "input.pooling"),
        ({"input": {"bogus": 1}}, "input"),
        ({"surprise": 1}, "card"),
    ],
)
def test_validation_names_the_field(change, field):
    data = ModelCard().to_dict()
    for key, value in change.items():
        if key == "input":
            data["input"].update(value)
        else:
            data[key] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        ModelCard.from_dict(data)


def test_bad_json_and_missing_format_version():
    with pytest.raises(ValueError, match="JSON"):
        ModelCard.from_json("{not json")
    data = ModelCard().to_dict()
    del data["format_version"]
    with pytest.raises(ValueError, match="format_version"):
        ModelCard.from_dict(data)
    with pytest.raises(ValueError):
        ModelCard.from_json("[1, 2]")


def test_with_updates_revalidates():
    card = ModelCard()
    assert card.with_updates(trained=True).trained is True
    with pytest.raises(ValueError, match="temperature"):
        card.with_updates(temperature=-1.0)
