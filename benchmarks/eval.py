"""clipkd's zero-shot evaluation against clip_benchmark's on the same model and data: the same numbers, and the
speed ratio (target ≥ 1.0×, i.e. at least as fast).

    python benchmarks/eval.py [--dataset fashion-mnist|digits] [--model clipkd-tiny] [--checkpoint FILE] [--batch 256]

Two comparisons, both with classification (the whole test split) and retrieval (the 1,000-image gallery):
- in one process, the evaluation work only: ``evals.zeroshot.zero_shot_metrics`` against clip_benchmark's
  ``zeroshot_classification.evaluate`` + ``zeroshot_retrieval.evaluate`` on the same model and loaders;
- on the command line, what a user runs: ``clipkd eval`` against ``clip_benchmark eval`` once per task (it takes
  one task per call), on the model exported as open_clip ``local-dir:`` and the data as clip_benchmark wds.
Then two benchmarks sharing classes and prompts (as ImageNet and ImageNet-V2 do): the class-prompt classifier
is built once for both. Last, the evaluation sharded over ranks, as a run's ranks share it after training: its
time at 2 ranks (gloo) ÷ its time at 1, each rank one thread, as each GPU is one device (target ≈ 1/W, the CPU's
stand-in for issue 20's GPU target), and whether the numbers stay the same.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from data_throughput import free_port
from torch.utils.data import DataLoader

from evals.datasets import load_eval_set, retrieval_collate
from evals.similarity import embed_pairs
from evals.zeroshot import RECALL_K, Classifiers, zero_shot_metrics
from harness.models.build import create_clip

COMPARED = ["acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "text_retrieval_recall@1"]


def timed(call, repeats: int = 1):
    """The call's result and its median wall time over ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return result, statistics.median(seconds)


def run_timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    return timed(lambda: subprocess.run(command, check=True, capture_output=True, text=True))


def clip_benchmark_in_process(bundle, eval_set, batch: int) -> dict:
    cpu = "cpu"
    classification = zeroshot_classification.evaluate(
        bundle.model, DataLoader(eval_set.classification, batch_size=batch), bundle.tokenizer,
        eval_set.classification.classes, eval_set.classification.templates, cpu, amp=False)
    retrieval = zeroshot_retrieval.evaluate(
        bundle.model, DataLoader(eval_set.retrieval, batch_size=batch, collate_fn=retrieval_collate), bundle.tokenizer,
        cpu, amp=False, recall_k_list=list(RECALL_K))
    return {**classification, **retrieval}


def command_lines(args, checkpoint: Path, folder: Path) -> tuple[dict, float, dict, float]:
    clipkd = [sys.executable, "-m", "harness.cli"]
    subprocess.run([*clipkd, "export", str(checkpoint), str(folder / "model"), "--model", args.model], check=True,
                   capture_output=True)
    subprocess.run([*clipkd, "export-dataset", args.dataset, str(folder / "wds")], check=True, capture_output=True)
    ours, our_seconds = run_timed([*clipkd, "eval", str(checkpoint), "--model", args.model, "--dataset", args.dataset,
                                   "--batch-size", str(args.batch)])
    theirs, their_seconds = {}, 0.0
    for task, root in (("zeroshot_classification", "classification"), ("zeroshot_retrieval", "retrieval")):
        output = folder / f"{task}.json"
        _, seconds = run_timed(
            [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{folder / 'model'}",
             "--pretrained", "local", "--dataset", f"wds/{args.dataset}", "--dataset_root", str(folder / "wds" / root),
             "--task", task, "--no_amp", "--batch_size", str(args.batch), "--num_workers", "0", "--recall_k",
             *map(str, RECALL_K), "--output", str(output), "--quiet"])
        their_seconds += seconds
        theirs.update(json.loads(output.read_text())["metrics"])
    return json.loads(ours.stdout)["metrics"], our_seconds, theirs, their_seconds


