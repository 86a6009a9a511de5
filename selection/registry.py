"""The selector registry: ``@register(name)``, ``get(name)``, ``available()``.

The contract of a selector: a class built as ``Selector(**options)`` whose ``select(batch, keep)`` returns the
indices of ``keep`` examples of a ``selection.SuperBatch``; subclassing ``selection.base.Selector`` (which selects
by its ``scores``) is a convenience, not a condition. Built-ins register on first lookup; third-party packages add
selectors through the ``clipkd.selectors`` entry-point group, read on first lookup: an entry point names a module
(whose import calls ``@register``) or a selector class (registered under the entry point's name).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from core.errors import ClipkdError
from selection import BUILTIN, ENTRY_POINT_GROUP

CONTRACT = ("a selector is a class built as Selector(**options) whose select(batch, keep) returns the indices of keep "
            "examples of a selection.SuperBatch")

_REGISTRY: dict[str, type] = {}
_loaded = False

S = TypeVar("S", bound=type)


class SelectorError(ClipkdError, ValueError):
    """An unknown selector, or a plugin that does not meet the contract (named with its entry point and package)."""


def contract_problem(cls: object) -> str | None:
    if not isinstance(cls, type):
        return f"is a {type(cls).__name__}, not a class"
    if not callable(getattr(cls, "select", None)):
        return "has no select(batch, keep)"
    return None


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` available as ``selection.registry.get(name)``."""

    def decorator(cls: S) -> S:
        problem = contract_problem(cls)
        if problem:
            raise TypeError(f"@register({name!r}): {cls!r} {problem}; {CONTRACT}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"selector {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:  # first: a plugin cannot take a built-in's name
        importlib.import_module(f"selection.{name}")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = entry_point.dist
        where = (f"entry point {entry_point.name!r} = {entry_point.value!r} of "
                 f"{f'package {package.name} {package.version}' if package else 'an unknown package'} "
                 f"(group {ENTRY_POINT_GROUP})")
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken third-party plugin is named, not a traceback
            raise SelectorError(f"{where} failed to import: {type(error).__name__}: {error}") from None
        if isinstance(loaded, ModuleType):  # its import registered its selectors
            continue
        problem = contract_problem(loaded)
        if problem:
            raise SelectorError(f"{where} names {loaded!r}, which {problem}; {CONTRACT}")
        if entry_point.name not in _REGISTRY:
            register(entry_point.name)(loaded)


def available() -> dict[str, str]:
    """Registered selector names mapped to the first line of their docstrings, sorted by name."""
    _load()
    return {name: (inspect.getdoc(cls) or cls.__name__).strip().splitlines()[0] for name, cls in sorted(_REGISTRY.items())}


def get(name: str) -> type:
    _load()
    if name not in _REGISTRY:
        raise SelectorError(f"unknown selector {name!r}; registered selectors: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, options: dict):
    """The selector ``name`` with its options; bad options are one message naming them."""
    try:
        return get(name)(**options)
    except TypeError as error:
        raise SelectorError(f"train.selection: selector {name!r} takes no options {sorted(options)}: {error}") from None
