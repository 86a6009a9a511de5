"""Sigmoid (SigLIP) students and teachers: the task loss is open_clip's SigLipLoss, siglip_kd against a hand
computation and gradcheck, GD's sigmoid gradients, and methods that refuse a teacher they cannot distil."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

import methods
from harness.config.run_config import parse_config
from harness.config.specs import ConfigError
from harness.training.objective import Objective
from methods.gd import sigmoid_loss_gradients

B, DS, DT = 5, 6, 9


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def sigmoid_batch(seed=0, teachers=2, student_bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    ensemble = tuple(methods.TeacherEmbeddings(F.normalize(r(B, DT), dim=-1), F.normalize(r(B, DT), dim=-1),
                                               torch.tensor(8.0 + k, dtype=torch.float64),
                                               torch.tensor(-3.0 - k, dtype=torch.float64)) for k in range(teachers))
    first = ensemble[0]
    return methods.DistillBatch(r(B, DS).requires_grad_(), r(B, DS).requires_grad_(), first.image, first.text,
                                torch.tensor(7.0, dtype=torch.float64), first.logit_scale, None, ensemble,
                                torch.tensor(-2.0, dtype=torch.float64) if student_bias else None, first.logit_bias)


def siglip_kd_by_hand(batch, own_bias):
    """(1/B) Σ_ij KL(Bern(p̄_ij) ‖ Bern(q_ij)), written pair by pair."""
    n = lambda t: t.detach().double().numpy()  # noqa: E731
    bias = own_bias if batch.student_logit_bias is None else float(batch.student_logit_bias)
    student = float(batch.student_logit_scale) * _unit(n(batch.student_image)) @ _unit(n(batch.student_text)).T + bias
    teachers = [_sigmoid(float(t.logit_scale) * n(t.image) @ n(t.text).T + float(t.logit_bias)) for t in batch.ensemble]
    total = 0.0
    for i in range(B):
        for j in range(B):
            p = sum(t[i, j] for t in teachers) / len(teachers)
            q = _sigmoid(student[i, j])
            total += p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return total / B


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("student_bias", [True, False])
def test_siglip_kd_equals_hand_computation_and_gradcheck(teachers, student_bias):
    method = methods.get("siglip_kd")(DS, DT).double()
    batch = sigmoid_batch(teachers=teachers, student_bias=student_bias)
    value = method(batch)
    np.testing.assert_allclose(float(value.detach()), siglip_kd_by_hand(batch, method.logit_bias.item()), rtol=1e-10)

    def loss(student_image, student_text):
        return method(methods.DistillBatch(student_image, student_text, batch.teacher_image, batch.teacher_text,
                                           batch.student_logit_scale, batch.teacher_logit_scale, None, batch.teachers,
                                           batch.student_logit_bias, batch.teacher_logit_bias))

    assert torch.autograd.gradcheck(loss, (batch.student_image, batch.student_text), eps=1e-6, atol=1e-5)


def test_siglip_kd_is_zero_where_the_student_is_its_teacher():
    batch = sigmoid_batch(teachers=1)
    same = methods.DistillBatch(batch.teacher_image.clone().requires_grad_(), batch.teacher_text.clone(),
                                batch.teacher_image, batch.teacher_text, batch.teacher_logit_scale,
                                batch.teacher_logit_scale, None, batch.teachers, batch.teacher_logit_bias,
                                batch.teacher_logit_bias)
    assert abs(float(methods.get("siglip_kd")(DT, DT).double()(same))) < 1e-12


def test_gd_takes_each_sigmoid_models_gradient_of_its_own_loss():
    g = torch.Generator().manual_seed(4)
    v = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    u = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale, bias = torch.tensor(11.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    autograd_v, autograd_u = torch.autograd.grad(SigLipLoss()(v, u, scale, bias), (v, u))
    closed_v, closed_u = sigmoid_loss_gradients(v, u, scale, bias)
    torch.testing.assert_close(closed_v, autograd_v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(closed_u, autograd_u, rtol=1e-12, atol=1e-14)
    # the method: a sigmoid teacher's gradient against a CLIP student's, each of its own loss
    batch = sigmoid_batch(teachers=1, student_bias=False)
    gd = methods.get("gd")(DS, DT).double()
    student_v, student_u = (F.normalize(gd.project(x), dim=-1) for x in (batch.student_image, batch.student_text))
    student = torch.autograd.grad(
        methods.base.open_clip_loss("ClipLoss")(student_v, student_u, batch.student_logit_scale),
        (student_v, student_u))
    tv, tu = (t.clone().requires_grad_() for t in (batch.teacher_image, batch.teacher_text))
    teacher = torch.autograd.grad(SigLipLoss()(tv, tu, batch.teacher_logit_scale, batch.teacher_logit_bias), (tv, tu))
    expected = sum(F.mse_loss(s, t) for s, t in zip(student, teacher))
    torch.testing.assert_close(gd(batch), expected, rtol=1e-10, atol=1e-14)


def test_a_sigmoid_students_task_loss_is_open_clips_siglip_loss():
    objective = Objective({}, DS, None, task_loss="siglip").double()
    batch = sigmoid_batch()
    terms = objective(batch)
    expected = SigLipLoss()(F.normalize(batch.student_image, dim=-1), F.normalize(batch.student_text, dim=-1),
                            batch.student_logit_scale, batch.student_logit_bias)
    torch.testing.assert_close(terms["task"], expected, rtol=1e-12, atol=0)


def _config(**changes):
    base = {"student": {"model": "clipkd-tiny-sigmoid"}, "data": {"dataset": "digits"},
            "train": {"batch_size": 8, "steps": 1}}
    return parse_config({**base, **changes})


def test_the_task_loss_follows_the_student_and_is_in_the_run_id_only_where_it_is_not_clip():
    sigmoid = _config()
    assert sigmoid.task_loss == "siglip" and sigmoid.resolved()["train"]["task_loss"] == "siglip"
    assert _config(train={"batch_size": 8, "steps": 1, "task_loss": "siglip"}).run_id == sigmoid.run_id
    softmax = _config(train={"batch_size": 8, "steps": 1, "task_loss": "clip"})
    assert softmax.task_loss == "clip" and softmax.run_id != sigmoid.run_id
    clip = _config(student={"model": "clipkd-tiny"})
    assert clip.task_loss == "clip" and "task_loss" not in clip.training_fields()["train"]
    with pytest.raises(ConfigError, match="task_loss: siglip needs a student with a logit bias; clipkd-tiny has none"):
        _config(student={"model": "clipkd-tiny"}, train={"batch_size": 8, "steps": 1, "task_loss": "siglip"})
    from harness.run_rows import student_label

    assert (student_label(sigmoid), student_label(softmax), student_label(clip)) == (
        "clipkd-tiny-sigmoid (siglip loss)", "clipkd-tiny-sigmoid (clip loss)", "clipkd-tiny")


def test_siglip_kd_refuses_a_clip_teacher_when_the_config_is_read():
    teacher = {"model": "clipkd-tiny-teacher", "pretrained": "weights.pt"}
    with pytest.raises(ConfigError) as refused:
        _config(teacher=teacher, distill={"siglip_kd": 1})
    assert "distill.siglip_kd: siglip_kd distils a sigmoid teacher's pairwise probabilities" in str(refused.value)
    assert "clipkd-tiny-teacher (teacher) has no logit bias" in str(refused.value)
    assert _config(teacher={**teacher, "model": "clipkd-tiny-sigmoid"}, distill={"siglip_kd": 1, "crd": 1})


@pytest.mark.parametrize("name", methods.BUILTIN)
def test_the_teacher_kinds_read_without_importing_a_method_are_its_classs(name):
    cls = methods.get(name)
    for sigmoid in ({"a": True}, {"a": False}, {"a": True, "b": False}):
        assert methods.teacher_problem(name, sigmoid) == cls.teacher_problem(sigmoid)


def test_a_sigmoid_student_distils_a_sigmoid_teacher_end_to_end(tmp_path):
    """`clipkd run` of a SigLIP-config student under a SigLIP-config teacher: the sigmoid task loss, siglip_kd and
    CRD train, the run is evaluated and stored, and the leaderboard names the student's loss."""
    import json

    from conftest import run_clipkd

    from harness.models.build import create_clip
    from results.store import Store

    torch.manual_seed(5)
    torch.save({"state_dict": create_clip("clipkd-tiny-sigmoid").model.state_dict()}, tmp_path / "teacher.pt")
    config = {"name": "sigmoid", "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny-sigmoid"},
              "teacher": {"model": "clipkd-tiny-sigmoid", "pretrained": str(tmp_path / "teacher.pt")},
              "distill": {"siglip_kd": 1, "crd": 1}, "data": {"dataset": "digits", "subset": 64},
              "optim": {"warmup_steps": 1}, "train": {"batch_size": 16, "steps": 3}}
    (tmp_path / "sigmoid.yaml").write_text(json.dumps(config))
    db = f"sqlite:///{tmp_path}/store.db"
    printed = run_clipkd("run", "sigmoid.yaml", "--db", db, cwd=tmp_path).stdout
    run_id = printed.split()[1]
    run_dir = tmp_path / "runs" / run_id
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and {"task", "siglip_kd", "crd"} <= records[-1].keys()
    assert json.loads((run_dir / "config.json").read_text())["train"]["task_loss"] == "siglip"
    row = Store(db).get_run(run_id)
    assert row["student"] == "clipkd-tiny-sigmoid (siglip loss)" and row["status"] == "done"
    assert Store(db).metrics(run_id)["digits"]["acc1"] >= 0
