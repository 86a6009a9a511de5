"""Named suites of benchmarks and their averages: ``eval.suites: [{name: datacomp, root: /data/datacomp}]``.

A suite expands into its benchmarks, each evaluated as any benchmark is (clip_benchmark's datasets and metrics),
and adds, under the benchmark ``suite:NAME``, the average of its tasks' main metrics and of each group's. Those
are metrics like any other: the leaderboard shows them as columns with their intervals over seeds.

- ``imagenet-shifts``: the paper's ImageNet variants (ImageNet-1k val, -V2, -R, -A, -Sketch), top-1; staged as
  clip_benchmark stages them, ``ROOT/<dataset>``.
- ``datacomp``: the 38 tasks of DataComp's evaluation (mlfoundations/datacomp, ``tasklist.yml``), each with the
  main metric it lists, read as DataComp reads them: clip_benchmark's webdataset versions, ``ROOT/wds_<task, / as
  ->_test``. Mean per-class recall for Caltech-101, FGVC Aircraft, Flowers and Pets, ``mean_recall@1`` (of image and
  text R@1) for Flickr30k and MSCOCO, top-1 for most; five with DataComp's own evaluators (evals/datacomp.py):
  iWildCam's macro F1, FMoW's worst-region accuracy, Dollar Street's worst-income top-5 accuracy, GeoDE's
  worst-region accuracy, and WinoGAViL's Jaccard score (its Hugging Face split, ``ROOT/winogavil``). Their plain
  mean is DataComp's ``average``; a suite with tasks left out would store ``average_N_of_38``, never ``average``.
  The groups are DataComp's: ImageNet, its distribution shifts, VTAB (the tasks tagged ``vtab_*``) and retrieval
  (Flickr30k, MSCOCO and WinoGAViL). FairFace and UTKFace, listed without a main metric, are not among the 38, as
  in DataComp's own average.
"""
from __future__ import annotations

from dataclasses import dataclass

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


@dataclass(frozen=True)
class SuiteTask:
    dataset: str  # the clip_benchmark dataset name
    folder: str  # where it is staged under the suite's root
    metric: str  # the task's main metric, as clipkd stores it
    groups: tuple[str, ...] = ()
    task: str | None = CLASSIFICATION  # clip_benchmark's task; None for a set that is neither (WinoGAViL)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[SuiteTask, ...]
    size: int  # the tasks the suite defines, evaluated here or not

    @property
    def average_name(self) -> str:
        return "average" if len(self.tasks) == self.size else f"average_{len(self.tasks)}_of_{self.size}"


MEAN_RECALL = "mean_recall@1"  # of image and text retrieval, DataComp's retrieval metric
SHIFTS = "distribution shifts"


def _imagenet_shifts() -> Suite:
    names = ("imagenet1k", "imagenetv2", "imagenet-r", "imagenet-a", "imagenet_sketch")
    return Suite("imagenet-shifts", tuple(
        SuiteTask(name, name, "acc1", ("ImageNet",) if name == "imagenet1k" else (SHIFTS,)) for name in names),
        len(names))


# DataComp's tasklist.yml: task -> (main metric, group tags); metric None: acc1
_DATACOMP = {
    "vtab/caltech101": ("mean_per_class_recall", ("VTAB",)), "cifar10": (None, ()), "vtab/cifar100": (None, ("VTAB",)),
    "vtab/clevr_count_all": (None, ("VTAB",)), "vtab/clevr_closest_object_distance": (None, ("VTAB",)),
    "country211": (None, ()), "vtab/dtd": (None, ("VTAB",)), "vtab/eurosat": (None, ("VTAB",)),
    "fgvc_aircraft": ("mean_per_class_recall", ()), "food101": (None, ()), "gtsrb": (None, ()),
    "imagenet1k": (None, ("ImageNet",)), "imagenet_sketch": (None, (SHIFTS,)), "imagenetv2": (None, (SHIFTS,)),
    "imagenet-a": (None, (SHIFTS,)), "imagenet-o": (None, (SHIFTS,)), "imagenet-r": (None, (SHIFTS,)),
    "vtab/kitti_closest_vehicle_distance": (None, ("VTAB",)), "mnist": (None, ()), "objectnet": (None, (SHIFTS,)),
    "vtab/flowers": ("mean_per_class_recall", ("VTAB",)), "vtab/pets": ("mean_per_class_recall", ("VTAB",)),
    "voc2007": (None, ()), "vtab/pcam": (None, ("VTAB",)), "renderedsst2": (None, ()), "vtab/resisc45": (None, ("VTAB",)),
    "cars": (None, ()), "stl10": (None, ()), "sun397": (None, ("VTAB",)), "vtab/svhn": (None, ("VTAB",)),
    "wilds/camelyon17": (None, ()),
    "retrieval/flickr30k": (MEAN_RECALL, ("retrieval",)),
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": (MEAN_RECALL, ("retrieval",)),
    # scored by DataComp's own evaluators (evals/datacomp.py)
    "wilds/iwildcam": ("F1-macro_all", ()), "wilds/fmow": ("acc_worst_region", ()),
    "fairness/dollar_street": ("acc_top5_wg", ()), "fairness/geode": ("acc_wg", ()),
}
WINOGAVIL = SuiteTask("winogavil", "winogavil", "jaccard_score_10-12", ("retrieval",), None)


def _datacomp() -> Suite:
    tasks = tuple(
        SuiteTask(f"wds/{name}", f"wds_{name.replace('/', '-')}_test", metric or "acc1", groups,
                  RETRIEVAL if metric == MEAN_RECALL else CLASSIFICATION)
        for name, (metric, groups) in _DATACOMP.items()) + (WINOGAVIL,)
    return Suite("datacomp", tasks, len(tasks))


SUITES = {suite.name: suite for suite in (_imagenet_shifts(), _datacomp())}


def suite_benchmark(name: str) -> str:
    """The benchmark a suite's averages are stored under."""
    return f"suite:{name}"


def metric_value(metrics: dict[str, float], metric: str) -> float | None:
    """A task's main metric from its evaluation's metrics (``mean_recall@1`` from the two recalls@1)."""
    if metric == MEAN_RECALL:
        recalls = [metrics.get("image_retrieval_recall@1"), metrics.get("text_retrieval_recall@1")]
        return sum(recalls) / 2 if None not in recalls else None
    return metrics.get(metric)


def averages(suite: Suite, benchmark_of: dict[SuiteTask, str], metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The suite's average over its tasks and each group's, from the evaluated benchmarks' metrics; an average
    is left out when a task of it has no value (it was not evaluated)."""
    values = {task: metric_value(metrics.get(benchmark_of[task], {}), task.metric) for task in suite.tasks}
    out = {}
    for name, members in [(suite.average_name, list(suite.tasks)),
                          *((f"average:{group}", [t for t in suite.tasks if group in t.groups])
                            for group in dict.fromkeys(g for t in suite.tasks for g in t.groups))]:
        found = [values[t] for t in members]
        if members and None not in found:
            out[name] = sum(found) / len(found)
    return out
