"""TinyCLIP's automatic inheritance: the masked model starts as its source, the dense model it exports computes what
the masked one does in evaluation with the weight count its masks imply, the sparsity is held at the scheduled
target, and a pruning run reaches it, says it per step and stores it."""
import json
from pathlib import Path

import pytest
import torch
from conftest import run_clipkd

from harness.models.build import create_clip
from harness.models.prunable import (
    BETA,
    GAMMA,
    ZETA,
    MaskedLayerNorm,
    make_dense,
    make_prunable,
    narrow,
)

F64 = torch.float64


def _inputs(bundle):
    torch.manual_seed(3)
    return torch.randn(5, 3, 32, 32, dtype=F64), bundle.tokenizer(["a cat", "two dogs on a mat", "x", "", "a b c d"])


def _encode(model, images, texts):
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(texts)])


def _block_weights(model) -> int:
    """The blocks' attention and MLP weight matrices, counted from the tensors."""
    return sum(p.numel() for name, p in model.named_parameters()
               if "resblocks" in name and name.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight",
                                                         "c_proj.weight")))


def test_the_dense_model_is_the_masked_model_in_evaluation_with_the_count_its_masks_imply():
    torch.manual_seed(0)
    bundle = create_clip("clipkd-tiny-teacher", dtype=F64)
    model, (images, texts) = bundle.model.eval(), _inputs(bundle)
    source, unpruned = _encode(model, images, texts), _block_weights(model)
    masks = make_prunable(model, 0.5)
    model.eval()
    assert torch.allclose(_encode(model, images, texts), source, rtol=0, atol=1e-12)  # it starts as its source
    with torch.no_grad():
        for gate in masks.modules():
            if hasattr(gate, "log_alpha"):
                gate.log_alpha.copy_(torch.randn_like(gate.log_alpha) * 2)
        masks.heads["text"][1].log_alpha.fill_(-10)  # a block left without heads: its attention is its bias
    masked, kept = _encode(model, images, texts), masks.kept_sparsity()
    assert 0.2 < kept < 0.8 and not torch.allclose(masked, source)

    shape = make_dense(model)
    assert shape["towers"]["text"]["heads"][1] == 0 and not hasattr(model, "prune_masks")
    assert torch.allclose(_encode(model, images, texts), masked, rtol=0, atol=1e-12)
    assert _block_weights(model) == round((1 - kept) * unpruned)  # the count the masks imply
    assert shape["unpruned_block_weights"] == unpruned

    rebuilt = create_clip("clipkd-tiny-teacher", dtype=F64).model  # its shape from the structure, then its weights
    narrow(rebuilt, shape)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(_encode(rebuilt.eval(), images, texts), _encode(model, images, texts))


def test_expected_sparsity_is_the_hand_computed_share_and_hold_puts_it_at_the_target():
    model = create_clip("clipkd-tiny-teacher").model
    masks = make_prunable(model, 0.6)
    torch.manual_seed(1)
    with torch.no_grad():
        for gate in masks.modules():
            if hasattr(gate, "log_alpha"):
                gate.log_alpha.normal_(0, 3)

    def keep(gate):
        return torch.sigmoid(gate.log_alpha.double() - BETA * torch.log(torch.tensor(-GAMMA / ZETA, dtype=F64)))

    kept = full = 0.0
    for tower in ("image", "text"):  # clipkd-tiny-teacher: 4 blocks a tower, width 128, 4 heads of 32, MLP 512
        dims = keep(masks.dims[tower]).sum()
        for block in range(4):
            kept += dims * (4 * 32 * keep(masks.heads[tower][block]).sum() + 2 * keep(masks.neurons[tower][block]).sum())
            full += 128 * (4 * 32 * 4 + 2 * 512)
    assert masks.expected_sparsity() == pytest.approx(float(1 - kept / full), rel=1e-12)
    masks.schedule(step=10, total_steps=100, warmup=0.5)  # a fifth of the way to 0.6
    assert float(masks.target) == pytest.approx(0.12)
    masks.hold()
    assert masks.expected_sparsity() == pytest.approx(0.12, abs=1e-7)  # log α is float32: ulp ~2e-7 at |3|


def test_masked_layer_norm_gradients():
    """Its mean and variance over the dims a soft mask weighs: gradcheck in x, the gains and the mask."""
    torch.manual_seed(2)
    norm = torch.nn.LayerNorm(6, dtype=F64)
    mask = torch.rand(6, dtype=F64, requires_grad=True)
    masked = MaskedLayerNorm(norm, lambda: mask)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m, w: MaskedLayerNorm.forward(masked, x), (x, mask, masked.weight))
    binary = torch.tensor([1, 0, 1, 1, 0, 1], dtype=F64)
    masked.dims = lambda: binary  # a 0/1 mask: LayerNorm over the kept dims, zero on the others
    expected = torch.zeros(3, 6, dtype=F64)
    kept = binary.bool()
    expected[:, kept] = torch.nn.functional.layer_norm(x[:, kept], (4,), norm.weight[kept], norm.bias[kept])
    assert torch.allclose(masked(x), expected, rtol=0, atol=1e-12)


