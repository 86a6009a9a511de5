"""Built-in datasets, captions from pixels, the CSV and webdataset formats, and MFD's masked forward."""
import io
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, require, run_clipkd, write_shards
from PIL import Image
from test_train import write_config

from core.builtin import FASHION_MNIST_DIR, DatasetUnavailableError, load_builtin
from harness.models.build import create_clip
from harness.training.masking import masked_image_features, patch_grid


def test_digits_splits_are_deterministic_disjoint_and_cover_the_data():
    splits = {name: load_builtin("digits", name) for name in ("train", "val", "test")}
    again = load_builtin("digits", "test")
    assert np.array_equal(splits["test"].images, again.images) and splits["test"].captions == again.captions
    assert sum(len(s.labels) for s in splits.values()) == 1797
    keys = [{s.images[i].tobytes() + bytes([s.labels[i]]) for i in range(len(s.labels))} for s in splits.values()]
    assert not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_digit_captions_come_from_the_pixels():
    data = load_builtin("digits", "train")
    assert all(c.endswith(data.classnames[y]) for c, y in zip(data.captions, data.labels))
    words = {w.strip(",") for c in data.captions for w in c.split()}
    assert {"thin", "bold", "left-leaning", "right-leaning", "small", "large"} <= words
    # each attribute splits the data roughly into thirds, so captions vary within a class
    sevens = [c for c, y in zip(data.captions, data.labels) if y == 7]
    assert len(set(sevens)) >= 5 and len(set(data.captions)) >= 60
    # a measured attribute, checked against the pixels: "bold" digits have more intense strokes than "thin" ones
    ink = lambda word: np.mean([data.images[i][data.images[i] > 64].mean()  # noqa: E731
                                for i, c in enumerate(data.captions) if f" {word}," in c])
    assert ink("bold") > ink("thin")
    assert data.templates and all("{c}" in t for t in data.templates)


def test_fashion_mnist_from_debian_package():
    require(FASHION_MNIST_DIR.is_dir(),
            "Debian's dataset-fashion-mnist is not installed (scripts/install_debian.sh fashion-mnist)")
    test = load_builtin("fashion-mnist", "test")
    assert test.images.shape == (10000, 28, 28) and len(set(test.captions)) > 100
    assert len(load_builtin("fashion-mnist", "train").labels) == 55000
    assert any("ankle boot" in c for c in test.captions)


def test_fashion_mnist_absent_names_the_package(monkeypatch, tmp_path):
    import core.builtin as builtin

    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    builtin._fashion_mnist.cache_clear()
    try:
        with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
            load_builtin("fashion-mnist", "test")
    finally:
        builtin._fashion_mnist.cache_clear()


