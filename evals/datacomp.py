"""DataComp's own evaluators: the five of its 38 tasks whose main metric clip_benchmark does not compute.

Written here from their definitions in mlfoundations/datacomp (``eval_utils/wilds_eval.py``, ``fairness_eval.py``,
``wino_eval.py``, read at 4a8df19) and the WILDS metrics they call — deliberately not imported: DataComp's are
scripts over its own loaders, and WILDS pins a torch-scatter build. Each is named as DataComp stores it:

- iWildCam ``F1-macro_all``: macro F1 over the classes present in the labels (a prediction of an absent class
  still counts against the present ones), WILDS' ``F1(average="macro")``;
- FMoW ``acc_worst_region``: the lowest top-1 accuracy over the regions that have items (metadata column 0;
  ``acc_worst_year`` likewise over column 1);
- Dollar Street ``acc_top5_wg``: the lowest top-5 accuracy over the income groups (column 0);
- GeoDE ``acc_wg``: the lowest top-1 accuracy over the regions (column 0);
- WinoGAViL ``jaccard_score_10-12``: per instance, a cue prompt ("A …"/"An …") against its 10 or 12 candidate
  images; the k most similar (k = the true associations) are the prediction, scored by the Jaccard index with the
  truth, and averaged over the instances (``jaccard_score_5-6`` over those of 5 and 6 candidates,
  ``avg_jaccard_score`` over all).

The first four are clip_benchmark's zero-shot classification (its classifier, its logits) scored with the
per-sample metadata DataComp ships in each webdataset sample's ``npy``, read in the stream's order.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, jaccard_score

from evals.errors import EvalDatasetError


def worst_group_accuracy(hits: np.ndarray, groups: np.ndarray) -> float:
    """The lowest mean of ``hits`` over the groups that have items (WILDS' worst-group metric)."""
    hits, groups = np.asarray(hits, dtype=float), np.asarray(groups).astype(np.int64)
    return float(min(hits[groups == g].mean() for g in np.unique(groups)))


def macro_f1_of_present_classes(target: np.ndarray, predicted: np.ndarray) -> float:
    """Macro F1 over the classes in ``target`` (WILDS' F1 with ``labels=unique(y_true)``)."""
    return float(f1_score(target, predicted, average="macro", labels=np.unique(target), zero_division=0))


def iwildcam(logits: torch.Tensor, target: torch.Tensor, hits: dict[str, np.ndarray], metadata: np.ndarray
             ) -> dict[str, float]:
    return {"F1-macro_all": macro_f1_of_present_classes(target.numpy(), logits.argmax(1).numpy())}


def fmow(logits: torch.Tensor, target: torch.Tensor, hits: dict[str, np.ndarray], metadata: np.ndarray
         ) -> dict[str, float]:
    return {"acc_worst_region": worst_group_accuracy(hits["acc1"], metadata[:, 0]),
            "acc_worst_year": worst_group_accuracy(hits["acc1"], metadata[:, 1])}


def dollar_street(logits: torch.Tensor, target: torch.Tensor, hits: dict[str, np.ndarray], metadata: np.ndarray
                  ) -> dict[str, float]:
    if "acc5" not in hits:
        raise EvalDatasetError(f"Dollar Street's top-5 accuracy needs 5 classes or more; this set has {logits.shape[1]}")
    return {"acc_top5_wg": worst_group_accuracy(hits["acc5"], metadata[:, 0])}


def geode(logits: torch.Tensor, target: torch.Tensor, hits: dict[str, np.ndarray], metadata: np.ndarray
          ) -> dict[str, float]:
    return {"acc_wg": worst_group_accuracy(hits["acc1"], metadata[:, 0])}


# clip_benchmark's dataset name -> the scores from its logits, labels, per-item top-k hits (clip_benchmark's, as
# zeroshot.classification_metrics computes them) and per-sample metadata
SCORERS: dict[str, Callable[[torch.Tensor, torch.Tensor, dict[str, np.ndarray], np.ndarray], dict[str, float]]] = {
    "wds/wilds/iwildcam": iwildcam, "wds/wilds/fmow": fmow, "wds/fairness/dollar_street": dollar_street,
    "wds/fairness/geode": geode}


def stream_metadata(urls: list[str]) -> np.ndarray:
    """Every sample's ``npy`` metadata row, in the order one reader of the shards meets them (the order the
    classification's gathered logits are in), without decoding an image."""
    import webdataset as wds

    rows = []
    for url in urls:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            if "npy" not in sample:
                raise EvalDatasetError(f"{url} sample {sample.get('__key__')!r}: no 'npy' metadata, which DataComp's "
                                       "evaluator of this task groups the items by")
            rows.append(np.load(io.BytesIO(sample["npy"])).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, 0))


