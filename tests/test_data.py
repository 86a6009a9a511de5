"""Built-in datasets, captions from pixels, the CSV and webdataset formats, and MFD's masked forward."""
import io
import json

import numpy as np
import pytest
import torch
from conftest import require, run_clipkd
from PIL import Image
from test_train import write_config

from harness.builtin_data import FASHION_MNIST_DIR, DatasetUnavailableError, load_builtin
from harness.masking import masked_image_features, patch_grid
from harness.models import create_clip


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
    import harness.builtin_data as builtin

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


def test_webdataset_shards_train(tmp_path):
    import webdataset as wds

    data = load_builtin("digits", "train")
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:02d}.tar")) as sink:
            for i in range(shard * 48, shard * 48 + 48):
                sink.write({"__key__": f"{i:05d}", "png": _digit_png(i, data), "txt": data.captions[i]})
    config = write_config(
        tmp_path, "wds",
        data={"dataset": "webdataset", "path": str(tmp_path / "shard-{00..01}.tar"), "num_samples": 96},
        train={"batch_size": 32, "epochs": 2, "steps": None, "checkpoint_every": 2},
    )
    run_clipkd("train", str(config), cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # 96 samples / 32 per batch x 2 epochs


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
