"""Several captions per sample, and which one a step reads (``data.captions``).

A shard's sample may carry, beside its ``txt``, synthetic captions as DataCompDR's ``syn.json`` does
(``{"syn_text": [...]}``; every key matching ``syn_text*``, in key order): the sample's captions are then its
``txt`` first and the synthetic ones after it, in the file's order (``clipkd data caption`` writes them). A run
reads the first (``first``: today's single caption), or one drawn uniformly per (seed, epoch, sample)
(``sample``), as a replayed view is drawn (data/views.py): a pure function of the sample, so every rank, loader
worker and resumed run draws the same, and a teacher-embedding cache that stores the teacher's embedding of every
caption (teachers/cache_build.py) hands the step the embedding of the caption it drew.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from harness.data.views import mix

SYNTHETIC_MEMBER = "syn.json"  # DataCompDR's member name (apple/ml-mobileclip)
SYNTHETIC_PREFIX = "syn_text"
CAPTION_STREAM = 0xCA97  # keeps the caption draw independent of the view draw, which hashes (seed, epoch, sample)


def synthetic_captions(member: bytes | None) -> list[str]:
    """The synthetic captions of a sample's ``syn.json`` bytes (none without one); each caption that is not text,
    or is empty, is left out."""
    if member is None:
        return []
    try:
        fields = json.loads(member.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    found = []
    for key in sorted(k for k in fields if k.startswith(SYNTHETIC_PREFIX)) if isinstance(fields, dict) else []:
        texts = fields[key] if isinstance(fields[key], list) else [fields[key]]
        found += [text for text in texts if isinstance(text, str) and text.strip()]
    return found


@dataclass(frozen=True)
class CaptionChoice:
    """Which caption of each sample a batch reads: ``first``, ``sample`` (drawn per run seed, epoch and sample), or
    ``all`` (a cache builder's: every caption is embedded)."""

    kind: Literal["first", "sample", "all"] = "first"
    seed: int = 0

    def choose(self, epoch: int, samples: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """Each sample's caption index this epoch (of its ``counts`` captions); None where the first is read."""
        if self.kind != "sample":
            return None
        draws = mix(self.seed, epoch, samples, CAPTION_STREAM)
        return (draws % np.asarray(counts, dtype=np.uint64)).astype(np.int64)
