"""Algorithms, one file each, discovered here: a module of this package that calls :func:`register` on import
is an algorithm. Adding one is one file (its train function, its config dataclass, one ``register`` line),
touching nothing else.

The registry sits above the config layer: ``lowalign.config`` knows no algorithm; ``lowalign.api`` hands
it :func:`train_configs` and runs each algorithm's own ``check`` before any model loads.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm.

    Attributes:
        name: the recipe's ``algorithm:`` value.
        config: dataclass of the recipe's ``train:`` section.
        train: ``train(ctx) -> summary dict``, called with the loaded bundle and data.
        data: ``prompts`` (rows with a prompt), ``preferences`` (chosen/rejected pairs), ``feedback``
            (unpaired completions labelled desirable or not, KTO) or ``ratings`` (completions with numeric
            score columns); or ``data(cfg) -> one of those`` when the recipe decides.
        check: optional ``check(cfg)`` raising ``ConfigError`` for cross-field rules; it runs in
            ``lowalign validate`` and before a run creates anything or loads a model.
        check_data: optional ``check_data(cfg, data)`` raising ``DataError`` when the loaded data cannot
            serve this algorithm (e.g. SFT without answers); runs before the model loads.
        shards: the ``train:`` field whose rows split over ``torchrun`` ranks (``lowalign.distributed``);
            None: the algorithm runs in one process only.
    """

    name: str
    config: type
    train: Callable
    data: Literal["prompts", "preferences", "feedback", "ratings"] | Callable = "prompts"
    check: Callable | None = None
    check_data: Callable | None = None
    shards: str | None = None


_REGISTRY: dict[str, Algorithm] = {}


def register(name: str, config: type, train: Callable, *, data: str | Callable = "prompts",
             check: Callable | None = None,
             check_data: Callable | None = None, shards: str | None = None):
    if name in _REGISTRY and _REGISTRY[name].train is not train:
        raise ValueError(f"algorithm '{name}' is registered twice")
    _REGISTRY[name] = Algorithm(name, config, train, data, check, check_data, shards)


def algorithms() -> dict[str, Algorithm]:
    """Every algorithm of this package (imports each module once; registration happens on import)."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items()))


def train_configs() -> dict[str, type]:
    return {name: a.config for name, a in algorithms().items()}


def data_kind(cfg) -> str:
    """What the recipe's algorithm reads: prompts, preferences, feedback or ratings."""
    d = algorithms()[cfg.algorithm].data
    return d(cfg) if callable(d) else d
