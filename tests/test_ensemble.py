"""Several teachers per run: each with its own cache, every method seeing the first, mobileclip_dr all of them;
the leaderboard names them all and feature similarity is reported against each."""
import json

import numpy as np
import pytest
import torch
from conftest import run_clipkd

import methods
from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.config.specs import ConfigError
from harness.models.build import create_clip
from harness.run import run
from harness.teachers import cache_key
from harness.training.loop import Trainer
from harness.training.objective import compute_losses
from results.store import Store

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """Two demo-sized teachers of different seeds, as weights files."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        path = folder / f"teacher-{seed}.pt"
        torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, path)
        paths.append(path)
    return paths


@methods.register("first_teacher_probe")
class FirstTeacherProbe(methods.DistillMethod):
    """A method written for one teacher: it reads teacher_image/teacher_text only (as a third-party plugin does)."""

    def forward(self, batch):
        return ((methods.normalize(batch.student_image[:, :1]) - batch.teacher_image[:, :1]) ** 2).mean()


def _config(tmp_path, teachers, embeddings="cached", **distill):
    return parse_config({
        "name": "ensemble", "seed": 4, "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny"},
        "teacher": [{"model": "clipkd-tiny-teacher", "pretrained": str(t), "embeddings": embeddings} for t in teachers],
        "distill": distill or {"mobileclip_dr": 1, "fd": 2000, "first_teacher_probe": 1},
        "data": {"dataset": "digits", "augment": False, "workers": 0}, "optim": {"warmup_steps": 1},
        "train": {"batch_size": 32, "steps": 3},
        "eval": {"workers": 0},
    })


def test_two_cached_teachers_train_evaluate_and_are_named(tmp_path, two_teachers):
    config = _config(tmp_path, two_teachers)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    assert run(config, store) == "done"
    caches = sorted((tmp_path / "runs" / cache_key.CACHE_DIR).glob("*/meta.json"))
    assert len(caches) == 2  # one cache per teacher
    row = store.get_run(config.run_id)
    assert row["teacher"] == "clipkd-tiny-teacher@teacher-7.pt + clipkd-tiny-teacher@teacher-8.pt"
    one = sum(p.numel() for p in create_clip("clipkd-tiny-teacher").model.parameters())
    assert row["teacher_params"] == 2 * one
    metrics = store.metrics(config.run_id)["digits"]
    for name in ("feature_cka_image", "feature_cka_text", "teacher_pair_similarity_gap"):
        assert name in metrics and f"{name}@teacher2" in metrics
    # cosine needs one space: P maps the student into the first teacher's, none into the second's (64 vs 96 dims)
    assert "feature_cosine_image" in metrics and "feature_cosine_image@teacher2" not in metrics
    assert metrics["feature_cka_image"] != metrics["feature_cka_image@teacher2"]
    log = [json.loads(line) for line in (config.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["first_teacher_probe"] > 0 and r["mobileclip_dr"] > 0 for r in log)
    leaderboard = run_clipkd("leaderboard", "--db", store.url, "--format", "csv", cwd=tmp_path).stdout
    assert "clipkd-tiny-teacher@teacher-7.pt + clipkd-tiny-teacher@teacher-8.pt" in leaderboard


def test_cached_ensemble_equals_live_ensemble_and_plugins_see_the_first(tmp_path, two_teachers):
    """Each teacher's rows of the side-by-side caches are its live embeddings (float32 rounding); a method
    written for one teacher gets the first; mobileclip_dr averages both, which one teacher alone would not."""
    probe = {"mobileclip_dr": 1, "first_teacher_probe": 1}

    def terms_of(config, like=None):
        trainer = Trainer(config, DistEnv(), CPU)
        if like is not None:
            trainer.student.model.load_state_dict(like.student.model.state_dict())
        batch = next(iter(trainer.data.epoch_batches(0, 0))).to(CPU)
        with torch.no_grad():
            return {k: float(v) for k, v in compute_losses(trainer.student.model, trainer.teacher, trainer.objective,
                                                            batch).items()}, trainer

    live, live_trainer = terms_of(_config(tmp_path, two_teachers, "live", **probe))
    cached, _ = terms_of(_config(tmp_path, two_teachers, "cached", **probe), like=live_trainer)
    first_only, _ = terms_of(_config(tmp_path, two_teachers[:1], "live", **probe), like=live_trainer)
    for name in live:
        assert cached[name] == pytest.approx(live[name], rel=1e-5), name
    assert first_only["first_teacher_probe"] == pytest.approx(live["first_teacher_probe"], rel=1e-6)
    assert abs(first_only["mobileclip_dr"] - live["mobileclip_dr"]) > 1e-4


def test_mobileclip_dr_is_the_cross_entropy_to_the_teachers_average():
    g = torch.Generator().manual_seed(5)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    student_image, student_text = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g,
                                                                                                  dtype=torch.float64)
    members = [methods.TeacherEmbeddings(unit(6, 5), unit(6, 5), torch.tensor(20.0, dtype=torch.float64)),
               methods.TeacherEmbeddings(unit(6, 3), unit(6, 3), torch.tensor(50.0, dtype=torch.float64))]
    batch = methods.DistillBatch(student_image, student_text, members[0].image, members[0].text,
                                 torch.tensor(10.0, dtype=torch.float64), members[0].logit_scale, teachers=tuple(members))
    loss = methods.get("mobileclip_dr")(4, 5)
    v, u = (x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True) for x in (student_image, student_text))

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    zs = 10.0 * v @ u.T
    teacher = [float(m.logit_scale) * m.image.numpy() @ m.text.numpy().T for m in members]
    expected = 0
    for s, ts in ((zs, teacher), (zs.T, [t.T for t in teacher])):
        average = sum(softmax(t) for t in ts) / 2
        expected += -(average * np.log(softmax(s))).sum(axis=1).mean() / 2
    assert float(loss(batch)) == pytest.approx(expected, rel=1e-12)
    fixed = methods.get("mobileclip_dr")(4, 5, scale=100.0)  # MobileCLIP's distillation logit scale
    assert float(fixed(batch)) != pytest.approx(expected, rel=1e-3)


def test_ensemble_configs_name_what_is_wrong(tmp_path, two_teachers):
    single = _config(tmp_path, two_teachers[:1])
    assert not isinstance(single.teacher, list)  # a list of one is that teacher: the same run id
    with pytest.raises(ConfigError, match="same views of each sample"):
        parse_config({**_config(tmp_path, two_teachers).resolved(),
                      "teacher": [{"model": "clipkd-tiny-teacher", "pretrained": str(two_teachers[0]), "views": 2},
                                  {"model": "clipkd-tiny-teacher", "pretrained": str(two_teachers[1])}]})
