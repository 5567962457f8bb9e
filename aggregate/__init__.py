"""Aggregators by name: FAST-GRU (paper Eq. 4, ``fastgru``), the baselines of Table 3 (``avg``,
``concat`` Eq. 5, ``lstm``, ``gru`` Eqs. 2-3), and from related papers ``netvlad``, ``nextvlad``
(aggregate/vlad.py) and ``tam`` (aggregate/tam.py); ``names()`` lists what is registered.

``register(name)`` is a class decorator; ``get(name)`` returns the class, ``names()`` the sorted names.
A duplicate name is refused. Importing this package does not import torch: the built-in aggregators
(faster.aggregate.models, which imports vlad and tam) are imported on the first ``get``/``names``,
so ``faster --help`` stays light. To add one, subclass ``faster.aggregate.models.Aggregator`` (its
docstring says what to implement) and register it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from faster.errors import BadValue

__all__ = ["check_dropout", "get", "names", "register"]

_REGISTRY: dict[str, Any] = {}
_BUILTIN = "faster.aggregate.models"
T = TypeVar("T")


def register(name: str) -> Callable[[T], T]:
    """Class decorator registering an aggregator under ``name``; a name already taken raises ValueError."""
    if not name or not isinstance(name, str):
        raise BadValue(f"aggregator name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        if name in _REGISTRY:
            raise BadValue(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return decorate


def check_dropout(value: float) -> float:
    """The dropout before an aggregator's classifier: in [0, 1)."""
    if not 0 <= value < 1:
        raise BadValue(f"dropout must be in [0, 1), got {value}")
    return float(value)


def _load_builtin() -> None:
    importlib.import_module(_BUILTIN)  # registers the eight built-in aggregators once


def names() -> list[str]:
    """Registered aggregator names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Any:
    """The aggregator class registered as ``name``."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadValue(f"unknown aggregator {name!r}; expected one of {', '.join(sorted(_REGISTRY))}") from None
