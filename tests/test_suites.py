"""Suites of benchmarks: their averages are metrics with intervals on the leaderboard, a named suite expands into
its tasks, and a suite whose data is not staged is named by `grid plan`."""
import csv
import io

import pandas as pd
import pytest
import yaml
from conftest import run_clipkd
from PIL import Image

from core.builtin import load_builtin
from evals.suites import SUITES, averages, suite_benchmark
from harness.config.run_config import parse_config
from harness.config.specs import ConfigError
from harness.run import run
from results.store import Store


def write_generated_suite(folder):
    """The digits test split as an image folder of class folders and as an image–caption CSV: the tests' own data."""
    split = load_builtin("digits", "test")
    rows = []
    for index, (pixels, label, caption) in enumerate(zip(split.images[:200], split.labels[:200], split.captions[:200])):
        path = folder / "classes" / split.classnames[label] / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append({"filepath": str(path.relative_to(folder)), "caption": caption})
    with (folder / "captions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["filepath", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return [{"dataset": "digits", "groups": ["digits"]},
            {"dataset": "imagefolder", "root": str(folder / "classes"), "metric": "mean_per_class_recall",
             "groups": ["digits"]},
            {"dataset": "csv", "root": str(folder / "captions.csv"), "metric": "mean_recall@1",
             "groups": ["retrieval"]}]


def test_a_suites_averages_are_leaderboard_columns_with_intervals(tmp_path):
    tasks = write_generated_suite(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    for seed in (0, 1):
        config = parse_config({
            "name": f"suite-{seed}", "seed": seed, "output_dir": str(tmp_path / "runs"),
            "student": {"model": "clipkd-tiny"}, "data": {"dataset": "digits", "workers": 0},
            "optim": {"warmup_steps": 1}, "train": {"batch_size": 32, "steps": 2},
            "eval": {"benchmarks": [], "suites": [{"name": "generated", "tasks": tasks}], "workers": 0},
        })
        assert run(config, store) == "done"
        metrics = store.metrics(config.run_id)
        suite = metrics[suite_benchmark("generated")]
        digits, folder, captions = metrics["digits"], metrics["imagefolder:classes"], metrics["csv:captions"]
        mean_recall = (captions["image_retrieval_recall@1"] + captions["text_retrieval_recall@1"]) / 2
        assert suite["average"] == pytest.approx((digits["acc1"] + folder["mean_per_class_recall"] + mean_recall) / 3)
        assert suite["average:digits"] == pytest.approx((digits["acc1"] + folder["mean_per_class_recall"]) / 2)
        assert suite["average:retrieval"] == pytest.approx(mean_recall)
    table = pd.read_csv(io.StringIO(run_clipkd("leaderboard", "--db", store.url, "--format", "csv",
                                               cwd=tmp_path).stdout))
    row = table[table["benchmark"] == "suite:generated"].iloc[0]
    assert row["seeds"] == 2
    for column in ("average", "average:digits", "average:retrieval"):
        assert row[f"{column}_low"] <= row[column] <= row[f"{column}_high"], column


def test_named_suites_expand_into_their_tasks_and_metrics():
    datacomp, shifts = SUITES["datacomp"], SUITES["imagenet-shifts"]
    assert datacomp.size == len(datacomp.tasks) == 38 and datacomp.average_name == "average"
    metric = {t.dataset: t.metric for t in datacomp.tasks}
    assert metric["wds/vtab/caltech101"] == metric["wds/vtab/pets"] == "mean_per_class_recall"
    assert metric["wds/retrieval/flickr30k"] == "mean_recall@1" and metric["wds/imagenet1k"] == "acc1"
    assert sum("VTAB" in t.groups for t in datacomp.tasks) == 13
    assert [metric[t] for t in ("wds/wilds/iwildcam", "wds/wilds/fmow", "wds/fairness/dollar_street",
                                "wds/fairness/geode", "winogavil")] == [
        "F1-macro_all", "acc_worst_region", "acc_top5_wg", "acc_wg", "jaccard_score_10-12"]  # DataComp's names
    assert [t.dataset for t in datacomp.tasks if "retrieval" in t.groups] == [
        "wds/retrieval/flickr30k", "wds/retrieval/mscoco_2014_5k_test_image_text_retrieval", "winogavil"]
    assert [t.dataset for t in shifts.tasks] == ["imagenet1k", "imagenetv2", "imagenet-r", "imagenet-a", "imagenet_sketch"]
    values = {"imagenet1k": {"acc1": 0.5}, "imagenetv2": {"acc1": 0.4}, "imagenet-r": {"acc1": 0.3},
              "imagenet-a": {"acc1": 0.1}}
    found = averages(shifts, {t: t.dataset for t in shifts.tasks}, values)
    assert found == {"average:ImageNet": 0.5}  # a task not evaluated leaves out every average it belongs to
    with pytest.raises(ConfigError, match="unknown suite 'datacom'; named suites: imagenet-shifts, datacomp"):
        parse_config({"student": {"model": "clipkd-tiny"}, "data": {"dataset": "digits"},
                      "train": {"batch_size": 8, "steps": 1}, "eval": {"suites": [{"name": "datacom"}]}})


def test_grid_plan_names_a_suites_missing_data(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "datacomp-plan", "output_dir": "runs",
        "base": {"data": {"dataset": "digits"}, "train": {"batch_size": 32, "steps": 2},
                 "eval": {"suites": [{"name": "datacomp", "root": str(tmp_path / "datacomp")}]}},
        "axes": {"students": [{"model": "clipkd-tiny"}], "methods": {"baseline": {}}},
    }))
    result = run_clipkd("grid", "plan", str(grid), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "1 of 1 cells would fail before they train" in result.stderr
    assert f"benchmark 'wds/vtab/caltech101': root '{tmp_path / 'datacomp' / 'wds_vtab-caltech101_test'}' does not exist" \
        in result.stderr


def test_clipkd_eval_of_a_suite_names_every_task_not_staged_before_it_loads_a_model(tmp_path):
    result = run_clipkd("eval", "--model", "clipkd-tiny", "--pretrained", str(tmp_path / "not-yet.pt"), "--suite",
                        "imagenet-shifts", "--root", str(tmp_path / "in"), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "suite 'imagenet-shifts': 5 of 5 tasks are not staged" in result.stderr
    assert f"benchmark 'imagenet_sketch': root '{tmp_path / 'in' / 'imagenet_sketch'}' does not exist" in result.stderr