def _digit_png(index, data) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.images[index]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_csv_format_trains(tmp_path):
    data = load_builtin("digits", "train")
    rows = ["filepath\ttitle"]
    for i in range(96):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_digit_png(i, data))
        rows.append(f"{path}\t{data.captions[i]}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path, "csv", data={"dataset": "csv", "path": str(tmp_path / "train.tsv")},
                          train={"batch_size": 32, "steps": 4, "checkpoint_every": 2})
    run_clipkd("train", str(config), cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 4


def test_webdataset_shards_train_with_one_loader_for_every_epoch(tmp_path, monkeypatch):
    """Two epochs of shards with two loader workers: the workers start once for the run (one loader, iterated
    once) and read on into the second epoch, instead of starting again, and waiting, at each epoch's start."""
    import yaml

    from harness.config.run_config import parse_config
    from harness.data import loaders
    from harness.training.loop import train

    started = []

    class CountedLoader(loaders.DataLoader):
        def __iter__(self):
            started.append(self.num_workers)
            return super().__iter__()

    monkeypatch.setattr(loaders, "DataLoader", CountedLoader)
    shards = write_shards(tmp_path, [48, 48])
    # its own output_dir: under the checkout's runs/ a second session's same tmp path made it a finished run
    config = write_config(tmp_path, "wds", output_dir=str(tmp_path / "runs"),
                          data={"dataset": "webdataset", "path": shards, "num_samples": 96, "workers": 2},
                          train={"batch_size": 32, "epochs": 2, "steps": None, "checkpoint_every": 2})
    run_dir = train(parse_config(yaml.safe_load(config.read_text())))
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # 96 samples / 32 per batch x 2 epochs
    assert started == [2]


def _shard_epochs(rank: int, shards: str, index_root: str, runs: list[tuple[int, int]], out: str) -> None:
    """Rank ``rank`` of 2, for each (loader workers, first step) of ``runs``: the sample ids of each step from that
    step of the run to the end of its epoch 1 (10 steps an epoch), and the images it decoded (one process for all:
    a process's start is most of the time)."""
    from harness.config.specs import DataSpec
    from harness.data.loaders import build_source, build_train_data
    from harness.data.views import Augmentation, ViewSpec
    from harness.models.build import create_clip

    torch.set_num_threads(1)
    epochs = []
    for workers, start_step in runs:
        spec = DataSpec(dataset="webdataset", path=shards, num_samples=160, workers=workers, shuffle_window=24)
        source = build_source(spec, ViewSpec.of("clipkd-tiny"), create_clip("clipkd-tiny").tokenizer, Augmentation("random", 5),
                              Path(index_root))
        data = build_train_data(spec, source, batch_size=16, seed=5, rank=rank, world_size=2)
        epochs.append([(batch.samples.tolist(), batch.decoded) for batch in data.batches(start_step, 20)])
    Path(out).write_text(json.dumps(epochs))


def _epochs_of_two_ranks(tmp_path: Path, shards: str, runs: list[tuple[int, int]]) -> list[list[list]]:
    """Per run of ``runs``, each rank's steps."""
    context = mp.get_context("spawn")
    outputs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    ranks = [context.Process(target=_shard_epochs, args=(rank, shards, str(tmp_path), runs, str(out)))
             for rank, out in enumerate(outputs)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
        assert process.exitcode == 0
    per_rank = [json.loads(out.read_text()) for out in outputs]
    return [[epochs[i] for epochs in per_rank] for i in range(len(runs))]


def test_a_webdataset_epoch_decodes_every_sample_once_across_ranks_and_workers(tmp_path):
    """Two processes (ranks of a world of 2), two loader workers each, on uneven shards: every sample of the epoch
    is read once and decoded once; a resumed epoch is the tail of the uninterrupted one, decoding nothing before
    it; the loader workers never change which sample a step takes, nor does one loader that runs on from the
    middle of the epoch before (its workers alive across the boundary, 15 steps for 2 of them)."""
    shards = write_shards(tmp_path / "shards", [50, 30, 70, 20])  # 170 samples; the epoch takes 160
    across, resumed, without_workers = _epochs_of_two_ranks(tmp_path, shards, [(2, 5), (2, 14), (0, 10)])
    ranks = [steps[5:] for steps in across]  # epoch 1, from the loader that ran on into it
    assert [len(steps) for steps in ranks] == [10, 10]  # 160 samples / global batch 16 = 10 steps per rank
    seen = [sample for steps in ranks for ids, _ in steps for sample in ids]
    assert len(seen) == len(set(seen)) == 160
    assert sum(decoded for steps in ranks for _, decoded in steps) == 160  # decoded ÷ epoch = 1.00
    shard_of = {sample >> 32 for sample in seen}
    assert shard_of == {0, 1, 2, 3}
    assert [steps[4:] for steps in ranks] == resumed  # the same samples, and only those decoded
    assert without_workers == ranks  # workers split shards, not the order; across the boundary, still in order
    assert all(steps[:5] != epoch[5:] for steps, epoch in zip(across, ranks))  # epoch 0's steps 5-9: its own order


def test_a_webdataset_asking_for_more_samples_than_it_has_is_one_message(tmp_path):
    shards = write_shards(tmp_path, [20, 20])
    config = write_config(tmp_path, "big", data={"dataset": "webdataset", "path": shards, "num_samples": 100},
                          train={"batch_size": 8, "steps": 2})
    result = run_clipkd("train", str(config), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "data.num_samples 100 exceeds the 40 samples" in result.stderr
    assert "Traceback" not in result.stderr


def test_crop_boxes_follow_torchvisions_random_resized_crop_and_replay_exactly():
    from torchvision.transforms import RandomResizedCrop

    from harness.data.views import crop_boxes, mix

    keys = mix(7, np.arange(20_000))
    boxes = crop_boxes(keys, 60, 80)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 80).all()
    np.testing.assert_array_equal(boxes, crop_boxes(keys, 60, 80))  # a function of the key alone
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.zeros(3, 60, 80), [0.9, 1.0], [3 / 4, 4 / 3])
                          for _ in range(20_000)])
    from scipy.stats import ks_2samp

    def features(b):  # each coordinate, and the joint of height and width as area and aspect ratio
        return {"top": b[:, 0], "left": b[:, 1], "height": b[:, 2], "width": b[:, 3], "area": b[:, 2] * b[:, 3],
                "aspect": b[:, 3] / b[:, 2]}

    for name, ours in features(boxes).items():  # the same distribution: two-sample Kolmogorov-Smirnov
        assert ks_2samp(ours, features(reference)[name]).pvalue > 1e-3, name


