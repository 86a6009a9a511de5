"""A registry of plugins of one kind (methods, batch selectors): ``@register(name)``, ``get(name)``,
``available()``; built-ins registered on first lookup, third-party packages through an entry-point group.

An entry point may name a module (whose import calls ``register``) or a class (registered under the entry point's
name). A plugin that does not meet the kind's contract, or fails to import, is one error naming the entry point,
its package and the fault; a built-in's name cannot be taken by a plugin (the built-ins load first).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

T = TypeVar("T", bound=type)


class Registry:
    """The plugins of one kind. ``problem(cls)`` says what keeps a class from meeting ``contract`` (None: it
    does); ``builtins`` are the modules that register the built-ins; ``plugin_error`` and ``unknown_error`` are the
    exception types raised for a bad plugin and an unknown name; ``noun`` names the kind in messages (``called``
    where an unknown name is said: "unknown distillation method")."""

    def __init__(self, noun: str, group: str, builtins: tuple[str, ...], contract: str,
                 problem: Callable[[object], str | None], plugin_error: type[Exception],
                 unknown_error: type[Exception], called: str | None = None):
        self.noun, self.group, self.builtins, self.contract, self.problem = noun, group, builtins, contract, problem
        self.called = called or noun
        self.plugin_error, self.unknown_error = plugin_error, unknown_error
        self.classes: dict[str, type] = {}
        self._builtins_loaded = self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` available as ``get(name)``."""

        def decorator(cls: T) -> T:
            self._load_builtins()  # a built-in's name is taken, whichever registers first
            problem = self.problem(cls)
            if problem:
                raise TypeError(f"@register({name!r}): {cls!r} {problem}; {self.contract}")
            existing = self.classes.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.noun} {name!r} is already registered by {existing.__module__}."
                                 f"{existing.__qualname__}")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorator

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self.builtins:
                importlib.import_module(module)

    def where(self, entry_point: importlib.metadata.EntryPoint) -> str:
        package = entry_point.dist
        source = f"package {package.name} {package.version}" if package is not None else "an unknown package"
        return f"entry point {entry_point.name!r} = {entry_point.value!r} of {source} (group {self.group})"

    def load(self) -> None:
        """The built-ins, then every plugin of the entry-point group (once a process)."""
        self._load_builtins()  # first: a plugin's name that a built-in holds is refused
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in importlib.metadata.entry_points(group=self.group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # a broken third-party plugin is named, not a traceback
                raise self.plugin_error(f"{self.where(entry_point)} failed to import: {type(error).__name__}: "
                                        f"{error}") from None
            if isinstance(loaded, ModuleType):  # its import registered its plugins
                continue
            problem = self.problem(loaded)
            if problem:
                raise self.plugin_error(f"{self.where(entry_point)} names {loaded!r}, which {problem}; {self.contract}")
            if entry_point.name not in self.classes:
                self.register(entry_point.name)(loaded)

    def available(self) -> dict[str, str]:
        """Registered names mapped to their one-line descriptions, sorted by name."""
        self.load()
        return {name: describe(self.classes[name]) for name in sorted(self.classes)}

    def get(self, name: str) -> type:
        self.load()
        try:
            return self.classes[name]
        except KeyError:
            raise self.unknown_error(f"unknown {self.called} {name!r}; registered {self.noun}s: "
                                     f"{', '.join(sorted(self.classes))}") from None


def describe(cls: type) -> str:
    """A plugin's one-line description: the first line of its docstring, else its class name."""
    return (inspect.getdoc(cls) or cls.__name__).strip().splitlines()[0]
