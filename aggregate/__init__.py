"""Aggregators by name: FAST-GRU (paper Eq. 4) and the baselines of Table 3 (avg, concat Eq. 5, lstm, gru).

``register(name)`` is a class decorator; ``get(name)`` returns the class, ``names()`` the sorted names.
A duplicate name is refused. Importing this package does not import torch: the built-in aggregators
(faster.aggregate.models) are imported on the first ``get``/``names``, so ``faster --help`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from faster.errors import BadValue

__all__ = ["get", "names", "register"]

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


def _load_builtin() -> None:
    importlib.import_module(_BUILTIN)  # registers avg, concat, lstm, gru, fastgru once


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
