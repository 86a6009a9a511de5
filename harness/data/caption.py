"""``clipkd data caption``: synthetic captions for a shard set from an open_clip CoCa, as MobileCLIP's dataset
reinforcement writes them (Vasu et al. 2024: five captions per image from ``coca_ViT-L-14``, nucleus sampling at
p = 0.9; DataCompDR's ``syn.json``).

Each input shard becomes one output shard of the same name: every sample's members as they were, and its
``syn.json`` with the new captions (beside synthetic captions it had, under the next free ``syn_text_<n>`` key). The
output is self-contained, so a run reads it as any shard set (data/captions.py) and the input stays untouched. An
output shard is written under a temporary name and renamed when whole, so an interrupted command, run again, skips
the finished shards and redoes only the one it was writing.

Decoding is this module's own nucleus-sampling loop over the CoCa's next-token logits (its public forward),
deliberately not ``CoCa.generate``: that needs transformers' logits processors, which open_clip imports from a
transformers API that newer releases removed (``BeamSearchScorer``), and clipkd does not depend on transformers.
Each shard's draws come from a generator seeded by (seed, shard), so a shard captioned again gets the same captions.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from core.errors import ClipkdError
from harness.data.captions import SYNTHETIC_MEMBER, SYNTHETIC_PREFIX
from harness.data.files import expand_shards
from harness.data.shards import IMAGE_EXTENSIONS


class CaptionerError(ClipkdError, RuntimeError):
    """A captioner that cannot be loaded, or shards that cannot be captioned; the message says which and why."""


@dataclass(frozen=True)
class Sampling:
    """How captions are drawn: ``captions`` per image, nucleus ``top_p`` at ``temperature``, at most
    ``max_tokens`` tokens (start and end included) and at least ``min_tokens`` before the end token may come."""

    captions: int = 5
    top_p: float = 0.9
    temperature: float = 1.0
    max_tokens: int = 30
    min_tokens: int = 5
    seed: int = 0


def load_captioner(model: str, pretrained: str | None, device: torch.device):
    """The CoCa model (eval mode), its evaluation transform and tokenizer; anything else is one message."""
    import open_clip

    from harness.models.build import create_clip

    coca = [name for name in open_clip.list_models() if "coca" in name.lower()]
    try:
        bundle = create_clip(model, pretrained, device)
    except Exception as error:  # an unknown name, a missing file, weights of another model: said once
        weights = f" --pretrained {pretrained!r}" if pretrained else ""
        raise CaptionerError(f"captioner --model {model!r}{weights} cannot be loaded "
                             f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}); "
                             f"open_clip's CoCa models: {', '.join(coca)}") from None
    if not hasattr(bundle.model, "text_decoder"):
        raise CaptionerError(f"captioner --model {model!r} is a {type(bundle.model).__name__}, which has no caption "
                             f"decoder; use a CoCa model: {', '.join(coca)}")
    if not all(hasattr(bundle.tokenizer, name) for name in ("sot_token_id", "eot_token_id", "decode")):
        raise CaptionerError(f"captioner --model {model!r}: its tokenizer {type(bundle.tokenizer).__name__} cannot "
                             "decode token ids here; use a CoCa with open_clip's CLIP tokenizer (coca_ViT-B-32, "
                             "coca_ViT-L-14)")
    projection = bundle.model.text_decoder.text_projection
    if pretrained is None:  # random weights (a test's): open_clip builds the decoder's output projection with
        # torch.empty and never initialises it (its init_parameters is not called, and fails), so the logits would
        # be whatever that memory held; drawn here as init_parameters would, std width^-1/2
        with torch.no_grad():
            projection.normal_(std=projection.shape[0] ** -0.5)
    bundle.model.eval()
    return bundle


def nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of most likely tokens whose probability reaches ``top_p``."""
    probabilities, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    kept = probabilities.cumsum(dim=-1) - probabilities < top_p  # the most likely token always stays
    choice = torch.multinomial(probabilities * kept, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample_captions(model, tokenizer, images: torch.Tensor, sampling: Sampling,
                    generator: torch.Generator) -> list[str]:
    """One caption per image, drawn token by token from the CoCa's decoder."""
    start, end = tokenizer.sot_token_id, tokenizer.eot_token_id
    window = model.text.context_length  # the decoder reads at most this many tokens (a CLS position is added)
    encoded = model(images)
    latent, embeddings = encoded["image_features"], encoded["image_embs"]
    tokens = torch.full((len(images), 1), start, dtype=torch.long, device=images.device)
    finished = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for length in range(1, sampling.max_tokens):
        logits = model(images, tokens[:, -window:], image_latent=latent, image_embs=embeddings,
                       output_labels=False)["logits"][:, -1].float() / sampling.temperature
        if length < sampling.min_tokens:
            logits[:, end] = -torch.inf
        drawn = nucleus(logits, sampling.top_p, generator)
        if length == sampling.max_tokens - 1:  # the last position ends every caption still open
            drawn = torch.full_like(drawn, end)
        drawn = torch.where(finished, 0, drawn)  # open_clip's padding after the end
        tokens = torch.cat([tokens, drawn[:, None]], dim=1)
        finished |= drawn == end
        if finished.all():
            break
    return [" ".join(tokenizer.decode(row[:row.index(end)]).split()) for row in tokens[:, 1:].tolist()]


def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A shard's samples in order: key and members by extension (webdataset's grouping by key)."""
    key, members = None, {}
    with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
            split = base_plus_ext(member.name) if member.isfile() else None
            if split is None:
                continue
            if split[0] != key:
                if key is not None:
                    yield key, members
                key, members = split[0], {}
            members[split[1]] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _with_captions(members: dict[str, bytes], captions: list[str]) -> dict[str, bytes]:
    """The members with ``captions`` added to the ``syn.json`` (a new one, or its next free ``syn_text`` key)."""
    existing = json.loads(members[SYNTHETIC_MEMBER]) if SYNTHETIC_MEMBER in members else {}
    key, n = SYNTHETIC_PREFIX, 1
    while key in existing:
        key, n = f"{SYNTHETIC_PREFIX}_{n}", n + 1
    return {**members, SYNTHETIC_MEMBER: json.dumps({**existing, key: captions}).encode()}


@dataclass
class CaptionReport:
    shards: int
    skipped: int  # finished before this command ran
    samples: int  # captioned by this command
    without_image: int  # samples copied without captions: no image that decodes


def caption_shards(pattern: str, out: Path, model: str, pretrained: str | None, sampling: Sampling,
                   batch_size: int = 32, device: str = "cpu", progress: bool | None = None) -> CaptionReport:
    """Caption every shard of ``pattern`` not captioned yet into ``out`` (one output shard each)."""
    import webdataset as wds

    try:
        shards = expand_shards(pattern)
    except ValueError as error:
        raise CaptionerError(str(error).replace("data.path", "shards")) from None
    names = [shard.name for shard in shards]
    if len(set(names)) < len(names):
        raise CaptionerError(f"shards {pattern!r}: two shards share a file name, and an output shard takes its "
                             "input's name; caption them into separate folders")
    out.mkdir(parents=True, exist_ok=True)
    todo = [(number, shard) for number, shard in enumerate(shards) if not (out / shard.name).is_file()]
    for _, shard in todo:  # what an interrupted command was writing: begun again
        for stale in out.glob(f".{shard.name}.*.partial"):
            stale.unlink()
    print(f"clipkd: {len(shards) - len(todo)} of {len(shards)} shards already captioned in {out}; captioning "
          f"{len(todo)}", file=sys.stderr)
    report = CaptionReport(len(shards), len(shards) - len(todo), 0, 0)
    if not todo:
        return report
    device = torch.device(device)
    bundle = load_captioner(model, pretrained, device)
    shown = sys.stderr.isatty() if progress is None else progress  # else a line per shard (a job's log)
    bar = tqdm(total=len(todo), unit="shard", disable=not shown)
    for done, (number, shard) in enumerate(todo, start=1):
        before = report.samples + report.without_image
        generator = torch.Generator(device).manual_seed(sampling.seed * 1_000_003 + number)
        partial = out / f".{shard.name}.{os.getpid()}.partial"
        with wds.TarWriter(str(partial)) as sink:
            for batch in _batches(_samples(shard), batch_size):
                captioned = _caption_batch(batch, bundle, sampling, generator, device)
                report.samples += sum(1 for captions in captioned if captions)
                report.without_image += sum(1 for captions in captioned if not captions)
                for (key, members), captions in zip(batch, captioned):
                    sink.write({"__key__": key, **(_with_captions(members, captions) if captions else members)})
        os.replace(partial, out / shard.name)
        bar.update(1)
        bar.set_postfix(samples=report.samples)
        if not shown:
            print(f"clipkd: captioned {shard.name} ({report.samples + report.without_image - before:,} samples), "
                  f"{done} of {len(todo)}", file=sys.stderr)
    bar.close()
    return report


def _batches(samples, size: int):
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _caption_batch(batch, bundle, sampling: Sampling, generator, device) -> list[list[str]]:
    """``sampling.captions`` captions for each sample with an image that decodes; [] for the others."""
    images, slots = [], []
    for slot, (_, members) in enumerate(batch):
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        try:
            images.append(bundle.preprocess_eval(Image.open(io.BytesIO(image)).convert("RGB")))
            slots.append(slot)
        except (OSError, ValueError, SyntaxError, EOFError, TypeError, AttributeError):
            continue
    captions = [[] for _ in batch]
    if images:
        stacked = torch.stack(images).to(device)
        drawn = [sample_captions(bundle.model, bundle.tokenizer, stacked, sampling, generator)
                 for _ in range(sampling.captions)]
        for i, slot in enumerate(slots):
            captions[slot] = [texts[i] for texts in drawn]
    return captions
