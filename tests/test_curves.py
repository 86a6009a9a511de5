"""The CLIP-KD paper's §4.4 curves during training: the student's positive − negative pair similarity and its
feature similarity to the teacher, measured at eval.every_steps, stored as curves, equal to the same measures
taken afresh from the weights of that step."""
import json

import pytest
import torch
import torch.nn.functional as F

from harness.config.run_config import parse_config
from harness.run import load_trained_run, run
from results.queries import training_curves
from results.store import Store

ITEMS = 100


def _pairs(bundle, count: int):
    """A model's embeddings of the first ``count`` digits test images and their first captions, computed here
    without the harness's evaluation code."""
    from evals.datasets import load_eval_set

    pairs = load_eval_set("digits", None, bundle.preprocess_eval).retrieval
    images = torch.stack([pairs[i][0] for i in range(count)])
    captions = [pairs[i][1][0] for i in range(count)]
    with torch.no_grad():
        bundle.model.eval()
        return bundle.model.encode_image(images).double(), bundle.model.encode_text(bundle.tokenizer(captions)).double()


def _gap(images, texts) -> float:
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    n = len(similarity)
    return float(similarity.diagonal().mean() - (similarity.sum() - similarity.trace()) / (n * n - n))


def _cka(x, y) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_pair_gap_and_feature_similarity_are_recorded_during_training_and_stored(tmp_path, teacher_checkpoint):
    config = parse_config({
        "name": "curves", "seed": 1, "output_dir": str(tmp_path / "runs"),
        "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
        "distill": {"fd": 2000, "icl": 1, "crd": 1}, "data": {"dataset": "digits", "workers": 0},
        "optim": {"warmup_steps": 2}, "train": {"batch_size": 32, "steps": 4, "log_every": 1},
        "eval": {"every_steps": 2, "during_items": ITEMS, "workers": 0, "batch_size": 64}})
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    assert run(config, store) == "done"
    during = [json.loads(line) for line in (config.run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [point["step"] for point in during] == [0, 2, 4]

    trained = load_trained_run(config.run_dir, torch.device("cpu"))  # the weights of step 4, measured afresh
    student, teacher = _pairs(trained.student, ITEMS), _pairs(trained.teachers[0], ITEMS)
    projection = trained.objective.student_projection().double()  # FD's learned P: the student's dims are not the teacher's
    with torch.no_grad():
        expected = {
            "pair_similarity_gap": _gap(*student), "teacher_pair_similarity_gap": _gap(*teacher),
            "feature_cka_image": _cka(student[0], teacher[0]), "feature_cka_text": _cka(student[1], teacher[1]),
            "feature_cosine_image": float(F.cosine_similarity(projection(student[0]), teacher[0]).mean()),
            "feature_cosine_text": float(F.cosine_similarity(projection(student[1]), teacher[1]).mean())}
    last = during[-1]
    # float32 embeddings against float64 here: a cosine's rounding is ~1e-7 per term
    assert {metric: last[metric] for metric in expected} == pytest.approx(expected, abs=1e-5)
    assert len({point["teacher_pair_similarity_gap"] for point in during}) == 1  # the frozen teacher's, once
    assert len({point["pair_similarity_gap"] for point in during}) == 3  # the student's moves as it trains

    curves = training_curves(store, [config.run_id])
    for metric in expected:
        stored = curves[curves["term"] == f"{metric} (digits)"]
        assert list(stored["step"]) == [0, 2, 4], metric
        assert list(stored["value"]) == pytest.approx([point[metric] for point in during], abs=1e-12), metric
