"""What each model of a run is fed of a sample: its own view of the shared crop box, its own tokens of the caption.

The student and every teacher see the same crop box (``views.Augmentation``) of one decoded image, each resampled
at its own side with its own interpolation and normalised with its own mean and std (``views.ViewSpec``), and the
same caption through its own tokenizer at its own context length (``TextSpec``). A source renders the student's
input and ``OtherInputs``: every distinct image and text input of the run's other models, each once, so models
that preprocess alike share one tensor and a run whose teachers preprocess like its student renders what it
rendered before inputs were per model.

Images are decoded once, at the scale the run's largest model needs (``OtherInputs.decode_size``, cached teachers
included; JPEG draft decoding: ``ViewSpec.draft``). A box is drawn in the decoded image's pixels, and a cache's
builder decodes for its own teacher: where that teacher is the run's largest model (or no JPEG is large enough to
be decoded at a reduced scale) the run's boxes are the builder's exactly; where a larger model makes the run decode
a JPEG at a finer scale, a box is the builder's to within a pixel of the coarser decoding.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.data.views import ViewSpec
from harness.models.names import text_input


@dataclass(frozen=True)
class TextSpec:
    """What turns a caption into a model's tokens: its tokenizer (None: open_clip's CLIP BPE) at its context
    length, and any tokenizer options its config sets (``names.text_input``)."""

    context_length: int
    tokenizer: str | None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, model: str) -> TextSpec:
        found = dict(text_input(model))
        context_length, tokenizer = found.pop("context_length"), found.pop("tokenizer")
        return cls(context_length, tokenizer, tuple(sorted((k, repr(v)) for k, v in found.items())))

    def describe(self) -> dict[str, Any]:
        """As a cache key names it (the two keys of caches made before tokenizers were per model, then options)."""
        return {"context_length": self.context_length, "tokenizer": self.tokenizer, **dict(self.options)}


@dataclass(frozen=True)
class ModelInput:
    """A model's image view and text input."""

    view: ViewSpec
    text: TextSpec

    @classmethod
    def of(cls, model: str, pretrained: str | None = None) -> ModelInput:
        return cls(ViewSpec.of(model, pretrained), TextSpec.of(model))


@dataclass(frozen=True)
class OtherInputs:
    """The inputs of a run's other models that are not the student's (each distinct one once, with the tokenizer
    that makes each text input), and the side images are decoded for when a model sees more pixels than the
    student does."""

    views: tuple[ViewSpec, ...] = ()
    texts: tuple[tuple[TextSpec, Callable], ...] = ()
    decode_size: int | None = None

    @classmethod
    def beside(cls, primary: ModelInput, others: list[tuple[ModelInput, Callable]], sizes: list[int] = ()):
        """The inputs of ``others`` (with their tokenizers) unlike ``primary``, deduplicated in order; images
        decoded for the largest of every view's side and ``sizes`` (those of cached teachers: read, not cut)."""
        views, texts = [], {}
        for model_input, tokenizer in others:
            if model_input.view != primary.view and model_input.view not in views:
                views.append(model_input.view)
            if model_input.text != primary.text:
                texts.setdefault(model_input.text, tokenizer)
        largest = max([primary.view.size, *(v.size for v in views), *sizes])
        return cls(tuple(views), tuple(texts.items()), largest if largest > primary.view.size else None)

    def decode_view(self, primary: ViewSpec) -> ViewSpec:
        """The view whose side sets the draft scale images are decoded at."""
        return primary if self.decode_size is None else dataclasses.replace(primary, size=self.decode_size)

    def tokens(self, captions: list[str]) -> dict[TextSpec, Any]:
        return {spec: tokenizer(list(captions)) for spec, tokenizer in self.texts}
