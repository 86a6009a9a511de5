"""A run's row in the store, from its config alone: what a grid writes when it queues a cell, and what the run
completes when it is trained and evaluated. No torch: a grid's submission writes these rows between its jobs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.config.run_config import RunConfig, teacher_run_dir
from harness.models.names import has_logit_bias, open_clip_name
from results.store import terms_json


def teacher_label(config: RunConfig) -> str | None:
    """How the leaderboard names a run's teacher: ``MODEL@WEIGHTS``; an ensemble's members joined by `` + ``."""
    return " + ".join(_one_teacher_label(spec) for spec in config.teachers) or None


def _one_teacher_label(spec) -> str:
    if spec.run:  # named by the teacher run's model once it has started (a grid submits it untrained)
        config_file = teacher_run_dir(spec.run) / "config.json"
        model = json.loads(config_file.read_text())["student"]["model"] if config_file.is_file() else "run"
        return f"{model}@run:{Path(spec.run).stem}"
    return f"{open_clip_name(spec.model)}@{Path(spec.pretrained).name}"


def student_label(config: RunConfig) -> str:
    """How the leaderboard names a run's student: its model; its task loss where that is not CLIP's InfoNCE or
    the model has a logit bias (a SigLIP model trained either way); how it inherited its weights (TinyCLIP)."""
    name = open_clip_name(config.student.model)
    notes = [f"{config.task_loss} loss"] if config.task_loss != "clip" or has_logit_bias(config.student.model) else []
    inherit = config.student.inherit
    if inherit is not None:
        notes.append(f"pruned to {inherit.prune.sparsity:g}" if inherit.prune else
                     "inherited" + _widths(inherit))
    return f"{name} ({', '.join(notes)})" if notes else name


def _widths(inherit) -> str:
    """How an inherited student's widths were chosen, where not TinyCLIP's leading ones."""
    chosen = {tower: inherit.width_of(tower) for tower in ("image", "text")}
    if set(chosen.values()) == {"leading"}:
        return ""
    if set(chosen.values()) == {"magnitude"}:
        return " by magnitude"
    return "".join(f", {tower} by {rule}" for tower, rule in chosen.items())


def run_record(config: RunConfig, **fields: Any) -> dict[str, Any]:
    return {
        "id": config.run_id,
        "setting_id": config.setting_id,
        "name": config.name,
        "teacher": teacher_label(config),
        "student": student_label(config),
        "method": config.method_label,
        "terms": terms_json({name: weight for name, (weight, _) in config.method_terms().items()}),
        "dataset": config.data.dataset if config.data.dataset in ("digits", "fashion-mnist") else config.data.path,
        "seed": config.seed,
        "config": json.dumps(config.resolved(), sort_keys=True),
        "run_dir": str(config.run_dir.resolve()),
        **fields,
    }
