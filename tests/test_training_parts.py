"""The training loop's parts, each on its own: the stop signals, the non-finite watch, the optimiser's decay rule,
a run's teachers, the method names read without torch."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch import nn

from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.data.inputs import ModelInput, OtherInputs
from harness.teachers.cached import CachedTeacher
from harness.teachers.ensemble import run_teachers
from harness.teachers.live import LiveTeacher
from harness.training.optimizer import parameter_groups
from harness.training.stops import FiniteWatch, NonFiniteLossError, StopSignals

CPU = torch.device("cpu")


def test_a_stop_signal_is_a_flag_and_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's pre-time-limit signal: the process goes on
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_watch_names_the_first_bad_step_and_the_term_that_went_bad(tmp_path):
    watch = FiniteWatch(["loss", "task", "fd"], step=10, device=CPU)
    watch.observe(torch.tensor([1.0, 0.5, 0.5]))
    watch.check(tmp_path)  # all finite: nothing raised
    watch.observe(torch.tensor([math.inf, 0.5, math.inf]))  # step 12: fd made the total infinite
    watch.observe(torch.tensor([math.nan, math.nan, 0.1]))  # step 13: only the first bad step is kept
    with pytest.raises(NonFiniteLossError, match=r"step 12: loss term 'fd' is inf"):
        watch.check(tmp_path)


def test_no_weight_decay_on_gains_biases_norms_and_the_temperature():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.logit_scale = nn.Parameter(torch.ones([]))
    model.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)
    no_decay, decay = parameter_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # bias, norm gain and bias, scale


def test_a_run_without_a_teacher_has_none_and_a_live_one_is_built(teacher_checkpoint):
    base = {"student": {"model": "clipkd-tiny"}, "data": {"dataset": "digits"}, "train": {"batch_size": 8, "steps": 1}}
    student = ModelInput.of("clipkd-tiny")
    alone = run_teachers(parse_config(base), student, CPU, torch.float32, DistEnv())
    assert (alone.teachers, alone.embed_dim, alone.caches, alone.cached_rows) == (None, None, [], None)
    teacher = {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)}
    live = run_teachers(parse_config({**base, "teacher": teacher, "distill": {"fd": 1}}), student, CPU, torch.float32,
                        DistEnv())
    (member,) = live.teachers.members
    assert isinstance(member, LiveTeacher) and not isinstance(member, CachedTeacher)
    assert live.embed_dim == 96 and live.cached_rows is None and not member.model.training
    assert (member.view, member.text, live.others) == (None, None, OtherInputs())  # it sees the student's input


def test_a_config_names_its_methods_without_importing_torch():
    """A grid's status validates every cell's methods: by name, with no import of torch (issue 30's start-up)."""
    config = {"student": {"model": "clipkd-tiny"}, "teacher": {"model": "clipkd-tiny-teacher", "pretrained": "x.pt"},
              "distill": {"fd": 1, "icl": 1, "crd": 1}, "data": {"dataset": "digits"},
              "train": {"batch_size": 8, "steps": 1}}
    script = (f"import sys; from harness.config.run_config import parse_config; parse_config({config!r}).run_id; "
              "print(sorted(m for m in ('torch', 'open_clip', 'scipy') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
