"""The commands of one run and its artefacts: train, run, eval, export, export-dataset, cache info, methods,
selectors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_methods(args: argparse.Namespace) -> int:
    import methods

    return _listed(methods.descriptions())


def cmd_selectors(args: argparse.Namespace) -> int:
    from selection.registry import available

    return _listed(available())


def _listed(described: dict[str, str]) -> int:
    width = max(map(len, described))
    for name, description in described.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from harness.config.run_config import load_config
    from harness.run import tracked
    from harness.training.loop import train

    config = load_config(args.config)
    with tracked(config) as observe:  # train.report_to, as `clipkd run` reports while it trains
        run_dir = train(config, resume=args.resume, observe=observe)
    print(f"run {run_dir.name} finished: {run_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config.run_config import load_config
    from harness.run import run
    from results.store import Store

    config = load_config(args.config)
    store = Store(args.db)
    status = run(config, store)
    print(f"run {config.run_id} {status}: {config.run_dir} (store: {store.url})")
    return 0


def _checkpoint_model(checkpoint: Path, model: str | None) -> str:
    from harness.training import checkpoint as checkpoints

    if model:
        return model
    try:
        saved = checkpoints.load(checkpoint)
    except Exception as error:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not name its model (not a clipkd checkpoint): pass --model")
    return saved["model"]


def cmd_eval(args: argparse.Namespace) -> int:
    """One benchmark or a suite; under torchrun every rank embeds its share and rank 0 prints (and records)."""
    from core.distributed import init_distributed
    from evals.datasets import load_eval_set
    from evals.zeroshot import zero_shot_metrics
    from harness.data.loaders import workers
    from harness.models.build import create_clip
    from harness.models.names import FINAL_CHECKPOINT

    if args.checkpoint:
        path = Path(args.checkpoint)
        checkpoint = path / FINAL_CHECKPOINT if path.is_dir() else path
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist")
        model, pretrained = _checkpoint_model(checkpoint, args.model), str(checkpoint)
    elif args.model and args.pretrained:
        model, pretrained = args.model, args.pretrained
    else:
        raise ValueError("give a run directory or checkpoint file, or --model NAME with --pretrained TAG|FILE "
                         "(an open_clip tag or a weights file)")
    if (args.suite is None) == (args.dataset is None):
        raise ValueError("give --dataset (one benchmark) or --suite (a named suite of them)")
    staged = _staged_suite(args) if args.suite is not None else None  # before the model: a missing task is seconds
    bundle = create_clip(model, pretrained)
    env = init_distributed()
    device = env.device
    if staged is not None:
        return _eval_suite(args, *staged, bundle, env)
    eval_set = load_eval_set(args.dataset, args.root, bundle.preprocess_eval, args.task)
    result = zero_shot_metrics(bundle.model.to(device), bundle.tokenizer, eval_set, device, args.batch_size,
                               workers=workers(args.workers))
    if not env.is_main:
        return 0
    print(json.dumps({"benchmark": eval_set.benchmark, "metrics": result.metrics}, indent=2))
    if args.record:
        from evals.cost import gflops_per_sample, images_per_second
        from harness.run import parameter_count, reference_record
        from results.store import Store

        store = Store(args.db)
        row = reference_record(model, pretrained)
        gflops_image, gflops_text = gflops_per_sample(bundle.model, bundle.tokenizer, device)
        store.put_run({**row, "student_params": parameter_count(bundle), "gflops_image": gflops_image,
                       "gflops_text": gflops_text, "images_per_second": images_per_second(bundle.model, device,
                                                                                          args.batch_size)},
                      metrics={eval_set.benchmark: result.metrics}, items={eval_set.benchmark: result.items})
        print(f"recorded reference model {row['name']} ({row['id']}) in {store.url}")
    return 0


def _staged_suite(args: argparse.Namespace):
    """A named suite and its tasks' benchmarks, every task's data checked (all missing ones named at once)."""
    from pydantic import ValidationError

    from harness.config.specs import SuiteSpec
    from harness.grids import checks

    if args.record:
        raise ValueError("--record stores one benchmark's numbers; give --dataset, or leave --record out")
    try:
        suite, specs = SuiteSpec(name=args.suite, root=args.root).expand()
    except ValidationError as error:
        raise ValueError(f"--suite: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    missing = [problem for spec in specs.values() if (problem := checks.benchmark(spec))]
    if missing:
        raise ValueError(f"suite {suite.name!r}: {len(missing)} of {len(specs)} tasks are not staged under "
                         f"{args.root!r}:\n  " + "\n  ".join(missing))
    return suite, specs


def _eval_suite(args: argparse.Namespace, suite, specs, bundle, env) -> int:
    """Every task of a named suite, then its averages, printed as JSON ({benchmark: metrics}) by rank 0."""
    from evals.datasets import benchmark_name, load_eval_set
    from evals.suites import averages, suite_benchmark
    from evals.zeroshot import zero_shot_metrics
    from harness.data.loaders import workers

    device, metrics = env.device, {}
    for spec in specs.values():
        eval_set = load_eval_set(spec.dataset, spec.root, bundle.preprocess_eval, spec.task)
        metrics[eval_set.benchmark] = zero_shot_metrics(bundle.model.to(device), bundle.tokenizer, eval_set, device,
                                                        args.batch_size, workers=workers(args.workers)).metrics
    benchmark_of = {task: benchmark_name(spec.dataset, spec.root) for task, spec in specs.items()}
    metrics[suite_benchmark(suite.name)] = averages(suite, benchmark_of, metrics)
    if env.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.export import export_open_clip_dir
    from harness.models.names import FINAL_CHECKPOINT

    path = Path(args.checkpoint)
    checkpoint = path / FINAL_CHECKPOINT if path.is_dir() else path
    out = export_open_clip_dir(_checkpoint_model(checkpoint, args.model), checkpoint, Path(args.out))
    print(f"open_clip model written to {out}: load it as 'local-dir:{out}'")
    return 0


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from harness.export import export_clip_benchmark_wds, export_training_shards

    if args.split == "train":
        pattern = export_training_shards(args.dataset, Path(args.out), args.shards, args.subset, args.synthetic)
        print(f"training shards: data: {{dataset: webdataset, path: \"{pattern}\"}}")
        return 0

    classification, retrieval = export_clip_benchmark_wds(args.dataset, Path(args.out), args.shards)
    print(f"clip_benchmark datasets: --dataset wds/{args.dataset} --dataset_root {classification} "
          f"(classification), --dataset_root {retrieval} (retrieval)")
    return 0


def cmd_data_caption(args: argparse.Namespace) -> int:
    from harness.data.caption import Sampling, caption_shards

    sampling = Sampling(args.captions, args.top_p, args.temperature, args.max_tokens, seed=args.seed)
    report = caption_shards(args.shards, Path(args.out), args.model, args.pretrained, sampling, args.batch_size,
                            args.device)
    done = f"{report.samples:,} samples captioned now ({sampling.captions} captions each)" if report.samples else "none now"
    print(f"{report.shards} shards in {args.out}: {report.skipped} captioned before, {done}"
          + (f", {report.without_image:,} without a decodable image copied as they were" if report.without_image else ""))
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from harness.config.run_config import load_config
    from harness.teachers import cache_key, cached

    path = Path(args.cache)
    if path.suffix in (".yaml", ".yml"):  # an ensemble's run reads one cache per cached teacher
        config = load_config(path)
        folders = [cache_key.cache_dir(config.with_teacher(t)) for t in config.teachers if t.embeddings == "cached"]
    else:
        folders = [path]
    for folder in folders or [path]:
        if not (folder / cache_key.META).is_file():
            raise ValueError(f"{folder} is not a finished teacher-embedding cache (no {cache_key.META}); give a "
                             "cache folder (<output_dir>/.teacher-embeddings/<key>) or the YAML config of a run that "
                             "reads one")
        facts = cached.info(folder)
        if args.json:
            print(json.dumps(facts, indent=2))
            continue
        print(f"cache      {facts['folder']}\nteacher    {facts['teacher']}\ndataset    {facts['dataset']}\n"
              f"samples    {facts['samples']:,}\nviews      {facts['views']} (0: the un-augmented view)\n"
              f"captions   {facts['captions']} of each sample\n"
              f"embedding  {facts['embed_dim']} dims, {facts['storage']}\n"
              f"size       {facts['bytes_per_sample']:,.0f} bytes per sample, {facts['bytes'] / 2**20:,.1f} MiB in all")
    return 0
