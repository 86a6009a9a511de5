"""Batch selection (selection/, harness/training/selection.py): the built-in selectors against hand computations,
ratio 1.0 against no selection bit for bit, two processes against one in float64, a plugin through its entry point."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_clipkd
from test_train import pip_install_package, write_config

from harness.config.run_config import parse_config
from harness.config.specs import ConfigError
from harness.training.loop import train
from methods.base import TeacherEmbeddings
from selection.base import SuperBatch
from selection.registry import SelectorError, available, get


def super_batch(size: int = 12, dim: int = 6, seed: int = 0) -> SuperBatch:
    generator = torch.Generator().manual_seed(seed)
    student = [torch.randn(size, dim, generator=generator, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.nn.functional.normalize(torch.randn(size, dim, generator=generator, dtype=torch.float64), dim=-1)
               for _ in range(2)]
    return SuperBatch(*student, torch.tensor(12.0, dtype=torch.float64),
                      (TeacherEmbeddings(*teacher, torch.tensor(40.0, dtype=torch.float64)),), seed=3, step=5)


def hand_losses(image: np.ndarray, text: np.ndarray, scale: float) -> list[float]:
    """ℓ_i = ½ [−log softmax_j(s·v̂_i·û_j)_i − log softmax_j(s·û_i·v̂_j)_i], one example at a time."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    losses = []
    for i in range(len(image)):
        to_text = [scale * float(image[i] @ text[j]) for j in range(len(text))]
        to_image = [scale * float(text[i] @ image[j]) for j in range(len(image))]
        losses.append(0.5 * sum(math.log(sum(math.exp(v) for v in row)) - row[i] for row in (to_text, to_image)))
    return losses


def top(scores: list[float], keep: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


def test_hard_and_learnability_pick_what_a_hand_computation_picks():
    batch = super_batch()
    student = hand_losses(batch.student_image.numpy(), batch.student_text.numpy(), 12.0)
    teacher = hand_losses(batch.teachers[0].image.numpy(), batch.teachers[0].text.numpy(), 40.0)
    np.testing.assert_allclose(get("hard")().scores(batch).numpy(), student, rtol=1e-12)
    learnability = [s - t for s, t in zip(student, teacher)]
    np.testing.assert_allclose(get("learnability")().scores(batch).numpy(), learnability, rtol=1e-12, atol=1e-12)
    assert get("hard")().select(batch, 5).tolist() == top(student, 5)
    assert get("learnability")().select(batch, 5).tolist() == top(learnability, 5)
    assert top(student, 5) != top(learnability, 5)  # the teacher's term changes the choice on this batch


def test_learnability_averages_an_ensembles_losses_and_uniform_draws_from_seed_and_step():
    batch = super_batch()
    doubled = SuperBatch(batch.student_image, batch.student_text, batch.student_logit_scale,
                         (batch.teachers[0], super_batch(seed=1).teachers[0]), batch.seed, batch.step)
    each = [hand_losses(t.image.numpy(), t.text.numpy(), 40.0) for t in doubled.teachers]
    student = hand_losses(batch.student_image.numpy(), batch.student_text.numpy(), 12.0)
    expected = [s - (a + b) / 2 for s, a, b in zip(student, *each)]
    np.testing.assert_allclose(get("learnability")().scores(doubled).numpy(), expected, rtol=1e-12, atol=1e-12)
    uniform = get("uniform")()
    assert torch.equal(uniform.select(batch, 6), uniform.select(batch, 6))
    later = SuperBatch(*[getattr(batch, f) for f in ("student_image", "student_text", "student_logit_scale",
                                                    "teachers", "seed")], step=6)
    assert not torch.equal(uniform.select(batch, 6), uniform.select(later, 6))


def kd(teacher_checkpoint, selection=None, **train):
    return dict(teacher={"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
                distill={"fd": 2000, "icl": 1, "crd": 1},
                train={"steps": 6, "checkpoint_every": 3, "precision": "fp64", "selection": selection, **train})


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)


def test_ratio_one_trains_bit_for_bit_as_no_selection(tmp_path, teacher_checkpoint):
    """Every sample kept, in its order: the scoring forward (eval mode, no gradient) changes nothing the step
    reads, so the weights are those of the run without selection, bit for bit; the cost counts the extra forward."""
    from harness.run import training_cost

    plain = train(parse_config(yaml_of(write_config(tmp_path, "plain", output_dir=str(tmp_path / "runs"),
                                                    **kd(teacher_checkpoint)))))
    selected = train(parse_config(yaml_of(write_config(tmp_path, "selected", output_dir=str(tmp_path / "runs"),
                                                       **kd(teacher_checkpoint, {"method": "learnability", "ratio": 1.0})))))
    assert plain != selected
    a, b = final_state(plain), final_state(selected)
    for part in ("state_dict", "methods"):
        assert all(torch.equal(a[part][name], b[part][name]) for name in a[part]), part
    assert training_cost(plain)["student_forward_samples"] == 6 * 64
    assert training_cost(selected)["student_forward_samples"] == 2 * 6 * 64
    assert training_cost(selected)["teacher_forward_samples"] == 6 * 64  # the step read the scoring's embeddings


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_two_processes_select_and_train_as_one_in_float64(tmp_path, teacher_checkpoint):
    """Learnability at ratio 0.5 under torchrun: each rank scores its half of the 128-sample super-batch, the
    ranks agree on the 64 kept and trade them (an all-to-all), and the run ends where one process ends."""
    options = kd(teacher_checkpoint, {"method": "learnability", "ratio": 0.5})
    one = write_config(tmp_path, "one", output_dir=str(tmp_path / "one"), **options)
    two = write_config(tmp_path, "two", output_dir=str(tmp_path / "two"), **options)
    run_clipkd("train", str(one), cwd=tmp_path)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness.cli",
         "train", str(two)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-6000:]
    (run_one,), (run_two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    a, b = final_state(run_one), final_state(run_two)
    for part in ("state_dict", "methods"):
        for name, tensor in a[part].items():
            torch.testing.assert_close(b[part][name], tensor, rtol=1e-9, atol=1e-11, msg=lambda m: f"{part}.{name}: {m}")
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] for run in (run_one, run_two)]
    for first, second in zip(*logs):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-9)


