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

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from torch import nn

from methods import BUILTIN, ENTRY_POINT_GROUP
from methods.base import DistillMethod

CONTRACT = ("a method is a torch.nn.Module class built as Method(student_dim, teacher_dim, **options) and called "
            "with a methods.DistillBatch")

_REGISTRY: dict[str, type[nn.Module]] = {}
_entry_points_loaded = False
_builtins_loaded = False

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


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``methods.get(name)``."""

    def decorator(cls: M) -> M:
        _load_builtins()  # a built-in's name is taken, whichever registers first
        problem = contract_problem(cls)
        if problem:
            raise TypeError(f"@register({name!r}): {cls!r} {problem}; {CONTRACT}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _where(entry_point: importlib.metadata.EntryPoint) -> str:
    package = entry_point.dist
    source = f"package {package.name} {package.version}" if package is not None else "an unknown package"
    return f"entry point {entry_point.name!r} = {entry_point.value!r} of {source} (group {ENTRY_POINT_GROUP})"


def registered() -> list[str]:
    """The names registered in this process so far (no import)."""
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in BUILTIN:
            importlib.import_module(f"methods.{name}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    _load_builtins()  # first: a plugin's name that a built-in holds is refused, as when the built-ins loaded eagerly
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken third-party plugin is named, not a traceback
            raise MethodPluginError(f"{_where(entry_point)} failed to import: {type(error).__name__}: {error}") from None
        if isinstance(loaded, ModuleType):  # its import registered its methods
            continue
        problem = contract_problem(loaded)
        if problem:
            raise MethodPluginError(f"{_where(entry_point)} names {loaded!r}, which {problem}; {CONTRACT}")
        if entry_point.name not in _REGISTRY:
            register(entry_point.name)(loaded)


def describe(cls: type) -> str:
    """A method's one-line description: the first line of its docstring, else its class name."""
    return (inspect.getdoc(cls) or cls.__name__).strip().splitlines()[0]


def available() -> dict[str, str]:
    """Registered method names mapped to their one-line descriptions, sorted by name."""
    _load_entry_points()
    return {name: describe(_REGISTRY[name]) for name in sorted(_REGISTRY)}


def get(name: str) -> type[nn.Module]:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown distillation method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def image_mask_ratio(method: nn.Module) -> float | None:
    """The fraction of image patches a method wants masked in the student's extra forward (MFD), if any."""
    return getattr(method, "image_mask_ratio", None)


def student_projection(method: nn.Module) -> nn.Module | None:
    """The method's learned map of student embeddings into the teacher's space: its own ``student_projection()``
    if it has one, else DistillMethod's convention (a ``project`` nn.Linear)."""
    own = getattr(method, "student_projection", None)
    return own() if callable(own) else DistillMethod.student_projection(method)
