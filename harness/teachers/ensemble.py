"""A run's teachers in config order: one or an ensemble, each live (run on every batch) or cached (read with the
batch by the loader)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.distributed import DistEnv
from harness.config.run_config import RunConfig, teacher_input
from harness.data.inputs import ModelInput, OtherInputs
from harness.teachers.cache_build import ensure
from harness.teachers.cached import CachedRows, CachedTeacher, EnsembleRows
from harness.teachers.live import LiveTeacher, create_teacher


class Teachers:
    """A run's teachers in config order, live or cached each: one, or an ensemble."""

    def __init__(self, members: list[LiveTeacher | CachedTeacher]):
        self.members = members

    @property
    def samples_embedded(self) -> int:
        return sum(getattr(member, "samples_embedded", 0) for member in self.members)


@dataclass
class RunTeachers:
    """What a run distils from: its teachers (None without one), the first one's embedding dim (the one methods
    distil into), the caches the loader reads, side by side for an ensemble (None when none is cached), and the
    inputs its live teachers see beside the student's (data/inputs.py)."""

    teachers: Teachers | None
    embed_dim: int | None
    caches: list[CachedRows]
    cached_rows: CachedRows | EnsembleRows | None
    others: OtherInputs


def run_teachers(config: RunConfig, student: ModelInput, device: torch.device, dtype: torch.dtype,
                 env: DistEnv) -> RunTeachers:
    """Each of ``config``'s teachers, built or read from its cache (built first when missing); each cached teacher
    reads its own cache's columns of the rows the loader reads for all of them. A live teacher that preprocesses
    unlike the ``student`` is fed its own input; images are decoded for the largest view of any of them."""
    caches, members, dims, columns, inputs, sizes = [], [], [], 0, [], []
    for spec in config.teachers:
        own = ModelInput.of(*teacher_input(spec))
        sizes.append(own.view.size)
        if spec.embeddings == "cached":
            rows = CachedRows(ensure(config.with_teacher(spec), device, env))
            members.append(CachedTeacher(rows, device, dtype, slice(columns, columns + rows.embed_dim)))
            columns, dims = columns + rows.embed_dim, dims + [rows.embed_dim]
            caches.append(rows)
        else:
            bundle = create_teacher(spec, device, config.train.precision)
            inputs.append((own, bundle.tokenizer))
            members.append(LiveTeacher(bundle.model, None if own.view == student.view else own.view,
                                       None if own.text == student.text else own.text))
            dims.append(bundle.embed_dim)
    cached_rows = (caches[0] if len(caches) == 1 else EnsembleRows(caches)) if caches else None
    return RunTeachers(Teachers(members) if members else None, dims[0] if dims else None, caches, cached_rows,
                       OtherInputs.beside(student, inputs, sizes))