def _sharded_rank(rank: int, world: int, port: int, args, checkpoint: str, output: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    bundle = create_clip(args.model, checkpoint)
    eval_set = load_eval_set(args.dataset, None, bundle.preprocess_eval)
    cpu = torch.device("cpu")

    def evaluate():
        if world > 1:
            dist.barrier()  # every repeat starts together: the time is the slowest rank's, as a run waits for it
        return zero_shot_metrics(bundle.model, bundle.tokenizer, eval_set, cpu, args.batch).metrics

    metrics, seconds = timed(evaluate, args.repeats)
    if rank == 0:
        Path(output).write_text(json.dumps({"metrics": metrics, "seconds": seconds}))


def sharded(args, checkpoint: Path, folder: Path, world: int) -> tuple[dict, float]:
    """The evaluation's metrics and median seconds with ``world`` ranks of one thread each."""
    output = folder / f"sharded-{world}.json"
    mp.spawn(_sharded_rank, args=(world, free_port(), args, str(checkpoint), str(output)), nprocs=world)
    result = json.loads(output.read_text())
    return result["metrics"], result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir()
                        else "digits")
    parser.add_argument("--model", default="clipkd-tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--checkpoint", help="a trained run's checkpoint (default: --model at random init)")
    parser.add_argument("--repeats", type=int, default=3, help="in-process timings are the median of this many")
    parser.add_argument("--skip-command-line", action="store_true",
                        help="leave out the command lines (tests/test_evals.py compares their numbers)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = create_clip(args.model, args.checkpoint)
    bundle.model.eval()
    eval_set = load_eval_set(args.dataset, None, bundle.preprocess_eval)
    cpu = torch.device("cpu")
    ours, our_seconds = timed(lambda: zero_shot_metrics(bundle.model, bundle.tokenizer, eval_set, cpu,
                                                        args.batch).metrics, args.repeats)
    theirs, their_seconds = timed(lambda: clip_benchmark_in_process(bundle, eval_set, args.batch), args.repeats)
    # a distilled run's evaluation also needs the student's retrieval embeddings for feature similarity:
    # clip_benchmark's functions do not return theirs, so that pass would embed the gallery again
    _, again_seconds = timed(lambda: embed_pairs(bundle.model, bundle.tokenizer, DataLoader(
        eval_set.retrieval, batch_size=args.batch, collate_fn=retrieval_collate), cpu), args.repeats)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "model.pt"  # what the command lines load: the weights evaluated above
        torch.save({"state_dict": bundle.model.state_dict()}, checkpoint)
        command_line = None if args.skip_command_line else command_lines(args, checkpoint, Path(scratch))
        one_rank, one_rank_seconds = sharded(args, checkpoint, Path(scratch), 1)
        two_ranks, two_ranks_seconds = sharded(args, checkpoint, Path(scratch), 2)
    classifiers = Classifiers()
    _, first = timed(lambda: zero_shot_metrics(bundle.model, bundle.tokenizer, eval_set, cpu, args.batch, classifiers))
    _, second = timed(lambda: zero_shot_metrics(bundle.model, bundle.tokenizer, eval_set, cpu, args.batch, classifiers))

    print(f"{args.model} ({args.checkpoint or 'random init'}) on {args.dataset}: "
          f"{len(eval_set.classification)} images classified, "
          f"{len(eval_set.retrieval)} in the retrieval gallery; batch {args.batch}, fp32, CPU, "
          f"{torch.get_num_threads()} threads")
    compared = {"in-process": (ours, theirs)}
    if command_line:
        compared["command line"] = (command_line[0], command_line[2])
    for where, (a, b) in compared.items():
        same = all(a[m] == b[m] for m in COMPARED)
        print(f"{where:13s} numbers {'identical' if same else 'DIFFER'}: " + ", ".join(f"{m} {a[m]:.4f}" for m in COMPARED))
    print(f"in-process    clipkd {our_seconds:6.2f} s, clip_benchmark {their_seconds:6.2f} s: "
          f"{their_seconds / our_seconds:.2f}x its speed (median of {args.repeats})")
    print(f"with the similarity pass's student embeddings: clipkd {our_seconds:6.2f} s (reused), clip_benchmark "
          f"{their_seconds + again_seconds:6.2f} s: {(their_seconds + again_seconds) / our_seconds:.2f}x its speed")
    if command_line:
        _, cli_our_seconds, _, cli_their_seconds = command_line
        print(f"command line  clipkd {cli_our_seconds:6.2f} s, clip_benchmark {cli_their_seconds:6.2f} s (2 calls): "
              f"{cli_their_seconds / cli_our_seconds:.2f}x its speed")
    print(f"a second benchmark with the same classes and prompts: {second:.2f} s after {first:.2f} s "
          f"(classifiers built: {len(classifiers.built)})")
    same = all(one_rank[m] == two_ranks[m] for m in COMPARED)
    print(f"sharded       1 rank {one_rank_seconds:6.2f} s, 2 ranks {two_ranks_seconds:6.2f} s (1 thread each): "
          f"{two_ranks_seconds / one_rank_seconds:.2f}x one rank's time (target ~0.50); numbers "
          f"{'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
