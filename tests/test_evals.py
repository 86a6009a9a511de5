"""Evaluation: equal to clip_benchmark's own CLI, feature similarity by hand, failures reported and stored."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_clipkd

from evals.similarity import linear_cka, pair_similarity_gap


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The smoke baseline, trained and stored once for this module."""
    project = tmp_path_factory.mktemp("evals")
    shutil.copytree(ROOT / "configs", project / "configs")
    run_clipkd("run", "configs/smoke.yaml", cwd=project)
    (run_dir,) = (project / "runs").iterdir()
    return run_dir


# Both tools run on one thread with the same batches, so every matmul and sum runs the same kernel in the same
# order on both sides: equal embeddings, equal logits, and no near-tie that could fall the other way on one side.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_metrics_equal_clip_benchmarks_own_command_line(trained_run, tmp_path):
    """On the built-in set and on its clip_benchmark wds export (in 3 shards, read as a stream), as a user runs
    them: `clipkd eval` gives `clip_benchmark eval`'s numbers, in one process and under torchrun on 3 ranks."""
    ours = json.loads(run_clipkd("eval", str(trained_run), "--dataset", "digits", cwd=tmp_path, env=ONE_THREAD).stdout)
    run_clipkd("export", str(trained_run), str(tmp_path / "model"), cwd=tmp_path)
    run_clipkd("export-dataset", "digits", str(tmp_path / "wds"), "--shards", "3", cwd=tmp_path)
    streamed, on_3_ranks = {}, {}
    for root in ("classification", "retrieval"):
        args = ["eval", str(trained_run), "--dataset", "wds/digits", "--root", str(tmp_path / "wds" / root)]
        streamed.update(json.loads(run_clipkd(*args, "--workers", "2", cwd=tmp_path, env=ONE_THREAD).stdout)["metrics"])
        launched = subprocess.run(  # every rank its share of the stream (3 shards: one each), rank 0 prints
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "-m",
             "harness.cli", *args, "--workers", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD})
        assert launched.returncode == 0, launched.stderr[-4000:]
        on_3_ranks.update(json.loads(launched.stdout)["metrics"])
    theirs = {}
    for task, root in (("zeroshot_classification", "classification"), ("zeroshot_retrieval", "retrieval")):
        output = tmp_path / f"{task}.json"
        subprocess.run(
            [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{tmp_path / 'model'}",
             "--pretrained", "local", "--dataset", "wds/digits", "--dataset_root", str(tmp_path / "wds" / root),
             "--task", task, "--no_amp", "--batch_size", "256", "--num_workers", "0", "--recall_k", "1", "5", "10",
             "--output", str(output), "--quiet"],
            check=True, capture_output=True, cwd=tmp_path, env={**os.environ, **ONE_THREAD},
        )
        theirs.update(json.loads(output.read_text())["metrics"])
    for metric in ["acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "text_retrieval_recall@1",
                   "image_retrieval_recall@5", "text_retrieval_recall@10"]:
        assert ours["metrics"][metric] == theirs[metric] == streamed[metric] == on_3_ranks[metric], metric
    assert ours["benchmark"] == "digits"


def test_run_then_leaderboard_shows_top1_and_both_recalls(trained_run):
    project = trained_run.parents[1]
    header, row = run_clipkd("leaderboard", "--format", "csv", cwd=project).stdout.splitlines()[:2]
    columns = dict(zip(header.split(","), row.split(",")))
    assert columns["method"] == "baseline" and columns["benchmark"] == "digits"
    for metric in ("top1", "i2t_r1", "t2i_r1"):
        assert 0 <= float(columns[metric]) <= 100
    # run again: the finished run is neither retrained nor re-evaluated
    db = project / "results" / "clipkd.db"
    before = sqlite3.connect(db).execute("select updated_at from runs").fetchall()
    run_clipkd("run", "configs/smoke.yaml", cwd=project)
    assert sqlite3.connect(db).execute("select updated_at from runs").fetchall() == before


