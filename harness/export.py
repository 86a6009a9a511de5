"""Hand a student and a built-in dataset to other tools: open_clip's ``local-dir:`` and clip_benchmark's wds; and a
built-in training split as webdataset shards, with synthetic captions beside each real one."""
from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import torch
from PIL import Image

from core.builtin import load_builtin, retrieval_gallery
from harness.models.build import create_clip
from harness.models.build import model_name as registered_name
from harness.models.names import ModelLoadError


def export_open_clip_dir(model_name: str, checkpoint: Path, out: Path) -> Path:
    """A folder that ``open_clip.create_model('local-dir:OUT')`` (and so ``clip_benchmark eval``) loads, with the
    preprocessing the weights were trained on (a clipkd run's: its student's, from a tag with the tag's)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if isinstance(saved, dict) and "structure" in saved:
        raise ModelLoadError(f"{checkpoint}: a pruned model (automatic inheritance) has blocks of their own widths, "
                             "which no open_clip model config describes: load its final.pt with clipkd (clipkd "
                             "eval, a `run:` teacher, a later stage), which rebuilds its shape")
    student = saved.get("config", {}).get("student", {}) if isinstance(saved, dict) else {}
    trained_on = (student["model"], student.get("pretrained")) if student.get("model") == model_name else None
    bundle = create_clip(model_name, str(checkpoint), input_of=trained_on)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(registered_name(model_name)),
              "preprocess_cfg": open_clip.get_model_preprocess_cfg(bundle.model)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(bundle.model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def export_clip_benchmark_wds(dataset: str, out: Path, shards: int = 1, limit: int | None = None) -> tuple[Path, Path]:
    """The test split (its first ``limit`` images) as two clip_benchmark wds datasets: OUT/classification and
    OUT/retrieval (PNG, lossless), each in ``shards`` shards of consecutive samples."""
    import webdataset as wds

    split = load_builtin(dataset, "test")
    split = split.first(limit) if limit else split
    folders = {task: out / task for task in ("classification", "retrieval")}
    for task, folder in folders.items():
        images = split if task == "classification" else retrieval_gallery(split)
        (folder / "test").mkdir(parents=True, exist_ok=True)
        (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
        count = len(images.images)
        for shard in range(shards):
            with wds.TarWriter(str(folder / "test" / f"{shard}.tar")) as sink:
                for i in range(count * shard // shards, count * (shard + 1) // shards):
                    sample = {"__key__": f"s{i:06d}", "png": _png(images.images[i])}
                    sample.update({"cls": int(images.labels[i])} if task == "classification"
                                  else {"txt": images.captions[i]})
                    sink.write(sample)
    (folders["classification"] / "classnames.txt").write_text("\n".join(split.classnames) + "\n")
    (folders["classification"] / "zeroshot_classification_templates.txt").write_text("\n".join(split.templates) + "\n")
    (folders["retrieval"] / "dataset_type.txt").write_text("retrieval\n")
    return folders["classification"], folders["retrieval"]


# A built-in caption is "a {first}, {second}, {third} {class}" (core/builtin.py). Its paraphrases say the same words
# otherwise, as a captioner's synthetic captions describe the image again: the demo's stand-in for a CoCa's, whose
# weights cannot be downloaded here (a CoCa of random weights writes noise).
PARAPHRASES = ("a photo of a {0} {3}, {1} and {2}", "{1} and {2}: one {0} {3}", "the {3}, {0}, {2}, {1}")


def paraphrases(caption: str, count: int) -> list[str]:
    """The first ``count`` paraphrases of a built-in caption."""
    first, second, rest = caption.removeprefix("a ").split(", ", 2)
    third, name = rest.split(" ", 1)
    return [template.format(first, second, third, name) for template in PARAPHRASES[:count]]


def export_training_shards(dataset: str, out: Path, shards: int, subset: int | None = None,
                           synthetic: int = 0) -> str:
    """The training split (its first ``subset`` samples, the order runs read) as ``shards`` webdataset shards
    of PNG images and captions, each sample with ``synthetic`` paraphrases of its caption in a DataCompDR
    ``syn.json`` (data/captions.py); returns the shards' brace pattern."""
    import webdataset as wds

    if not 0 <= synthetic <= len(PARAPHRASES):
        raise ValueError(f"--synthetic {synthetic}: a built-in caption has {len(PARAPHRASES)} paraphrases; give 0 to "
                         f"{len(PARAPHRASES)}")
    split = load_builtin(dataset, "train")
    split = split.first(subset) if subset else split
    out.mkdir(parents=True, exist_ok=True)
    count = len(split.images)
    for shard in range(shards):
        with wds.TarWriter(str(out / f"{dataset}-{shard:04d}.tar")) as sink:
            for i in range(count * shard // shards, count * (shard + 1) // shards):
                sample = {"__key__": f"s{i:06d}", "png": _png(split.images[i]), "txt": split.captions[i]}
                if synthetic:
                    sample["syn.json"] = json.dumps({"syn_text": paraphrases(split.captions[i], synthetic)}).encode()
                sink.write(sample)
    return str(out / f"{dataset}-{{0000..{shards - 1:04d}}}.tar")
