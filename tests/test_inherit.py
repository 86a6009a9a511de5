"""TinyCLIP's manual weight inheritance: the student's tensors are the named slices of its teacher's, an inherited
student starts above a random one, and a pair that cannot inherit is one message."""
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, require, run_clipkd

from core.builtin import FASHION_MNIST_DIR
from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.training.loop import Trainer

CPU = torch.device("cpu")


def config(tmp_path: Path, teacher: Path, inherit: dict | None = None):
    return parse_config({"output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny", "inherit": inherit},
                         "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher)},
                         "distill": {"fd": 1}, "data": {"dataset": "digits"}, "train": {"batch_size": 8, "steps": 1}})


def test_an_inherited_student_holds_the_named_slices_of_its_teachers_tensors(tmp_path, teacher_checkpoint):
    """clipkd-tiny-teacher (4 blocks a tower, width 128, 4 heads of 32, embedding 96) into clipkd-tiny (2 blocks,
    width 64, 2 heads of 32, embedding 64): blocks 0 and 2 by default (TinyCLIP's interval front), or as listed."""
    teacher = torch.load(teacher_checkpoint, weights_only=False)["state_dict"]
    student = Trainer(config(tmp_path, teacher_checkpoint, {}), DistEnv(), CPU).student.model.state_dict()
    qkv = teacher["visual.transformer.resblocks.2.attn.in_proj_weight"].view(3, 4, 32, 128)[:, :2, :, :64]
    expected = {
        "visual.transformer.resblocks.1.attn.in_proj_weight": qkv.reshape(192, 64),  # q, k, v: leading 2 heads each
        "visual.transformer.resblocks.1.attn.in_proj_bias":
            teacher["visual.transformer.resblocks.2.attn.in_proj_bias"].view(3, 4, 32)[:, :2].reshape(192),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": teacher["visual.transformer.resblocks.0.mlp.c_fc.weight"][:256, :64],
        "transformer.resblocks.1.mlp.c_proj.weight": teacher["transformer.resblocks.2.mlp.c_proj.weight"][:64, :256],
        "transformer.resblocks.1.ln_2.bias": teacher["transformer.resblocks.2.ln_2.bias"][:64],
        "visual.conv1.weight": teacher["visual.conv1.weight"][:64],
        "visual.positional_embedding": teacher["visual.positional_embedding"][:, :64],
        "visual.proj": teacher["visual.proj"][:64, :64],
        "text_projection": teacher["text_projection"][:64, :64],
        "token_embedding.weight": teacher["token_embedding.weight"][:, :64],
        "logit_scale": teacher["logit_scale"],
    }
    for name, value in expected.items():
        assert torch.equal(student[name], value), name
    listed = Trainer(config(tmp_path, teacher_checkpoint, {"layers": {"image": [3, 1]}}), DistEnv(), CPU)
    mine = listed.student.model.state_dict()
    assert torch.equal(mine["visual.transformer.resblocks.0.ln_1.weight"],
                       teacher["visual.transformer.resblocks.3.ln_1.weight"][:64])
    assert torch.equal(mine["transformer.resblocks.1.ln_1.weight"], teacher["transformer.resblocks.2.ln_1.weight"][:64])
    ids = {config(tmp_path, teacher_checkpoint, inherit).run_id for inherit in (None, {}, {"from": "teacher"})}
    assert len(ids | {listed.config.run_id}) == 3  # inheriting, and from which blocks, is part of the run's identity


def test_magnitude_widths_keep_the_heads_and_neurons_of_largest_norm(tmp_path, teacher_checkpoint):
    """``width: magnitude``: student block 1 of the image tower takes teacher block 2's two heads and 256 MLP neurons
    of largest norm (q, k, v rows and output columns; c_fc row and c_proj column), in order; dims stay leading."""
    teacher = torch.load(teacher_checkpoint, weights_only=False)["state_dict"]
    student = Trainer(config(tmp_path, teacher_checkpoint, {"width": "magnitude"}), DistEnv(), CPU).student.model
    block = "visual.transformer.resblocks.2."
    qkv, out = teacher[block + "attn.in_proj_weight"].view(3, 4, 32, 128), teacher[block + "attn.out_proj.weight"]
    head_norms = [qkv[:, h].square().sum() + out[:, 32 * h:32 * (h + 1)].square().sum() for h in range(4)]
    heads = sorted(sorted(range(4), key=lambda h: -head_norms[h])[:2])
    fc, proj = teacher[block + "mlp.c_fc.weight"], teacher[block + "mlp.c_proj.weight"]
    neurons = sorted(torch.topk(fc.square().sum(1) + proj.square().sum(0), 256).indices.tolist())
    mine = student.state_dict()
    assert torch.equal(mine["visual.transformer.resblocks.1.attn.in_proj_weight"],
                       qkv[:, heads, :, :64].reshape(192, 64))
    assert torch.equal(mine["visual.transformer.resblocks.1.attn.out_proj.weight"],
                       out[:64, [32 * h + i for h in heads for i in range(32)]])
    assert torch.equal(mine["visual.transformer.resblocks.1.mlp.c_fc.bias"], teacher[block + "mlp.c_fc.bias"][neurons])
    assert torch.equal(mine["visual.transformer.resblocks.1.mlp.c_proj.weight"], proj[:64, neurons])
    assert torch.equal(mine["visual.transformer.resblocks.1.ln_1.weight"], teacher[block + "ln_1.weight"][:64])
    assert heads != [0, 1] or neurons != list(range(256))  # not the leading choice by chance
    apart = Trainer(config(tmp_path, teacher_checkpoint, {"width": {"text": "magnitude"}}), DistEnv(), CPU)
    theirs = apart.student.model.state_dict()  # per tower: the image tower keeps the leading ones
    assert torch.equal(theirs["visual.transformer.resblocks.1.mlp.c_fc.bias"], teacher[block + "mlp.c_fc.bias"][:256])
    text = "transformer.resblocks.2."
    neurons = sorted(torch.topk(teacher[text + "mlp.c_fc.weight"].square().sum(1)
                                + teacher[text + "mlp.c_proj.weight"].square().sum(0), 256).indices.tolist())
    assert torch.equal(theirs["transformer.resblocks.1.mlp.c_fc.bias"], teacher[text + "mlp.c_fc.bias"][neurons])
    from harness.run_rows import student_label
    assert student_label(apart.config) == "clipkd-tiny (inherited, image by leading, text by magnitude)"


