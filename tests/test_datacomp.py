"""DataComp's five evaluators (evals/datacomp.py) against hand-computed values, and the whole 38-task suite on
generated data in each task's layout, which stores DataComp's `average`."""
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_clipkd
from PIL import Image

from evals import datacomp
from evals.suites import SUITES, metric_value, suite_benchmark


def test_worst_group_accuracy_and_macro_f1_by_hand():
    hits, groups = np.array([1, 0, 1, 1, 0, 1]), np.array([0, 0, 4, 4, 7, 7])
    assert datacomp.worst_group_accuracy(hits, groups) == 0.5  # groups 0: 1/2, 4: 2/2, 7: 1/2
    assert datacomp.worst_group_accuracy(hits, np.array([0, 1, 0, 0, 0, 0])) == 0.0  # group 1: item 1, a miss
    # classes 0, 1, 2 present; 3 only predicted. F1: class 0 (P 1, R 1/2) 2/3; class 1 (P 1/2, R 1) 2/3; class 2: 0
    assert datacomp.macro_f1_of_present_classes(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 3])) == pytest.approx(4 / 9)


def logits_ranking(*rankings: list[int], classes: int = 7) -> torch.Tensor:
    """Logits whose classes rank in the given order (best first) for each item."""
    rows = torch.zeros(len(rankings), classes)
    for row, ranking in zip(rows, rankings):
        row[ranking] = torch.arange(len(ranking), 0, -1, dtype=torch.float)
    return rows


def test_the_four_classification_evaluators_by_hand():
    logits = logits_ranking([0, 1, 2, 3, 4, 5, 6], [2, 0, 1, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5, 6],
                            [3, 4, 5, 6, 0, 1, 2])
    target = torch.tensor([0, 0, 1, 1, 2])
    hits = {"acc1": np.array([1, 0, 0, 1, 0], bool), "acc5": np.array([1, 1, 0, 1, 0], bool)}  # of these logits
    first4 = {k: v[:4] for k, v in hits.items()}
    # metadata: column 0 the region (or income group), column 1 the year
    metadata = np.array([[0, 2016], [0, 2017], [1, 2016], [1, 2017], [2, 2016]])
    assert datacomp.geode(logits, target, hits, metadata) == {"acc_wg": 0.0}  # regions 0 and 1: 1/2; region 2: 0/1
    # years 2016 (items 0, 2, 4): 1/3; 2017 (items 1, 3): 1/2
    assert datacomp.fmow(logits, target, hits, metadata) == {"acc_worst_region": 0.0, "acc_worst_year": pytest.approx(1 / 3)}
    assert datacomp.fmow(logits[:4], target[:4], first4, metadata[:4]) == {"acc_worst_region": 0.5, "acc_worst_year": 0.5}
    # top-5 by income group: group 0 2/2, group 1 1/2, group 2 0/1
    assert datacomp.dollar_street(logits, target, hits, metadata) == {"acc_top5_wg": 0.0}
    assert datacomp.dollar_street(logits[:4], target[:4], first4, np.array([[0], [0], [1], [1]])) == {"acc_top5_wg": 0.5}
    # predictions 0, 2, 6, 1, 3 against 0, 0, 1, 1, 2: F1 of class 0 (P 1, R 1/2) 2/3, class 1 (P 1, R 1/2) 2/3,
    # class 2: 0; classes 3 and 6, predicted only, are not averaged
    assert datacomp.iwildcam(logits, target, hits, metadata) == {"F1-macro_all": pytest.approx(4 / 9)}


def test_winogavil_prompt_and_jaccard_of_the_top_k_by_hand():
    assert (datacomp.cue_prompt("Apple"), datacomp.cue_prompt("dog")) == ("An apple", "A dog")
    truth = np.array([True, True, False, False, False])
    # the two most similar are candidates 0 and 2: one of the two associations found, |P ∩ T| / |P ∪ T| = 1/3
    assert datacomp.jaccard_of_top_k(np.array([0.9, 0.1, 0.8, 0.3, 0.2]), truth) == pytest.approx(1 / 3)
    assert datacomp.jaccard_of_top_k(np.array([0.9, 0.8, 0.1, 0.3, 0.2]), truth) == 1.0


