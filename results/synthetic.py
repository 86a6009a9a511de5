"""A generated store of many runs, shaped like a lab's grid results, to test and benchmark readers at scale.

The numbers are made up (seeded) but structured like real ones: a method's gain over its setting's baseline
grows with its teacher-student feature similarity, seeds scatter around the mean, some runs fail or are still
queued or running. Written in bulk, in one transaction.
"""
from __future__ import annotations

import json
import random
from itertools import product

import numpy as np

from results.store import CurvePoint, GridCell, ItemResult, Metric, Run, Store, index_values, now

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


# A lab's store: what its own grids write (benchmarks/store.py's second shape). Every finished run has per-item
# results, most cells have one seed (so their intervals and Δs are the paired bootstrap over items), and there are
# several benchmarks, each with its test set's real size.
LAB_ITEMS = {"imagenet1k": {"acc1": 50_000, "acc5": 50_000}, "imagenetv2": {"acc1": 10_000},
             "mscoco_captions": {"text_retrieval_recall@1": 5_000, "image_retrieval_recall@1": 25_000}}
LAB_VARIANTS = 5  # learning rates per cell: each is a setting of its own, trained on one seed


def fill_lab(store: Store, runs: int = 10_000, seed: int = 0) -> int:
    """Write ``runs`` runs (10,000 by default) shaped like a lab's grids: single-seed cells of LAB_VARIANTS
    settings each, a second seed for the first variant's, per-item bits for every metric of LAB_ITEMS (a run's
    metric is the mean of its bits; runs of one setting get the same items right mostly, as models do), the
    unfinished ones on top. Written in bulk, a transaction per thousand runs."""
    from results.bits import pack

    rng = random.Random(seed)
    settings = [(d, s, v) for d, s in product(DATASETS, STUDENTS) for v in range(LAB_VARIANTS)]
    cells = [(setting, t, m) for setting in settings for t, m in [(None, "baseline"), *product(TEACHERS, METHODS)]]
    cases = [(cell, 0) for cell in cells] + [(cell, 1) for cell in cells if cell[0][2] == 0]
    cases.sort(key=lambda case: settings.index(case[0][0]))  # a setting's runs together: its items drawn once
    finished = runs - UNFINISHED
    written, difficulty, batch = now(), {}, {"runs": [], "metrics": [], "items": []}
    for index in range(runs):
        ((dataset, student, variant), teacher, method), run_seed = cases[index % len(cases)]
        setting = f"lab-{DATASETS.index(dataset)}-{STUDENTS.index(student)}-{variant}"
        status = "done" if index < finished else rng.choice(["queued", "running", "failed"])
        run_id = f"lab{index:09x}"
        batch["runs"].append({
            "id": run_id, "setting_id": setting, "name": f"{setting}/{method}/{(teacher or '-').split('@')[0]}",
            "teacher": teacher, "student": student, "method": method,
            "terms": json.dumps({t: 1.0 for t in method.split("+")}), "dataset": dataset, "seed": run_seed,
            "status": status, "error": "training: failed" if status == "failed" else None,
            "config": json.dumps({"student": {"model": student}, "optim": {"lr": 1e-3 * 2 ** -variant}}),
            "run_dir": f"/runs/{run_id}", "grid": f"lab-{DATASETS.index(dataset)}", "host": "node-01",
            "code_version": "synthetic", "student_params": 5_600_000, "started_at": written, "finished_at": written,
            "updated_at": written})
        if status == "done":
            if setting not in difficulty:  # how hard each test item is for this setting's models
                draw = np.random.default_rng([seed, len(difficulty)])
                difficulty = {setting: {(b, m): draw.random(n) for b, named in LAB_ITEMS.items()
                                        for m, n in named.items()}}
            similarity = rng.uniform(0.3, 0.9) if teacher else None
            level = 0.3 + 0.02 * STUDENTS.index(student) + METHODS.get(method, 0.0) * (similarity or 0) / 0.6
            noise = np.random.default_rng([seed, 1, index])
            for (benchmark, metric), hard in difficulty[setting].items():
                bits = hard + noise.normal(0, 0.05, len(hard)) < level + (0.25 if metric == "acc5" else 0.0)
                batch["metrics"].append({"run_id": run_id, "benchmark": benchmark, "metric": metric,
                                         "value": float(bits.mean())})
                batch["items"].append({"run_id": run_id, "benchmark": benchmark, "metric": metric,
                                       "count": len(bits), "bits": pack(bits)})
            if teacher:
                batch["metrics"] += [{"run_id": run_id, "benchmark": "imagenet1k", "metric": m, "value": v}
                                     for m, v in (("feature_cka_image", similarity), ("feature_cosine_image", similarity))]
        if len(batch["runs"]) == 1000 or index == runs - 1:
            with store.transaction() as connection:
                for table, rows in ((Run, batch["runs"]), (Metric, batch["metrics"]), (ItemResult, batch["items"])):
                    if rows:
                        connection.execute(table.__table__.insert(), rows)
                index_values(connection, [row["id"] for row in batch["runs"]])
            batch = {"runs": [], "metrics": [], "items": []}
    return runs
