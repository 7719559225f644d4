"""The training tasks, by the config's ``task:`` name. A new task is one file in this folder and
one ``register`` call (or one line in TASKS). Task modules are imported when a run needs them, so
``check_task`` costs nothing before torch loads (the CLI checks the name first)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import RecipeConfig
    from visionzoo.engine.tasks.base import RunEnv, Task


def _lazy(module: str, name: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(f"visionzoo.engine.tasks.{module}"), name)


TASKS: dict[str, Callable[[], type]] = {
    "supervised": _lazy("classify", "ClassifyTask"),  # image classification with labels
    "dino": _lazy("dino", "DinoTask"),  # DINO self-distillation (facebookresearch/dino)
}


def register(name: str, task: type) -> None:
    """Make ``task`` (a ``Task`` subclass) trainable as ``task: <name>``."""
    TASKS[name] = lambda: task


def check_task(name: str) -> None:
    """A UserError, with the closest name, for a task that is not registered."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"task={name!r} is not a task visionzoo has{hint} (have: {', '.join(TASKS)})")


def check_config(cfg: RecipeConfig, world_size: int, device_type: str) -> RecipeConfig:
    """``cfg`` as it runs on ``world_size`` devices of ``device_type`` (config.for_world_size),
    once its task has passed the checks that need no data (``Task.check``); a UserError otherwise."""
    from visionzoo.config import for_world_size

    check_task(cfg.task)
    cfg = for_world_size(cfg, world_size)
    TASKS[cfg.task]().check(cfg, world_size, device_type)
    return cfg


def make_task(cfg: RecipeConfig, env: RunEnv) -> Task:
    """The task ``cfg.task`` names, for ``cfg`` on ``env`` (not yet set up)."""
    check_task(cfg.task)
    return TASKS[cfg.task]()(cfg, env)
