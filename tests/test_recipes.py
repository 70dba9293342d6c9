"""Every shared recipe in recipes/ validates and merges the bundled example adapters."""

from pathlib import Path

import pytest

from lowrank_methods.pipeline.engine import run_merge
from lowrank_methods.pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_merges(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name the example adapters relative to the repository root, as mergekit does
    report = run_merge(load_recipe(path), tmp_path / "out", quiet=True)
    assert len(report.modules) == 36
    assert (tmp_path / "out" / "README.md").is_file()
