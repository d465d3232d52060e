"""Recipes: typed, nested dataclasses that say what ``ftrain train`` trains, loaded from YAML.

A recipe file names its ``task`` and sets any of the sections of :class:`~ftrain.recipes.config.Recipe`::

    task: gpt
    model: {n_layer: 4, d_model: 128}
    train: {steps: 300, batch_size: 16}

The built-in recipes are the YAML files next to this module (``gpt``, ``digits``); :func:`load_recipe` takes
their name or the path of a YAML file. The task (``gpt``, ``digits``) decides the types of ``model`` and ``data``
and how the recipe becomes a :class:`~ftrain.recipes.task.Task`.

Example:
    >>> recipe = load_recipe("gpt")
    >>> recipe.task, recipe.model.n_layer
    ('gpt', 4)
    >>> load_recipe("gtp")
    Traceback (most recent call last):
    ...
    ftrain.recipes.config.RecipeError: unknown recipe 'gtp' (did you mean 'gpt'?): give a built-in recipe (digits, gpt) or the path of a YAML file
"""  # noqa: E501

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
import yaml

from ftrain.recipes import digits, gpt
from ftrain.recipes.config import Recipe, RecipeError, from_dict, to_dict
from ftrain.recipes.task import Task

__all__ = ["TASKS", "Recipe", "RecipeError", "Task", "build_task", "builtin_recipes", "load_recipe", "recipe_from_dict"]

RECIPE_DIR = Path(__file__).parent
TASKS: dict[str, Any] = {"gpt": (gpt.GPTRecipe, gpt.build), "digits": (digits.DigitsRecipe, digits.build)}


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes (the YAML files shipped in ``ftrain/recipes``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_type(task: str) -> type[Recipe]:
    """The recipe dataclass of ``task``.

    Raises:
        RecipeError: an unknown task.
    """
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r}; the tasks are {', '.join(sorted(TASKS))}")
    return TASKS[task][0]


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """A recipe from parsed YAML (or a checkpoint's stored recipe): ``task`` picks the type, the rest is checked.

    Raises:
        RecipeError: no or an unknown ``task``, an unknown key, a wrong type or a bad value.
    """
    if not isinstance(data, dict) or "task" not in data:
        raise RecipeError(f"{where}: a recipe is a mapping with a 'task' key ({', '.join(sorted(TASKS))})")
    body = {k: v for k, v in data.items() if k != "task"}
    return from_dict(recipe_type(str(data["task"])), body)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe YAML file by path.

    Raises:
        RecipeError: an unknown name, a missing or unparsable file, or a bad recipe (names the key).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in builtin_recipes():
        path = RECIPE_DIR / f"{text}.yaml"
    elif not (text.endswith((".yaml", ".yml")) or path.is_file()):
        close = difflib.get_close_matches(text, builtin_recipes(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"unknown recipe {text!r}{hint}: give a built-in recipe ({', '.join(builtin_recipes())}) or the path "
            "of a YAML file"
        )
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from None
    try:
        return recipe_from_dict(data, where=f"recipe file {str(path)!r}")
    except RecipeError as err:
        raise RecipeError(f"{path.name}: {err}") from None


def build_task(recipe: Recipe, key: torch.Tensor) -> Task:
    """The :class:`Task` of ``recipe``, its initial weights drawn from ``key``."""
    return TASKS[recipe.task][1](recipe, key)


def dump(recipe: Recipe) -> str:
    """The recipe as YAML (what ``ftrain info`` prints and ``load_recipe`` reads back)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=None)
