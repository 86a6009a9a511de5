"""Distillation methods as plugins: one file per loss, found through a registry.

    import methods
    loss_fn = methods.get("fd")(student_dim=256, teacher_dim=512)
    loss = loss_fn(methods.DistillBatch(...))

``import methods`` imports no torch: the built-in methods, the registry and the batch types are imported on first
use (PEP 562), so that a config's validation (``clipkd grid status``) reads the method names without them.
"""
import ast
import functools
import importlib
import importlib.metadata
import sys
from pathlib import Path

# Each built-in registers itself under its name when its module is imported (``@register``).
BUILTIN = ("afd", "clip_rd", "crd", "fd", "gd", "hrd", "icl", "mfd", "mobileclip_dr", "open_clip_distill", "siglip_kd",
           "tinyclip", "vrd", "xrd")
# What the built-ins ask of their teachers, read without importing them (tests/test_methods.py checks that each
# class's ``teacher_problem`` agrees): these distil sigmoid teachers only; every other built-in distils any teacher.
SIGMOID_TEACHERS_ONLY = ("siglip_kd",)
ENTRY_POINT_GROUP = "clipkd.methods"
_HOME = {
    **dict.fromkeys(("DistillBatch", "DistillMethod", "LogitScale", "TeacherEmbeddings", "normalize", "projection"),
                    "methods.base"),
    **dict.fromkeys(("MethodPluginError", "UnknownMethodError", "available", "describe", "get", "image_mask_ratio",
                     "register", "student_projection"), "methods.registry"),
}

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "SIGMOID_TEACHERS_ONLY", "descriptions", "names", "sigmoid_teachers_only",
           "teacher_problem", *_HOME]


@functools.cache
def _plugins_installed() -> bool:
    """Whether a package adds methods (entry points are read once a process, as the registry loads them): a
    grid's expansion validates every cell's methods, and reading the installed packages' metadata takes ms."""
    return bool(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def names() -> list[str]:
    """The names ``available()`` lists, read without importing a method where no plugin package is installed:
    the built-ins and those registered in this process; with plugin packages, their imports decide."""
    if _plugins_installed():
        return list(importlib.import_module("methods.registry").available())
    registry = sys.modules.get("methods.registry")
    return sorted({*BUILTIN, *(registry.registered() if registry else ())})


def descriptions() -> dict[str, str]:
    """``available()``, read from the built-ins' files where no plugin package is installed and nothing else is
    registered (``clipkd methods`` in a fraction of torch's import; tests/test_methods.py checks the two agree):
    each method's class decorated ``@register(name)``, its docstring's first line, else its class name."""
    registry = sys.modules.get("methods.registry")
    if _plugins_installed() or (registry and set(registry.registered()) - {*BUILTIN}):
        return importlib.import_module("methods.registry").available()
    found = {}
    for name in BUILTIN:
        for node in ast.parse((Path(__file__).parent / f"{name}.py").read_text()).body:
            registered = [d for d in getattr(node, "decorator_list", []) if isinstance(d, ast.Call)
                          and getattr(d.func, "id", None) == "register" and d.args[0].value == name]
            if registered:
                found[name] = (ast.get_docstring(node) or node.name).strip().splitlines()[0]
    return dict(sorted(found.items()))


def teacher_problem(name: str, sigmoid: dict[str, bool]) -> str | None:
    """Why method ``name`` cannot distil from teachers labelled as in ``sigmoid`` (label -> whether it is a sigmoid
    teacher), or None: a built-in's answer without importing it, a plugin's from its class."""
    if name not in BUILTIN:
        method = importlib.import_module("methods.registry").get(name)
        return getattr(method, "teacher_problem", lambda _: None)(sigmoid)
    return sigmoid_teachers_only(name, sigmoid) if name in SIGMOID_TEACHERS_ONLY else None


def sigmoid_teachers_only(name: str, sigmoid: dict[str, bool]) -> str | None:
    """The refusal of a method that distils sigmoid teachers' pairwise probabilities, where a teacher has none."""
    softmax = [label for label, is_sigmoid in sigmoid.items() if not is_sigmoid]
    if not softmax:
        return None
    return (f"{name} distils a sigmoid teacher's pairwise probabilities σ(s·v uᵀ + b), and teacher "
            f"{', '.join(softmax)} has no logit bias (a CLIP teacher: its softmax is distilled by crd, "
            "open_clip_distill or mobileclip_dr)")


def __getattr__(name: str):
    if name in _HOME:
        value = globals()[name] = getattr(importlib.import_module(_HOME[name]), name)  # looked up once
        return value
    raise AttributeError(f"module 'methods' has no attribute {name!r}")
