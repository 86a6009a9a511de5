"""Distillation methods as plugins: one file per loss, found through a registry.

    import methods
    loss_fn = methods.get("fd")(student_dim=256, teacher_dim=512)
    loss = loss_fn(methods.DistillBatch(...))
"""
from methods.base import DistillBatch, DistillMethod, LogitScale, TeacherEmbeddings, normalize, projection
from methods.registry import (
    ENTRY_POINT_GROUP,
    MethodPluginError,
    UnknownMethodError,
    available,
    describe,
    get,
    image_mask_ratio,
    register,
    student_projection,
)

# Built-ins register themselves on import.
from methods import afd, crd, fd, gd, icl, mfd, open_clip_distill, tinyclip  # noqa: E402,F401  isort: skip
from methods import hrd, vrd, xrd, clip_rd, mobileclip_dr  # noqa: E402,F401  isort: skip

__all__ = [
    "DistillBatch",
    "DistillMethod",
    "ENTRY_POINT_GROUP",
    "LogitScale",
    "TeacherEmbeddings",
    "MethodPluginError",
    "UnknownMethodError",
    "available",
    "describe",
    "get",
    "image_mask_ratio",
    "normalize",
    "projection",
    "register",
    "student_projection",
]