# -- the 38 tasks, generated -----------------------------------------------------------------------------------------
def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def with_metadata(source, target, rows: np.ndarray) -> None:
    """A clip_benchmark wds classification set with DataComp's per-sample metadata (``npy``) added, in order."""
    import webdataset as wds

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.tar"))
    for shard in sorted((source / "test").glob("*.tar")):
        with wds.TarWriter(str(target / "test" / shard.name)) as sink:
            for sample in wds.tariterators.tarfile_samples([{"url": str(shard)}]):
                index = int(sample["__key__"][1:])
                sink.write({"__key__": sample["__key__"], "png": sample["png"], "cls": sample["cls"], "npy": rows[index]})


def winogavil_split(folder, split, instances: int = 12, seed: int = 0) -> pd.DataFrame:
    """WinoGAViL's test split as Hugging Face stores it: a cue (a class name), 5, 6, 10 or 12 candidate images of
    the digits set named by their index, and the associations: the candidates of the cue's class."""
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(instances):
        size = [5, 6, 10, 12][number % 4]
        chosen = rng.choice(len(split.labels), size, replace=False)
        cue = int(split.labels[chosen[0]])
        names = [f"image{i}" for i in chosen]
        rows.append({"cue": split.classnames[cue], "candidates": names,
                     "associations": [n for n, i in zip(names, chosen) if split.labels[i] == cue],
                     "candidate_images": [{"bytes": png(split.images[i]), "path": f"{n}.png"} for n, i in zip(names, chosen)]})
    frame = pd.DataFrame(rows)
    folder.mkdir(parents=True)
    frame.to_parquet(folder / "test-00000-of-00001.parquet")
    return frame