def scored(name: str, urls: list[str] | None, logits: torch.Tensor, target: torch.Tensor,
           hits: dict[str, np.ndarray]) -> dict[str, float]:
    """DataComp's metrics of a classification set that has an evaluator of its own (none for the others)."""
    scorer = SCORERS.get(name)
    if scorer is None or urls is None:
        return {}
    metadata = stream_metadata(urls)[:len(target)]  # evaluation during training reads the stream's first items
    if len(metadata) != len(target):
        raise EvalDatasetError(f"{name}: {len(metadata)} metadata rows for {len(target)} items")
    return scorer(logits, target, hits, metadata)


# -- WinoGAViL ------------------------------------------------------------------------------------------------------
WINOGAVIL_COLUMNS = ("cue", "candidates", "associations", "candidate_images")


@dataclass
class WinoGAViL:
    """The WinoGAViL test split as Hugging Face stores it (``nlphuji/winogavil``): parquet files with the cue, the
    candidates' names, the true associations and the candidates' images (``{bytes, path}``). Stage it with
    ``datasets.load_dataset("nlphuji/winogavil", split="test").to_parquet("ROOT/winogavil/test.parquet")``."""
    root: Path
    transform: Callable

    def __post_init__(self):
        import pandas as pd

        files = sorted(Path(self.root).rglob("*.parquet")) if Path(self.root).is_dir() else []
        if not files:
            raise EvalDatasetError(f"winogavil: no parquet files under {str(self.root)!r} (stage the Hugging Face "
                                   "split nlphuji/winogavil there: see evals/datacomp.py)")
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        missing = [c for c in WINOGAVIL_COLUMNS if c not in frame.columns]
        if missing:
            raise EvalDatasetError(f"winogavil: {files[0]} lacks columns {missing}; expected {list(WINOGAVIL_COLUMNS)}")
        self.frame = frame

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, np.ndarray]]:
        """Each instance: its candidates' images, its cue's prompt, and which candidates are associations."""
        from PIL import Image

        for row in self.frame.itertuples(index=False):
            images = torch.stack([self.transform(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))
                                  for image in row.candidate_images])
            yield images, cue_prompt(row.cue), np.isin(np.asarray(row.candidates), np.asarray(row.associations))


def cue_prompt(cue: str) -> str:
    """DataComp's prompt for a cue: "An …" before a vowel, else "A …", the cue lower-cased."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"


def jaccard_of_top_k(similarity: np.ndarray, truth: np.ndarray) -> float:
    """The k candidates most similar to the cue (k = the true associations) against the truth: |P ∩ T| / |P ∪ T|."""
    predicted = np.zeros(len(truth), dtype=bool)
    predicted[np.argsort(similarity)[len(truth) - int(truth.sum()):]] = True
    return float(jaccard_score(truth, predicted))


@torch.no_grad()
def winogavil_metrics(model, tokenizer, dataset: WinoGAViL, device: torch.device) -> dict[str, float]:
    scores, sizes = [], []
    for images, prompt, truth in dataset:
        image_features = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer([prompt]).to(device)).float(), dim=-1)
        scores.append(jaccard_of_top_k((text_features @ image_features.T)[0].cpu().numpy(), truth))
        sizes.append(len(truth))
    scores, sizes = np.array(scores), np.array(sizes)
    metrics = {"avg_jaccard_score": float(scores.mean())}
    for name, members in (("jaccard_score_5-6", sizes <= 6), ("jaccard_score_10-12", sizes >= 10)):
        if members.any():
            metrics[name] = float(scores[members].mean())
    return metrics