def test_a_pruning_run_reaches_its_target_says_it_each_step_and_stores_the_dense_model(tmp_path, teacher_checkpoint):
    run = {"name": "pruned", "output_dir": str(tmp_path / "runs"),
           "student": {"model": "clipkd-tiny-teacher", "inherit": {"from": "teacher", "prune": {"sparsity": 0.5}}},
           "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint)},
           "distill": {"tinyclip": 1}, "data": {"dataset": "digits", "workers": 0}, "optim": {"warmup_steps": 5},
           "train": {"batch_size": 32, "steps": 40, "log_every": 5}, "eval": {"workers": 0}}
    (tmp_path / "pruned.yaml").write_text(json.dumps(run))
    trained = run_clipkd("run", "pruned.yaml", "--db", f"sqlite:///{tmp_path / 'store.db'}", cwd=tmp_path)
    said = [line for line in trained.stderr.splitlines() if "sparsity" in line and ": step " in line]
    assert len(said) == 8 and said[-1].endswith("target 0.500"), trained.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # the target of the step a record closes (step k trains as step k - 1): 0.5 · (k - 1) / 20, held from step 20
    assert [r["sparsity_target"] for r in log] == pytest.approx([min(0.5, 0.025 * (r["step"] - 1)) for r in log])
    assert all(r["sparsity"] == pytest.approx(r["sparsity_target"], abs=1e-6) for r in log)
    assert log[-1]["sparsity_kept"] == pytest.approx(0.5, abs=0.01)  # the dense model's, from whole units

    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    dense = create_clip("clipkd-tiny-teacher", str(run_dir / "checkpoints" / "final.pt")).model
    assert _block_weights(dense) == round((1 - log[-1]["sparsity_kept"]) * final["structure"]["unpruned_block_weights"])
    record = json.loads((run_dir / "record.json").read_text())
    assert "acc1" in record["metrics"]["digits"]  # evaluated from the dense model
    exported = run_clipkd("export", str(run_dir), str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert exported.returncode == 2 and len(exported.stderr.strip().splitlines()) == 1, exported.stderr
    assert "no open_clip model config describes" in exported.stderr


def two_stage_grid(workdir, teacher) -> str:
    """TinyCLIP's automatic inheritance in two stages: the teacher pruned to 50 % of its block weights, then that
    run's dense model pruned on to 75 % (of the teacher's), each distilling from the teacher with affinity
    mimicking. The second stage is an axis cell that names the first: it waits for it."""
    teacher = {"model": "clipkd-tiny-teacher", "pretrained": str(teacher)}
    grid = {"name": "stages", "output_dir": "runs",
            "base": {"data": {"dataset": "digits", "subset": 512, "workers": 0}, "optim": {"warmup_steps": 2},
                     "train": {"batch_size": 32, "steps": 16, "log_every": 4}, "eval": {"workers": 0}},
            "stages": {"half": {"student": {"model": "clipkd-tiny-teacher",
                                            "inherit": {"from": "teacher", "prune": {"sparsity": 0.5}}},
                                "teacher": teacher, "distill": {"tinyclip": 1}}},
            "axes": {"teachers": [teacher], "students": [{"model": "clipkd-tiny-teacher",
                                   "inherit": {"from": {"stage": "half"}, "prune": {"sparsity": 0.75}}}],
                     "methods": {"tinyclip": {"tinyclip": 1}}}}
    (workdir / "grids").mkdir(exist_ok=True)
    (workdir / "grids" / "stages.yaml").write_text(json.dumps(grid))
    return "grids/stages.yaml"


def assert_the_stages_ran_in_turn(workdir) -> None:
    """Each stage done at its target, the second started from the first's dense model after it finished."""
    import sqlite3

    db = sqlite3.connect(workdir / "results" / "clipkd.db")
    runs = dict(db.execute("select name, run_dir from runs where status = 'done'").fetchall())
    students = sorted(row[0] for row in db.execute("select student from runs"))
    assert students == ["clipkd-tiny-teacher (pruned to 0.5)", "clipkd-tiny-teacher (pruned to 0.75)"]
    first, second = (Path(runs[name]) for name in sorted(runs, key=lambda n: "stage/" not in n))
    config = json.loads((second / "config.json").read_text())
    assert (workdir / config["student"]["inherit"]["source"]).resolve() == first.resolve()
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] for run in (first, second)]
    assert logs[0][-1]["sparsity_kept"] == pytest.approx(0.5, abs=0.01)
    start = logs[0][-1]["sparsity_kept"]  # the second starts at the first's dense model: its target rises from there
    assert logs[1][0]["step"] == 4 and logs[1][0]["sparsity_target"] == pytest.approx(start + (0.75 - start) * 3 / 8)
    assert logs[1][-1]["sparsity_kept"] == pytest.approx(0.75, abs=0.01)  # of the teacher's weights
    shapes = [torch.load(run / "checkpoints" / "final.pt", weights_only=False)["structure"] for run in (first, second)]
    assert shapes[0]["unpruned_block_weights"] == shapes[1]["unpruned_block_weights"]
    finished = json.loads((first / "events.jsonl").read_text().splitlines()[-1])
    started = json.loads((second / "events.jsonl").read_text().splitlines()[0])
    assert finished["event"] == "finish" and started["time"] >= finished["time"]


def test_a_two_stage_pruning_grid_runs_in_turn_on_the_local_executor(tmp_path, teacher_checkpoint):
    grid = two_stage_grid(tmp_path, teacher_checkpoint)
    planned = run_clipkd("grid", "plan", grid, cwd=tmp_path).stdout
    assert "stage/half" in planned, planned
    out = run_clipkd("grid", "submit", grid, "--executor", "local", cwd=tmp_path).stdout
    assert out.strip().endswith("0 new, 0 queued, 0 running, 2 done, 0 failed"), out
    assert_the_stages_ran_in_turn(tmp_path)