VIEWS_OF_PHOTOS = """
import sys
import numpy as np, torch
from PIL import Image
from sklearn.datasets import load_sample_images
from harness.data.views import ViewSpec, crop_boxes, mix

spec, images, boxes = ViewSpec(224, (0.5,) * 3, (0.25,) * 3), [], []
for photo in load_sample_images().images:  # two 427 x 640 photographs, and as draft-scale decodes leave them
    for short in (427, 256, 230):
        image = Image.fromarray(photo).resize((round(640 * short / 427), short), Image.BICUBIC)
        images += [torch.from_numpy(np.array(image)).permute(2, 0, 1)] * 20
        boxes += crop_boxes(mix(len(boxes), np.arange(20)), short, image.width, spec.scale).tolist()
torch.save({"images": images, "boxes": boxes, "views": [spec.cut(i, b) for i, b in zip(images, boxes)],
            "capability": torch.backends.cpu.get_cpu_capability()}, sys.argv[1])
"""


def test_a_view_is_open_clips_bicubic_crop_to_a_level_or_two_and_the_same_bits_on_every_cpu_path(tmp_path):
    """Files' views are resampled by torch's uint8 bicubic (views.py says why, not PIL's as open_clip does): on
    photographs, open_clip's transform (torchvision's resized_crop of a PIL image) to within two levels of 255 in
    under 1 % of the values, and the same bits from this CPU's vectorised kernel as from the scalar one
    (ATEN_CPU_CAPABILITY=default)."""
    import os
    import subprocess
    import sys

    import torchvision.transforms.functional as TF

    runs = []
    for capability in (os.environ.get("ATEN_CPU_CAPABILITY"), "default"):
        out = tmp_path / f"views-{capability}.pt"
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        subprocess.run([sys.executable, "-c", VIEWS_OF_PHOTOS, str(out)], check=True,
                       env=env | ({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
        runs.append(torch.load(out))
    this_cpu, scalar = runs
    assert scalar["capability"] == "DEFAULT"
    assert all(torch.equal(fast, slow) for fast, slow in zip(this_cpu["views"], scalar["views"]))
    differing = 0
    for image, box, view in zip(this_cpu["images"], this_cpu["boxes"], this_cpu["views"]):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        reference = TF.pil_to_tensor(TF.resized_crop(pil, *box, [224, 224], interpolation=TF.InterpolationMode.BICUBIC))
        gap = (view.int() - reference.int()).abs()
        assert gap.max() <= 2
        differing += int((gap > 0).sum())
    assert differing < 0.01 * sum(view.numel() for view in this_cpu["views"])


def test_normalising_pixels_where_they_are_used_is_torchvisions_to_tensor_and_normalize_to_the_bit():
    """batch.normalize (uint8 pixels made floats on the training device) against open_clip's transform tail,
    torchvision's to_tensor then normalize of the same pixels, for OpenAI's statistics and SigLIP's 0.5."""
    import torchvision.transforms.functional as TF

    from harness.data.batch import normalize

    pixels = torch.randint(0, 256, (4, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mean, std in (((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        theirs = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(p.permute(1, 2, 0).numpy())), mean, std)
                              for p in pixels])
        assert torch.equal(normalize(pixels, mean, std), theirs)


def test_a_jpeg_decoded_at_draft_scale_gives_open_clips_view_of_the_full_decode_to_resampling(tmp_path):
    """A 1280 x 854 JPEG for a 224 px student is decoded at half size by the decoder (PIL's draft, a DCT scaling)
    and its view cut there; open_clip decodes it whole and resamples the same crop. The gap is resampling's: the
    DCT scaling and PIL's own box reduce (Image.reduce, what PIL's resize does with reducing_gap) decimate by the
    same factor, so by the triangle through the full-resolution resample the draft path is at most twice PIL's
    reduce path away from it, plus the gap of torch's bicubic kernel to PIL's on the same pixels. A crop one pixel
    off misses that bound several times over (measured: 3.9 and 7.7 levels on average against 0.4 and 0.6)."""
    import torchvision.transforms.functional as TF
    from sklearn.datasets import load_sample_images

    from harness.data.bad import open_image
    from harness.data.views import ViewSpec

    spec = ViewSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for photo in load_sample_images().images:
        jpeg = tmp_path / "photo.jpg"
        Image.fromarray(photo).resize((1280, 854), Image.BICUBIC).save(jpeg, quality=90)
        drafted = open_image(jpeg, spec)  # uint8 (C, H, W), as a loader worker decodes it
        full = Image.open(jpeg).convert("RGB")
        factor = full.height // drafted.shape[1]
        assert factor == 2 and drafted.shape[1:] == (427, 640)
        box = (21, 64, 384, 384)  # in the drafted image; open_clip's is the same crop of the whole one
        ours = spec.cut(drafted, box).int()
        whole = TF.pil_to_tensor(TF.resized_crop(full, *(v * factor for v in box), [224, 224],
                                                 interpolation=TF.InterpolationMode.BICUBIC)).int()
        reduced = TF.pil_to_tensor(TF.resized_crop(full.reduce(factor), *box, [224, 224],
                                                   interpolation=TF.InterpolationMode.BICUBIC)).int()
        kernel = TF.pil_to_tensor(TF.resized_crop(Image.fromarray(drafted.permute(1, 2, 0).numpy()), *box, [224, 224],
                                                  interpolation=TF.InterpolationMode.BICUBIC)).int()
        gap, pil_gap, kernel_gap = ((a - b).abs().float() for a, b in ((ours, whole), (reduced, whole), (ours, kernel)))
        assert gap.mean() <= 2 * pil_gap.mean() + kernel_gap.mean()
        assert gap.quantile(0.99) <= 2 * pil_gap.quantile(0.99) + kernel_gap.max()
        off = (spec.cut(drafted, (box[0] + 1, *box[1:])).int() - whole).abs().float()
        assert off.mean() > 3 * (2 * pil_gap.mean() + kernel_gap.mean())  # the bound can see a wrong crop


@pytest.mark.parametrize("model_name", ["clipkd-tiny", "timm-resnet18"])
def test_mfd_masked_embedding_differs_from_unmasked(model_name):
    torch.manual_seed(0)
    model = create_clip(model_name).model.eval()
    size = model.visual.image_size if hasattr(model.visual, "image_size") else 224
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(2, 3, size, size)
    rows, cols = patch_grid(model.visual, size)
    noise = torch.rand(2, rows * cols)
    with torch.no_grad():
        full = model.encode_image(images)
        masked = masked_image_features(model, images, noise, mask_ratio=0.75)
        masked_again = masked_image_features(model, images, noise, mask_ratio=0.75)
        other_mask = masked_image_features(model, images, torch.rand(2, rows * cols), mask_ratio=0.75)
    assert masked.shape == full.shape
    assert not torch.allclose(masked, full, atol=1e-4)
    torch.testing.assert_close(masked, masked_again)  # the mask is the noise's, not a hidden RNG's
    assert not torch.allclose(masked, other_mask, atol=1e-4)
    with torch.no_grad():  # the masked forward leaves the model's own forward as it was
        torch.testing.assert_close(model.encode_image(images), full)


@pytest.mark.parametrize("mask_ratio, kept", [(0.75, 4), (0.5, 8), (0.25, 12)])
def test_mfd_keeps_the_asked_share_of_patches(mask_ratio, kept):
    """The transformer sees the class token and round(N·(1 − ratio)) of the N = 16 patch tokens; a timm tower
    sees that many of its pixel patches unzeroed."""
    torch.manual_seed(0)
    vit = create_clip("clipkd-tiny").model.eval()
    seen = []
    hook = vit.visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    rows, cols = patch_grid(vit.visual, 32)
    assert rows * cols == 16
    with torch.no_grad():
        masked_image_features(vit, torch.randn(3, 3, 32, 32), torch.rand(3, rows * cols), mask_ratio)
        vit.encode_image(torch.randn(3, 3, 32, 32))
    hook.remove()
    assert seen == [1 + kept, 1 + 16]

    cnn = create_clip("timm-resnet18").model.eval()
    inputs = []
    hook = cnn.visual.trunk.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    rows, cols = patch_grid(cnn.visual, 224)
    with torch.no_grad():
        masked_image_features(cnn, torch.randn(2, 3, 224, 224), torch.rand(2, rows * cols), mask_ratio)
    hook.remove()
    patches = inputs[0].unflatten(2, (rows, -1)).unflatten(4, (cols, -1))  # (B, C, rows, h, cols, w)
    unzeroed = patches.abs().amax(dim=(1, 3, 5)) > 0
    assert unzeroed.sum(dim=(1, 2)).tolist() == [round(rows * cols * (1 - mask_ratio))] * 2


def test_the_masked_pass_leaves_batchnorms_running_statistics_alone():
    """MFD's masked image is mostly blank: a BatchNorm tower trains on it (batch statistics, gradients) but its
    running statistics stay those of the real images. Before, every step's masked pass moved them toward blank
    images' statistics and counted one more batch."""
    torch.manual_seed(0)
    cnn = create_clip(str(ROOT / "tests" / "fixtures" / "bn-student.json")).model.train()
    before = {name: buffer.clone() for name, buffer in cnn.named_buffers()}
    rows, cols = patch_grid(cnn.visual, 32)
    embedded = masked_image_features(cnn, torch.randn(4, 3, 32, 32), torch.rand(4, rows * cols), 0.75)
    embedded.sum().backward()  # it still trains: gradients reach the tower
    assert all(torch.equal(buffer, before[name]) for name, buffer in cnn.named_buffers())
    assert cnn.visual.trunk.conv1[0].weight.grad.abs().sum() > 0
    cnn.encode_image(torch.randn(4, 3, 32, 32))  # a real pass still counts
    assert not torch.equal(cnn.visual.trunk.bn1.running_mean, before["visual.trunk.bn1.running_mean"])


@pytest.mark.parametrize("environment, expected", [
    ({"SLURM_CPUS_PER_TASK": "12", "SLURM_NTASKS_PER_NODE": "8", "LOCAL_WORLD_SIZE": "8"}, 11),  # submitit: a task a GPU
    ({"SLURM_CPUS_PER_TASK": "96", "SLURM_NTASKS_PER_NODE": "1", "LOCAL_WORLD_SIZE": "8"}, 11),  # srun torchrun
    ({"SLURM_CPUS_PER_TASK": "96", "SLURM_NTASKS_PER_NODE": "1(x2)", "LOCAL_WORLD_SIZE": "8"}, 11),  # two nodes
    ({"SLURM_CPUS_PER_TASK": "4"}, 3),
])
def test_loader_workers_share_a_tasks_cpus_among_its_processes(monkeypatch, environment, expected):
    from harness.data.loaders import default_workers

    for name in ("SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert default_workers() == expected
