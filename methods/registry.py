"""The method registry: ``@register(name)``, ``get(name)``, ``available()``.

The contract of a method: a ``torch.nn.Module`` class built as ``Method(student_dim, teacher_dim, **options)``
and called with a ``methods.DistillBatch``, returning its unweighted scalar loss. ``image_mask_ratio`` (ask for the
student's embedding of a masked image) and ``student_projection()`` (the learned map P into the teacher's space)
are optional, with ``DistillMethod``'s defaults; subclassing ``DistillMethod`` is a convenience, not a condition.

Built-in methods register on first lookup (their modules' imports); third-party packages add methods through the
``clipkd.methods`` entry-point group, loaded on first lookup. An entry point may name a module (whose import calls
``@register``) or a method class (registered under the entry point's name); anything else is an error that names
the entry point, its package and what is wrong with it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from core.plugins import Registry, describe  # noqa: F401 (methods.describe)
from methods import BUILTIN, ENTRY_POINT_GROUP
from methods.base import DistillMethod

CONTRACT = ("a method is a torch.nn.Module class built as Method(student_dim, teacher_dim, **options) and called "
            "with a methods.DistillBatch")

M = TypeVar("M", bound=type[nn.Module])


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return self.args[0]


class MethodPluginError(ValueError):
    """A plugin that does not meet the contract; the message names the entry point, its package and the fault."""


def contract_problem(cls: object) -> str | None:
    """What keeps ``cls`` from being a method, or None."""
    if not isinstance(cls, type):
        return f"is a {type(cls).__name__}, not a class"
    if not issubclass(cls, nn.Module):
        return "is not a torch.nn.Module subclass"
    if cls.forward is nn.Module.forward:
        return "defines no forward(batch)"
    # built once with small dims (a signature can accept (*args) and the build still refuse them), on a forked
    # random stream: a method registered while a run sets up (on first lookup) leaves its initialisation alone
    try:
        with torch.random.fork_rng(devices=[]):
            cls(8, 16)
    except Exception as error:
        return f"cannot be built as {cls.__name__}(student_dim, teacher_dim): {type(error).__name__}: {error}"
    return None


_registry = Registry("method", ENTRY_POINT_GROUP, tuple(f"methods.{name}" for name in BUILTIN), CONTRACT,
                     contract_problem, MethodPluginError, UnknownMethodError, called="distillation method")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``methods.get(name)``."""
    return _registry.register(name)


def registered() -> list[str]:
    """The names registered in this process so far (no import)."""
    return sorted(_registry.classes)


def available() -> dict[str, str]:
    """Registered method names mapped to their one-line descriptions, sorted by name."""
    return _registry.available()


def get(name: str) -> type[nn.Module]:
    return _registry.get(name)


def image_mask_ratio(method: nn.Module) -> float | None:
    """The fraction of image patches a method wants masked in the student's extra forward (MFD), if any."""
    return getattr(method, "image_mask_ratio", None)


def student_projection(method: nn.Module) -> nn.Module | None:
    """The method's learned map of student embeddings into the teacher's space: its own ``student_projection()``
    if it has one, else DistillMethod's convention (a ``project`` nn.Linear)."""
    own = getattr(method, "student_projection", None)
    return own() if callable(own) else DistillMethod.student_projection(method)