@pytest.mark.parametrize(("student", "refusal"), [
    ("clipkd-tiny-teacher-48", "cannot inherit positional_embedding: the student's (24, 128) is not a slice of the "
                               "teacher's (16, 128)"),
    ("timm-resnet18", "cannot inherit the text tower: the student's 12 blocks are more than the teacher's 4"),
])
def test_a_pair_that_cannot_inherit_is_one_message(tmp_path, teacher_checkpoint, student, refusal):
    run = {"name": "refused", "output_dir": str(tmp_path / "runs"),
           "student": {"model": student, "inherit": {"from": "teacher"}},
           "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
           "distill": {"fd": 1}, "data": {"dataset": "digits", "subset": 16}, "train": {"batch_size": 8, "steps": 1}}
    (tmp_path / "refused.yaml").write_text(json.dumps(run))
    refused = run_clipkd("train", "refused.yaml", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refusal in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_an_inherited_student_starts_above_a_random_one_on_the_demo_data(tmp_path):
    """A teacher trained briefly on Fashion-MNIST, and students of its width with half its blocks: at step 0 (before
    any training) the inherited one classifies zero-shot far above the random one. (Halving the widths too, leading
    slices of this teacher classify at chance before training: 10.2 % against a random student's 9.5 %.)"""
    require(FASHION_MNIST_DIR.is_dir(), "Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
    teacher = {"name": "teacher", "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny-teacher"},
               "data": {"dataset": "fashion-mnist", "subset": 6400}, "optim": {"warmup_steps": 10},
               "train": {"batch_size": 64, "steps": 100, "checkpoint_every": 1000}}
    (tmp_path / "teacher.yaml").write_text(json.dumps(teacher))
    run_clipkd("train", "teacher.yaml", cwd=tmp_path)
    shallow = json.loads((ROOT / "harness/models/configs/clipkd-tiny-teacher.json").read_text())
    shallow["vision_cfg"]["layers"] = shallow["text_cfg"]["layers"] = 2
    (tmp_path / "shallow.json").write_text(json.dumps(shallow))
    accuracy = {}
    for inherit in (True, False):
        student = {"model": str(tmp_path / "shallow.json"), **({"inherit": {"from": "teacher"}} if inherit else {})}
        run = {"name": f"inherit-{inherit}", "output_dir": str(tmp_path / "runs"), "student": student,
               "teacher": {"run": str(tmp_path / "teacher.yaml")}, "data": {"dataset": "fashion-mnist", "subset": 64},
               "train": {"batch_size": 64, "steps": 1}, "eval": {"every_steps": 1, "during_items": 2000}}
        (tmp_path / "student.yaml").write_text(json.dumps(run))
        run_dir = Path(run_clipkd("train", "student.yaml", cwd=tmp_path).stdout.split()[-1])
        first = json.loads((run_dir / "eval_log.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0
        accuracy[inherit] = first["acc1"]
    assert accuracy[True] > accuracy[False] + 0.15, accuracy


def test_a_pair_that_cannot_inherit_is_refused_when_the_grid_is_planned(tmp_path, teacher_checkpoint):
    """Both models built on the meta device at `grid plan`: the refusal comes before anything queues, with the
    cell's name; a pair that can inherit passes."""
    teacher = {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)}
    grid = {"name": "refused", "base": {"data": {"dataset": "digits"}, "train": {"batch_size": 8, "steps": 1}},
            "axes": {"teachers": [teacher], "methods": {"fd": {"fd": 1}},
                     "students": [{"model": "clipkd-tiny-teacher-48", "inherit": {"from": "teacher"}},
                                  {"model": "clipkd-tiny", "inherit": {"from": "teacher", "width": "magnitude"}},
                                  {"model": "clipkd-tiny-teacher", "inherit": {"prune": {"sparsity": 0.5}}}]}}
    (tmp_path / "refused.yaml").write_text(json.dumps(grid))
    planned = run_clipkd("grid", "plan", "refused.yaml", cwd=tmp_path, check=False)
    assert planned.returncode == 2 and "Traceback" not in planned.stderr, planned.stderr
    assert "1 of 3 cells would fail before they train" in planned.stderr
    assert ("clipkd-tiny-teacher-48+inherited-from-teacher/fd/digits/s0: student.inherit: cannot inherit "
            "positional_embedding: the student's (24, 128) is not a slice of the teacher's (16, 128)") in planned.stderr