def test_the_38_generated_tasks_store_datacomps_average(tmp_path):
    """Every DataComp task generated in the layout DataComp reads it from (clip_benchmark's webdataset; the four
    grouped tasks with their metadata ``npy``; WinoGAViL as its Hugging Face parquet), evaluated by `clipkd eval
    --suite datacomp`: each evaluator's number equals the hand computation from the model's own outputs, and the
    suite stores `average`, the plain mean of the 38 main metrics."""
    from core.builtin import load_builtin
    from evals.datasets import load_eval_set
    from evals.zeroshot import zero_shot_metrics
    from harness.export import export_clip_benchmark_wds
    from harness.models.build import create_clip

    items = 40
    classification, retrieval = export_clip_benchmark_wds("digits", tmp_path / "digits", limit=items)
    rng = np.random.default_rng(1)
    metadata = np.column_stack([rng.integers(0, 4, items), rng.integers(2002, 2018, items)])
    grouped = {"wds/wilds/iwildcam", "wds/wilds/fmow", "wds/fairness/dollar_street", "wds/fairness/geode"}
    root = tmp_path / "datacomp"
    for task in SUITES["datacomp"].tasks:
        if task.dataset in grouped:
            with_metadata(classification, root / task.folder, metadata)
        elif task.dataset != "winogavil":
            shutil.copytree(retrieval if task.task == "zeroshot_retrieval" else classification, root / task.folder)
    split = load_builtin("digits", "test")
    instances = winogavil_split(root / "winogavil", split)
    torch.manual_seed(0)
    built = create_clip("clipkd-tiny")
    torch.save({"state_dict": built.model.state_dict()}, tmp_path / "w.pt")
    out = run_clipkd("eval", "--model", "clipkd-tiny", "--pretrained", str(tmp_path / "w.pt"), "--suite", "datacomp",
                     "--root", str(root), "--workers", "0", cwd=tmp_path).stdout
    metrics = json.loads(out)
    suite = metrics.pop(suite_benchmark("datacomp"))
    assert len(metrics) == 38
    values = [metric_value(metrics[t.dataset], t.metric) for t in SUITES["datacomp"].tasks]
    assert None not in values and suite["average"] == pytest.approx(np.mean(values))
    assert "average_33_of_38" not in suite and suite["average:retrieval"] == pytest.approx(np.mean(
        [metric_value(metrics[t.dataset], t.metric) for t in SUITES["datacomp"].tasks if "retrieval" in t.groups]))

    # the grouped tasks, by hand from the per-item hits of the same set and the metadata it was generated with
    model = built.model.eval()
    geode = load_eval_set("wds/fairness/geode", str(root / "wds_fairness-geode_test"), built.preprocess_eval)
    hits = zero_shot_metrics(model, built.tokenizer, geode, torch.device("cpu")).items
    by_region = [hits["acc1"][metadata[:, 0] == g].mean() for g in np.unique(metadata[:, 0])]
    by_year = [hits["acc1"][metadata[:, 1] == y].mean() for y in np.unique(metadata[:, 1])]
    assert metrics["wds/fairness/geode"]["acc_wg"] == pytest.approx(min(by_region))
    assert metrics["wds/wilds/fmow"]["acc_worst_region"] == pytest.approx(min(by_region))
    assert metrics["wds/wilds/fmow"]["acc_worst_year"] == pytest.approx(min(by_year))
    assert metrics["wds/fairness/dollar_street"]["acc_top5_wg"] == pytest.approx(
        min(hits["acc5"][metadata[:, 0] == g].mean() for g in np.unique(metadata[:, 0])))
    # iWildCam's macro F1 by hand: the predictions from clip_benchmark's classifier, F1 per class present
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    with torch.no_grad():
        classifier = zero_shot_classifier(model, built.tokenizer, split.classnames, split.templates, "cpu",
                                          amp=False)
        images = torch.stack([built.preprocess_eval(Image.fromarray(p).convert("RGB")) for p in split.images[:items]])
        predicted = (F.normalize(model.encode_image(images), dim=-1) @ classifier).argmax(1).numpy()
    labels = split.labels[:items]
    f1 = [2 * ((predicted == c) & (labels == c)).sum() / ((predicted == c).sum() + (labels == c).sum())
          for c in np.unique(labels)]
    assert metrics["wds/wilds/iwildcam"]["F1-macro_all"] == pytest.approx(np.mean(f1))
    assert metrics["wds/wilds/iwildcam"]["acc1"] == pytest.approx((predicted == labels).mean())

    # WinoGAViL by hand: each cue's prompt against its candidates, the k most similar against the associations
    scores, sizes = [], []
    with torch.no_grad():
        for row in instances.itertuples():
            images = torch.stack([built.preprocess_eval(Image.open(io.BytesIO(i["bytes"])).convert("RGB"))
                                  for i in row.candidate_images])
            prompt = ("An " if row.cue[0] in "aeiou" else "A ") + row.cue.lower()
            similarity = (F.normalize(model.encode_text(built.tokenizer([prompt])), dim=-1)
                          @ F.normalize(model.encode_image(images), dim=-1).T)[0]
            predicted = {row.candidates[i] for i in similarity.argsort(descending=True)[:len(row.associations)]}
            truth = set(row.associations)
            scores.append(len(predicted & truth) / len(predicted | truth))
            sizes.append(len(row.candidates))
    scores, sizes = np.array(scores), np.array(sizes)
    assert metrics["winogavil"]["jaccard_score_10-12"] == pytest.approx(scores[sizes >= 10].mean())
    assert metrics["winogavil"]["jaccard_score_5-6"] == pytest.approx(scores[sizes <= 6].mean())
    assert metrics["winogavil"]["avg_jaccard_score"] == pytest.approx(scores.mean())


def test_bad_datacomp_data_is_named(tmp_path):
    """A grouped task without its metadata, and a WinoGAViL folder without the split, each named, with what is
    expected."""
    from evals.datasets import load_eval_set
    from evals.errors import EvalDatasetError
    from evals.zeroshot import zero_shot_metrics
    from harness.export import export_clip_benchmark_wds
    from harness.models.build import create_clip

    classification, _ = export_clip_benchmark_wds("digits", tmp_path / "digits", limit=8)
    built = create_clip("clipkd-tiny")
    geode = load_eval_set("wds/fairness/geode", str(classification), built.preprocess_eval)
    with pytest.raises(EvalDatasetError, match=r"0\.tar sample 's000000': no 'npy' metadata, which DataComp's evaluator"):
        zero_shot_metrics(built.model, built.tokenizer, geode, torch.device("cpu"))
    with pytest.raises(EvalDatasetError, match=r"winogavil: no parquet files under .*\(stage the Hugging Face split"):
        load_eval_set("winogavil", str(tmp_path), built.preprocess_eval)
    (tmp_path / "wino").mkdir()
    pd.DataFrame({"cue": ["dog"], "candidates": [["a", "b"]]}).to_parquet(tmp_path / "wino" / "test.parquet")
    with pytest.raises(EvalDatasetError, match=r"lacks columns \['associations', 'candidate_images'\]"):
        load_eval_set("winogavil", str(tmp_path / "wino"), built.preprocess_eval)
