"""A generated store of many runs, shaped like a lab's grid results, to test and benchmark readers at scale.

The numbers are made up (seeded) but structured like real ones: a method's gain over its setting's baseline
grows with its teacher-student feature similarity, seeds scatter around the mean, some runs fail or are still
queued or running. Written in bulk, in one transaction.
"""
from __future__ import annotations

import json
import random
from itertools import product

from results.store import CurvePoint, GridCell, Metric, Run, Store, index_values, now

TEACHERS = ["ViT-B-16@run:cc3m-cc12m", "ViT-L-14@laion400m_e32", "ViT-B-16@laion400m_e32", "ViT-B-32@run:yfcc"]
STUDENTS = ["ViT-T-16", "timm-mobilevit_s", "timm-swin_tiny_patch4_window7_224", "timm-mobilenetv3_small_100",
            "timm-efficientnet_b0", "timm-resnet18", "ViT-S-16", "ViT-B-16", "RN50", "clipkd-tiny"]
DATASETS = ["/datasets/cc3m_cc12m/{00000..01379}.tar", "/datasets/cc3m/{0000..0331}.tar", "fashion-mnist", "digits",
            "/datasets/yfcc15m/{0000..1500}.tar"]
METHODS = {"crd": 0.014, "fd": 0.037, "mfd": 0.035, "gd": 0.010, "icl": 0.026, "afd": 0.009, "fd+icl": 0.040,
           "crd+fd+icl": 0.044, "tinyclip": 0.02}  # ImageNet top-1 gain over the baseline, roughly the paper's
SEEDS = 5
UNFINISHED = 750  # queued, running and failed runs on top of the finished grid


def fill(store: Store, runs: int = SEEDS * len(STUDENTS) * len(DATASETS) * (1 + len(TEACHERS) * len(METHODS))
         + UNFINISHED, seed: int = 0) -> int:
    """Write ``runs`` runs (10,000 by default) with metrics and short curves; returns how many were written."""
    rng = random.Random(seed)
    rows, metrics, curves, cells = [], [], [], []
    written = now()  # one bulk write: every run the same time
    settings = list(product(DATASETS, STUDENTS))
    cases = [(d, s, None, "baseline") for d, s in settings] + [
        (d, s, t, m) for (d, s), t, m in product(settings, TEACHERS, METHODS)]
    for index in range(runs):
        dataset, student, teacher, method = cases[index % len(cases)]
        run_seed = index // len(cases)
        run_id = f"{index:012x}"
        grid = f"synthetic-{DATASETS.index(dataset)}"
        status = "done" if index < runs - UNFINISHED else rng.choice(["queued", "running", "failed"])
        rows.append({
            "id": run_id, "setting_id": f"setting-{settings.index((dataset, student))}",
            "name": f"{grid}/{student}/{method}/{(teacher or '-').split('@')[0]}/seed{run_seed}", "teacher": teacher,
            "student": student, "method": method, "terms": json.dumps({t: 1.0 for t in method.split("+")}),
            "dataset": dataset, "seed": run_seed, "status": status,
            "error": "training: NonFiniteLossError: loss term gd is inf at step 1200" if status == "failed" else None,
            "config": json.dumps({"student": {"model": student}, "seed": run_seed}), "run_dir": f"/runs/{run_id}",
            "grid": grid, "host": "node-01", "code_version": "synthetic", "student_params": 5_600_000,
            "teacher_params": 150_000_000 if teacher else None, "train_seconds": rng.uniform(3e4, 9e4),
            "eval_seconds": rng.uniform(300, 900), "started_at": written, "finished_at": written, "updated_at": written})
        cells.append({"grid": grid, "run_id": run_id, "cell": rows[-1]["name"]})
        if status != "done":
            continue
        similarity = rng.uniform(0.3, 0.9) if teacher else None
        gain = METHODS.get(method, 0.0) * (similarity or 0) / 0.6
        base = 0.25 + 0.02 * STUDENTS.index(student) + 0.01 * DATASETS.index(dataset)
        values = {"imagenet1k": {"acc1": base + gain + rng.gauss(0, 0.004), "acc5": base + 0.25 + gain},
                  "mscoco_captions": {"text_retrieval_recall@1": base + gain, "image_retrieval_recall@1": base - 0.05}}
        if teacher:
            for benchmark in values:
                values[benchmark] |= {"feature_cosine_image": similarity, "feature_cosine_text": similarity * 0.9,
                                      "feature_cka_image": similarity * 0.8, "feature_cka_text": similarity * 0.7}
        metrics += [{"run_id": run_id, "benchmark": b, "metric": m, "value": v}
                    for b, named in values.items() for m, v in named.items()]
        curves += [{"run_id": run_id, "term": term, "step": step, "value": 5.0 / step ** 0.3}
                   for term in ["loss", "task", *method.split("+")] if term != "baseline" for step in (1, 100, 1000)]
    with store.transaction() as connection:
        for table, batch in ((Run, rows), (Metric, metrics), (CurvePoint, curves), (GridCell, cells)):
            connection.execute(table.__table__.insert(), batch)
        index_values(connection)
    return runs