def test_linear_cka_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and isotropic scale
    y = torch.randn(50, 5, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    hsic = lambda a, b: float(torch.trace(a @ a.T @ b @ b.T))  # noqa: E731  (the kernel form of CKA)
    assert linear_cka(x, y) == pytest.approx(hsic(xc, yc) / (hsic(xc, xc) * hsic(yc, yc)) ** 0.5)


def test_pair_similarity_gap_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    cos = [[1 / 2**0.5, 0.0], [1 / 2**0.5, 1.0]]
    expected = (cos[0][0] + cos[1][1]) / 2 - (cos[0][1] + cos[1][0]) / 2
    assert pair_similarity_gap(images, texts) == pytest.approx(expected)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "imagenet-2077", "--root", "."], "unknown dataset 'imagenet-2077'; accepted: digits"),
        (["--dataset", "imagenet1k", "--root", "/nonexistent/imagenet"],
         "dataset root '/nonexistent/imagenet' for 'imagenet1k' does not exist"),
        (["--dataset", "imagenet1k"], "needs --root"),
        (["--dataset", "imagefolder", "--root", "/nonexistent"], "needs --root, an existing folder"),
    ],
)
def test_eval_dataset_errors_are_one_clear_message(trained_run, tmp_path, clipkd, args, message):
    result = clipkd("eval", str(trained_run), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_eval_checkpoint_errors_are_one_clear_message(trained_run, tmp_path, clipkd):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    cases = [
        ([str(corrupt)], "is not a readable checkpoint"),
        ([str(corrupt), "--model", "clipkd-tiny"], "is not a readable checkpoint"),
        ([str(trained_run / "checkpoints" / "final.pt"), "--model", "clipkd-tiny-teacher"], "another architecture"),
        ([str(tmp_path / "missing.pt")], "does not exist"),
    ]
    for args, message in cases:
        result = clipkd("eval", *args, "--dataset", "digits", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_newer_store_is_one_clear_message(trained_run, tmp_path):
    db = tmp_path / "store.db"
    shutil.copy(trained_run.parents[1] / "results" / "clipkd.db", db)
    with sqlite3.connect(db) as connection:
        connection.execute("pragma journal_mode = delete")
        connection.execute("update clipkd_schema set value = '99'")
    result = run_clipkd("leaderboard", "--db", f"sqlite:///{db}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "schema version 99, newer than this clipkd's" in result.stderr, result.stderr


def test_failed_evaluation_is_stored_as_failed_with_its_reason(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    config = (tmp_path / "configs" / "smoke.yaml").read_text().replace("steps: 60", "steps: 2")
    config += "eval: {benchmarks: [{dataset: digits}, {dataset: imagenet1k, root: /nonexistent/imagenet}]}\n"
    (tmp_path / "bad_eval.yaml").write_text(config)
    result = run_clipkd("run", "bad_eval.yaml", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "/nonexistent/imagenet" in result.stderr and "Traceback" not in result.stderr
    connection = sqlite3.connect(tmp_path / "results" / "clipkd.db")
    status, error = connection.execute("select status, error from runs").fetchone()
    assert status == "failed" and "evaluation" in error and "/nonexistent/imagenet" in error
    assert connection.execute("select count(*) from metrics").fetchone()[0] == 0  # digits' metrics not half-written


def test_feature_cosine_goes_through_the_learned_projection():
    """cos(P s_i, t_i) averaged over the pairs, against numpy on the two models' own embeddings."""
    import numpy as np

    from evals.datasets import load_eval_set
    from evals.similarity import feature_similarity
    from evals.zeroshot import zero_shot_metrics
    from harness.models.build import create_clip

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    student, teacher = create_clip("clipkd-tiny"), create_clip("clipkd-tiny-teacher")
    projection = torch.nn.Linear(student.embed_dim, teacher.embed_dim)  # 64 -> 96, as a method's P
    eval_set = load_eval_set("digits", None, student.preprocess_eval)
    embedded = zero_shot_metrics(student.model, student.tokenizer, eval_set, cpu).embedded
    metrics = feature_similarity(embedded, teacher, projection, eval_set, cpu)

    pairs = [eval_set.retrieval[i] for i in range(len(eval_set.retrieval))]
    with torch.no_grad():
        images = torch.stack([image for image, _ in pairs])
        tokens = student.tokenizer([captions[0] for _, captions in pairs])
        s_img, s_txt = student.model.encode_image(images).double().numpy(), student.model.encode_text(tokens).double().numpy()
        t_img, t_txt = teacher.model.encode_image(images).double().numpy(), teacher.model.encode_text(tokens).double().numpy()
    weight, bias = projection.weight.detach().double().numpy(), projection.bias.detach().double().numpy()

    def mean_cosine(student_rows, teacher_rows):
        projected = student_rows @ weight.T + bias
        return np.mean(np.sum(projected * teacher_rows, 1)
                       / (np.linalg.norm(projected, axis=1) * np.linalg.norm(teacher_rows, axis=1)))

    # float32 embeddings from other batch sizes on the two sides: agreement to ~1e-6 of a cosine
    assert metrics["feature_cosine_image"] == pytest.approx(mean_cosine(s_img, t_img), abs=1e-4)
    assert metrics["feature_cosine_text"] == pytest.approx(mean_cosine(s_txt, t_txt), abs=1e-4)
    other = feature_similarity(embedded, teacher, torch.nn.Linear(student.embed_dim, teacher.embed_dim), eval_set, cpu)
    assert abs(other["feature_cosine_image"] - metrics["feature_cosine_image"]) > 1e-3  # the given P is the one used
    without = feature_similarity(embedded, teacher, None, eval_set, cpu)  # 64 vs 96 dims and no P: no cosine
    assert "feature_cosine_image" not in without and without["feature_cka_image"] == metrics["feature_cka_image"]


def test_an_image_folder_with_loader_workers_gives_clip_benchmarks_numbers(trained_run, tmp_path):
    """`clipkd eval` on a class-folder tree: 2 loader workers give exactly what 0 give, and both equal
    `clip_benchmark eval` on the same images (written, in ImageFolder's order, as its wds layout)."""
    import webdataset as wds
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from core.builtin import DIGIT_NAMES, load_builtin
    from evals.datasets import _imagenet_templates

    test = load_builtin("digits", "test")
    folder = tmp_path / "folder"
    for i in range(240):
        path = folder / DIGIT_NAMES[test.labels[i]] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i]).convert("RGB").save(path)
    ours = [json.loads(run_clipkd("eval", str(trained_run), "--dataset", "imagefolder", "--root", str(folder),
                                  "--workers", str(workers), "--batch-size", "64", cwd=tmp_path, env=ONE_THREAD).stdout)
            for workers in (0, 2)]
    assert ours[0] == ours[1] and ours[0]["benchmark"] == "imagefolder:folder"

    images = ImageFolder(folder)
    shards = tmp_path / "wds"
    (shards / "test").mkdir(parents=True)
    (shards / "test" / "nshards.txt").write_text("1\n")
    (shards / "classnames.txt").write_text("\n".join(images.classes) + "\n")
    (shards / "zeroshot_classification_templates.txt").write_text("\n".join(_imagenet_templates()) + "\n")
    with wds.TarWriter(str(shards / "test" / "0.tar")) as sink:
        for i, (path, label) in enumerate(images.samples):
            sink.write({"__key__": f"s{i:06d}", "png": Path(path).read_bytes(), "cls": label})
    run_clipkd("export", str(trained_run), str(tmp_path / "model"), cwd=tmp_path)
    output = tmp_path / "theirs.json"
    subprocess.run(
        [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{tmp_path / 'model'}",
         "--pretrained", "local", "--dataset", "wds/folder", "--dataset_root", str(shards), "--task",
         "zeroshot_classification", "--no_amp", "--batch_size", "64", "--num_workers", "2", "--output", str(output),
         "--quiet"], check=True, capture_output=True, cwd=tmp_path, env={**os.environ, **ONE_THREAD})
    theirs = json.loads(output.read_text())["metrics"]
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[0]["metrics"][metric] == theirs[metric], metric


def test_each_item_level_metric_is_the_mean_of_its_stored_bits(trained_run):
    """Stored per-item results reproduce every top-k and recall@k number exactly: intervals need no re-run."""
    import numpy as np

    from results.store import Store

    store = Store(f"sqlite:///{trained_run.parents[1] / 'results' / 'clipkd.db'}", readonly=True)
    run_id = trained_run.name
    metrics = store.metrics(run_id)["digits"]
    checked = 0
    for metric in ("acc1", "acc5", "image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5"):
        bits = store.items([run_id], "digits", metric)[run_id]
        # clip_benchmark divides hits by items in float64 for accuracy, averages float32 hits for recall
        mean = bits.mean() if metric.startswith("acc") else float(np.float32(bits.sum()) / np.float32(len(bits)))
        assert mean == metrics[metric], metric
        checked += 1
    assert len(store.items([run_id], "digits", "acc1")[run_id]) == 361  # the digits test split
    run = store.get_run(run_id)
    assert (run["gflops_image"], run["gflops_text"]) == (pytest.approx(CLIPKD_TINY_IMAGE_FLOPS / 1e9, rel=1e-12),
                                                         pytest.approx(CLIPKD_TINY_TEXT_FLOPS / 1e9, rel=1e-12))
    assert run["images_per_second"] > 0
    assert run["device_hours"] == pytest.approx(run["train_seconds"] / 3600) and run["world_size"] == 1
    assert checked == 5
    table = run_clipkd("leaderboard", "--db", f"sqlite:///{trained_run.parents[1] / 'results' / 'clipkd.db'}",
                       "--format", "csv", cwd=trained_run.parents[1]).stdout
    header, row = table.splitlines()[:2]
    columns = dict(zip(header.split(","), row.split(",")))
    assert float(columns["gflops_image"]) == pytest.approx(CLIPKD_TINY_IMAGE_FLOPS / 1e9, abs=5e-5)  # as printed
    assert float(columns["params_m"]) == pytest.approx(run["student_params"] / 1e6, abs=5e-3)
    assert float(columns["images_per_s"]) > 0 and "device_hours" in columns


def _transformer_flops(tokens: int, width: int, layers: int) -> int:
    """Per layer: the q, k, v and output projections (4·N·d² multiply-adds), the MLP (N·d·4d twice), the scores
    and their weighted sum (2·N²·d); 2 FLOPs a multiply-add."""
    return layers * 2 * (4 * tokens * width**2 + 8 * tokens * width**2 + 2 * tokens**2 * width)


# clipkd-tiny (harness/models/configs): 32 px images in 8 px patches (16 and a class token), width 64, 2 layers,
# embed 64; 16 text tokens, width 64, 2 layers. The image's patch embedding is a 3·8·8 → 64 product per patch;
# each tower ends in a 64 → 64 projection of one token.
CLIPKD_TINY_IMAGE_FLOPS = 2 * 16 * 3 * 8 * 8 * 64 + _transformer_flops(17, 64, 2) + 2 * 64 * 64
CLIPKD_TINY_TEXT_FLOPS = _transformer_flops(16, 64, 2) + 2 * 64 * 64


def test_a_public_model_is_recorded_as_a_reference_and_shown_apart(tmp_path):
    """`clipkd eval --model NAME --pretrained FILE --record`, offline: a reference row (no teacher, no method, its
    weights named) that the leaderboard lists apart from the runs trained here."""
    from harness.models.build import create_clip
    from results.queries import list_runs
    from results.store import Store

    weights = tmp_path / "tiny.pt"
    torch.manual_seed(3)
    torch.save({"state_dict": create_clip("clipkd-tiny").model.state_dict()}, weights)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    args = ["eval", "--model", "clipkd-tiny", "--pretrained", str(weights), "--dataset", "digits", "--workers", "0",
            "--record", "--db", db]
    assert "recorded reference model clipkd-tiny@tiny.pt" in run_clipkd(*args, cwd=tmp_path).stdout
    run_clipkd(*args, cwd=tmp_path)  # again: the same row
    store = Store(db, readonly=True)
    (run_id,) = list_runs(store)[0]["id"]
    row = store.get_run(run_id)
    assert (row["method"], row["teacher"], row["dataset"]) == ("reference", None, "pretrained:tiny.pt")
    assert row["gflops_image"] > 0 and row["images_per_second"] > 0 and row["student_params"] > 0
    assert len(store.items([run_id], "digits", "acc1")[run_id]) == 361
    table = run_clipkd("leaderboard", "--db", db, cwd=tmp_path).stdout
    assert "reference models (evaluated here, not trained here):" in table and "pretrained:tiny.pt" in table
    result = run_clipkd("eval", "--dataset", "digits", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "or --model NAME with --pretrained TAG|FILE" in result.stderr


def _two_class_wds(folder: Path) -> Path:
    """The digits 0 and 1 of the test split as a clip_benchmark wds classification set in one shard."""
    import io

    import webdataset as wds
    from PIL import Image

    from core.builtin import DIGIT_NAMES, load_builtin

    test = load_builtin("digits", "test")
    (folder / "test").mkdir(parents=True)
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text(f"{DIGIT_NAMES[0]}\n{DIGIT_NAMES[1]}\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of the digit {c}.\n{c}\n")
    with wds.TarWriter(str(folder / "test" / "0.tar")) as sink:
        for i in [i for i in range(len(test.labels)) if test.labels[i] < 2]:
            png = io.BytesIO()
            Image.fromarray(test.images[i]).convert("RGB").save(png, format="PNG")
            sink.write({"__key__": f"s{i:06d}", "png": png.getvalue(), "cls": int(test.labels[i])})
    return folder


def _evaluate_sets(weights: str, roots: dict[str, str], workers: int) -> dict:
    """Every set's metrics and per-item bits, in this process's group (if any)."""
    from evals.datasets import load_eval_set
    from evals.zeroshot import zero_shot_metrics
    from harness.models.build import create_clip

    bundle = create_clip("clipkd-tiny", weights)
    found = {}
    for name, root in roots.items():
        eval_set = load_eval_set("wds/digits", root, bundle.preprocess_eval)
        result = zero_shot_metrics(bundle.model, bundle.tokenizer, eval_set, torch.device("cpu"), 64, workers=workers)
        found[name] = (result.metrics, {k: v.tolist() for k, v in result.items.items()})
    return found


def _evaluating_rank(rank: int, world: int, meeting: dict, weights: str, roots: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(meeting, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from core.distributed import init_distributed

    init_distributed(timeout_s=120)
    found = _evaluate_sets(weights, roots, workers=rank % 2)  # ranks with and without loader workers
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


def test_three_ranks_evaluate_streamed_sets_and_a_two_class_set_as_one_process(trained_run, tmp_path):
    """3 gloo processes evaluate a wds classification and a retrieval set in 4 shards each (split by shards) and a
    2-class set in one (split by items; fewer classes than ranks: a rank embeds no prompt): the numbers and
    per-item bits of one process, which are clip_benchmark's own (its library, on its own datasets of the sets).
    Before, the first two raised on the stream's missing length and the third crashed one rank, hanging the rest."""
    import torch.multiprocessing as mp
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from conftest import rendezvous

    from harness.models.build import create_clip

    run_clipkd("export-dataset", "digits", str(tmp_path / "wds"), "--shards", "4", cwd=tmp_path)
    roots = {"classification": str(tmp_path / "wds" / "classification"), "retrieval": str(tmp_path / "wds" / "retrieval"),
             "two classes": str(_two_class_wds(tmp_path / "two"))}
    weights = str(trained_run / "checkpoints" / "final.pt")
    torch.set_num_threads(1)
    alone = json.loads(json.dumps(_evaluate_sets(weights, roots, workers=0)))
    with rendezvous() as meeting:
        mp.spawn(_evaluating_rank, args=(3, meeting, weights, roots, str(tmp_path / "ranks.json")), nprocs=3, join=True)
    assert json.loads((tmp_path / "ranks.json").read_text()) == alone

    bundle = create_clip("clipkd-tiny", weights)  # clip_benchmark's evaluate() on its own dataset of each set
    model = bundle.model.eval()
    for name in ("classification", "two classes"):
        theirs_set = build_dataset("wds/digits", root=roots[name], transform=bundle.preprocess_eval, split="test")
        theirs = zeroshot_classification.evaluate(model, torch.utils.data.DataLoader(theirs_set, batch_size=64),
                                                  bundle.tokenizer, theirs_set.classes, theirs_set.templates, "cpu",
                                                  amp=False)
        for metric in ("acc1", "acc5", "mean_per_class_recall") if name == "classification" else ("acc1",
                                                                                                   "mean_per_class_recall"):
            assert alone[name][0][metric] == pytest.approx(theirs[metric], abs=1e-12), (name, metric)
    pairs = build_dataset("wds/digits", root=roots["retrieval"], transform=bundle.preprocess_eval, split="test",
                          task="zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(model, torch.utils.data.DataLoader(pairs, batch_size=64,
                                                                            collate_fn=image_captions_collate_fn),
                                         bundle.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for metric, value in theirs.items():
        assert alone["retrieval"][0][metric] == pytest.approx(value, abs=1e-12), metric
