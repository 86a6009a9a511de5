"""The selector registry: ``@register(name)``, ``get(name)``, ``available()``, ``build(name, options)``.

The contract of a selector: a class built as ``Selector(**options)`` whose ``select(batch, keep)`` returns the
indices of ``keep`` examples of a ``selection.base.SuperBatch``; subclassing ``selection.base.Selector`` (which
selects by its ``scores``) is a convenience, not a condition. Built-ins register on first lookup; third-party
packages add selectors through the ``clipkd.selectors`` entry-point group (core/plugins.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from core.errors import ClipkdError
from core.plugins import Registry
from selection import BUILTIN, ENTRY_POINT_GROUP

CONTRACT = ("a selector is a class built as Selector(**options) whose select(batch, keep) returns the indices of keep "
            "examples of a selection.base.SuperBatch")

S = TypeVar("S", bound=type)


class SelectorError(ClipkdError, ValueError):
    """An unknown selector, or a plugin that does not meet the contract (named with its entry point and package)."""


def contract_problem(cls: object) -> str | None:
    if not isinstance(cls, type):
        return f"is a {type(cls).__name__}, not a class"
    if not callable(getattr(cls, "select", None)):
        return "has no select(batch, keep)"
    return None


_registry = Registry("selector", ENTRY_POINT_GROUP, tuple(f"selection.{name}" for name in BUILTIN), CONTRACT,
                     contract_problem, SelectorError, SelectorError)


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` available as ``get(name)``."""
    return _registry.register(name)


def available() -> dict[str, str]:
    """Registered selector names mapped to the first line of their docstrings, sorted by name."""
    return _registry.available()


def get(name: str) -> type:
    return _registry.get(name)


def build(name: str, options: dict):
    """The selector ``name`` with its options; bad options are one message naming them."""
    try:
        return get(name)(**options)
    except TypeError as error:
        raise SelectorError(f"train.selection: selector {name!r} takes no options {sorted(options)}: {error}") from None