SELECTOR_PLUGIN = '''import torch

from selection.base import Selector


class Easiest(Selector):
    """Easy examples: the lowest student loss first."""

    def scores(self, batch):
        from selection.base import per_example_contrastive

        return -per_example_contrastive(batch.student_image, batch.student_text, batch.student_logit_scale)
'''


def test_a_plugin_selector_is_found_through_its_entry_point_and_trains(tmp_path, teacher_checkpoint):
    env = pip_install_package(tmp_path, "clipkd-easiest", {"easiest.py": SELECTOR_PLUGIN},
                              {"clipkd.selectors": {"easiest": "easiest:Easiest"}})
    listed = run_clipkd("selectors", cwd=tmp_path, env=env).stdout
    assert "easiest" in listed and "Easy examples: the lowest student loss first." in listed
    path = write_config(tmp_path, "easy", train={"steps": 4, "selection": {"method": "easiest", "ratio": 0.5}})
    run_clipkd("train", str(path), cwd=tmp_path, env=env)
    (run_dir,) = (p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    assert final_state(run_dir)["step"] == 4
    assert json.loads((run_dir / "config.json").read_text())["train"]["selection"]["method"] == "easiest"


def test_bad_selection_settings_are_one_message(tmp_path, teacher_checkpoint):
    base = yaml_of(write_config(tmp_path, "bad"))
    with pytest.raises(ConfigError, match="unknown selector 'greedy'; registered selectors: hard, learnability, uniform"):
        parse_config({**base, "train": {**base["train"], "selection": {"method": "greedy", "ratio": 0.5}}})
    with pytest.raises(ConfigError, match="selector 'learnability' scores with a teacher"):
        parse_config({**base, "train": {**base["train"], "selection": {"method": "learnability", "ratio": 0.5}}})
    with pytest.raises(ConfigError, match="must be a whole number of samples"):
        parse_config({**base, "train": {**base["train"], "selection": {"method": "hard", "ratio": 0.3}}})
    with pytest.raises(SelectorError, match="selector 'hard' takes no options"):
        from selection.registry import build

        build("hard", {"temperature": 2})
    assert set(available()) >= {"hard", "learnability", "uniform"}
    options = kd(teacher_checkpoint, {"method": "learnability", "ratio": 0.5})
    labelled = parse_config({**base, **options, "train": {**base["train"], **options["train"]}})
    assert labelled.method_label == "crd+fd+icl+learnability@0.5"


def test_a_batch_the_processes_cannot_share_is_refused_before_the_models_load(tmp_path):
    """6 kept of a 12-sample super-batch: the super-batch splits over 4 processes, the kept samples do not."""
    from core.distributed import DistEnv
    from harness.training.loop import Trainer
    from harness.training.stops import TrainingError

    config = parse_config({"name": "uneven", "output_dir": str(tmp_path), "student": {"model": "clipkd-tiny"},
                           "data": {"dataset": "digits", "workers": 0},
                           "train": {"batch_size": 6, "steps": 1, "selection": {"method": "hard", "ratio": 0.5}}})
    with pytest.raises(TrainingError, match="train.batch_size 6 is not divisible by the 4 processes"):
        Trainer(config, DistEnv(rank=0, world_size=4), torch.device("cpu"))
