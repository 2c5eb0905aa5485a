"""Recipes and overrides: typed, validated, and every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from prospect.errors import UserError
from prospect.losses import get_loss
from prospect.recipe import load_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_overrides_are_typed_by_the_option():
    cfg = load_config(
        None,
        [
            "train.learning_rate=1e-5",
            "train.max_steps=7",
            "model.name=0.5",
            "data.eval=null",
            "train.deterministic=false",
            "loss.beta=0.25",
        ],
    )
    assert cfg.train.learning_rate == 1e-5 and cfg.train.max_steps == 7
    assert cfg.model.name == "0.5"  # a string option keeps the text as typed
    assert cfg.data.eval is None and cfg.train.deterministic is False
    assert get_loss("kto").make_params(cfg.loss, "x").beta == 0.25


def test_yaml_scientific_notation_is_a_number(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 1e-5\n")
    assert load_config(str(recipe)).train.learning_rate == 1e-5


@pytest.mark.parametrize("text", ["train.lr", "train=1", "a.b.c=1"])
def test_malformed_overrides(text):
    with pytest.raises(UserError, match=r"expected section\.key=value"):
        load_config(None, [text])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_load(recipe):
    cfg = load_config(str(recipe))
    get_loss(cfg.loss_name).make_params(cfg.loss, str(recipe))


def test_recipe_by_name():
    assert load_config("kto_smollm2_vader").source.endswith("recipes/kto_smollm2_vader.yaml")
    with pytest.raises(UserError, match="no_such_recipe: no such recipe file"):
        load_config("no_such_recipe")
