"""The method registry: ``@register(name)``, ``get(name)``, ``available()``.

Built-in methods register on import of :mod:`methods`; third-party packages add methods through the
``clipkd.methods`` entry-point group, loaded on first lookup. An entry point may name a module (whose import
calls ``@register``) or a ``DistillMethod`` subclass (registered under the entry point's name).
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import TypeVar

from methods.base import DistillMethod

ENTRY_POINT_GROUP = "clipkd.methods"

_REGISTRY: dict[str, type[DistillMethod]] = {}
_entry_points_loaded = False

M = TypeVar("M", bound=type[DistillMethod])


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return self.args[0]


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``methods.get(name)``."""

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
            raise TypeError(f"@register({name!r}) expects a DistillMethod subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not hide the built-ins
            raise ImportError(
                f"entry point {entry_point.name!r} = {entry_point.value!r} in group {ENTRY_POINT_GROUP!r} "
                f"failed to import: {error}"
            ) from error
        if isinstance(loaded, type) and issubclass(loaded, DistillMethod) and entry_point.name not in _REGISTRY:
            register(entry_point.name)(loaded)


def available() -> dict[str, str]:
    """Registered method names mapped to their one-line descriptions, sorted by name."""
    _load_entry_points()
    return {name: _REGISTRY[name].description() for name in sorted(_REGISTRY)}


def get(name: str) -> type[DistillMethod]:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown distillation method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None
