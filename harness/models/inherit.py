"""TinyCLIP's manual weight inheritance: a student built from chosen layers and leading widths of a teacher's weights.

Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV 2023, §3.2 (manual
inheritance); its released code (microsoft/Cream, ``TinyCLIP/src/open_clip/weight_inherit.py``) is followed:

- layers: student block i of a tower takes teacher block ``layers[i]``; by default TinyCLIP's "interval front",
  every (teacher depth // student depth)-th block from the first (12 → 6: 0, 2, 4, 6, 8, 10), or a listed choice
  per tower (``student.inherit.layers: {image: [...], text: [...]}``);
- widths: every tensor keeps its leading entries along each dimension (channels, MLP neurons, embedding dims,
  context positions); attention keeps its leading heads of q, k and v alike (the head width is kept, as heads are
  the unit attention computes in). With ``width: magnitude`` (for both towers, or per tower) a block keeps
  instead the heads and MLP neurons of largest weight norm in its teacher block (a head: its q, k and v rows and
  its output-projection columns; a neuron: its c_fc row and c_proj column), in their order: magnitude is the
  importance score of structured pruning that needs no data (Li et al., ICLR 2017, on filters). Embedding dims
  stay the leading ones, as in TinyCLIP: every tensor of a tower reads the same residual dims, so no block's
  weights can choose them.

The image and text towers are chosen apart. Only open_clip's own transformer towers inherit (their blocks are
``resblocks.N``); a pair that cannot (another family, a student wider or deeper than its teacher, another patch
grid, head width or vocabulary) is one message naming the first tensor that does not fit.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from harness.models.names import ModelLoadError

BLOCK = re.compile(r"^(?P<tower>.*)resblocks\.(?P<index>\d+)\.(?P<rest>.+)$")
QKV = (".attn.in_proj_weight", ".attn.in_proj_bias")
# dimensions a slice cannot change: the image's patch grid and pixels a patch holds, the text's vocabulary
EXACT = {"visual.positional_embedding": (0,), "visual.conv1.weight": (1, 2, 3), "token_embedding.weight": (0,)}


def tower_of(name: str) -> str:
    return "image" if name.startswith("visual.") else "text"


def interval_front(teacher_depth: int, student_depth: int) -> list[int]:
    """TinyCLIP's default choice of teacher blocks: every (teacher // student)-th from the first."""
    step = teacher_depth // max(student_depth, 1)
    return list(range(0, student_depth * step, step))


def depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Blocks per tower of a state dict (0 for a tower without open_clip's ``resblocks``)."""
    found = {"image": 0, "text": 0}
    for name in state:
        if match := BLOCK.match(name):
            tower = tower_of(name)
            found[tower] = max(found[tower], int(match["index"]) + 1)
    return found


def head_widths(model: nn.Module) -> dict[str, int]:
    """Each tower's attention head width (the first attention layer's)."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            widths.setdefault(tower_of(f"{name}."), module.head_dim)
    return widths


def chosen_layers(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                  listed: dict[str, list[int]]) -> dict[str, list[int]]:
    """The teacher block each student block takes, per tower: listed, else TinyCLIP's interval front."""
    student_depths, teacher_depths = depths(student), depths(teacher)
    layers = {}
    for tower, depth in student_depths.items():
        if depth > teacher_depths[tower]:
            raise ModelLoadError(f"cannot inherit the {tower} tower: the student's {depth} blocks are more than the "
                                 f"teacher's {teacher_depths[tower]}")
        choice = list(listed.get(tower) or interval_front(teacher_depths[tower], depth))
        if depth and (len(choice) != depth or not all(0 <= j < teacher_depths[tower] for j in choice)):
            raise ModelLoadError(f"student.inherit.layers.{tower}: {choice} is not one teacher block (of "
                                 f"{teacher_depths[tower]}) for each of the student's {depth}")
        layers[tower] = choice
    return layers


def teacher_name(name: str, layers: dict[str, list[int]]) -> str:
    """The teacher tensor a student tensor inherits from."""
    match = BLOCK.match(name)
    if match is None:
        return name
    return f"{match['tower']}resblocks.{layers[tower_of(name)][int(match['index'])]}.{match['rest']}"


def leading(name: str, source: torch.Tensor, shape: torch.Size, head_width: int) -> torch.Tensor:
    """The leading slice of ``source`` of the student's ``shape``; q, k and v by leading heads."""
    if source.ndim != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        raise ModelLoadError(f"cannot inherit {name}: the student's {tuple(shape)} is not a slice of the teacher's "
                             f"{tuple(source.shape)} (a student is at most as wide as its teacher)")
    if name.endswith(QKV):
        heads = (shape[0] // (3 * head_width), source.shape[0] // (3 * head_width))
        grouped = source.reshape(3, heads[1], head_width, *source.shape[1:])
        return grouped[:, :heads[0], :, *(slice(0, s) for s in shape[1:])].reshape(shape).clone()
    return source[tuple(slice(0, s) for s in shape)].clone()


def by_magnitude(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], layers: dict[str, list[int]],
                 head_widths: dict[str, int], towers: set[str]) -> dict[str, torch.Tensor]:
    """The teacher's state with each chosen block of ``towers`` narrowed to the student block's heads and MLP
    neurons, those of largest weight norm kept in their order (``leading`` then takes the rest of each shape)."""
    narrowed = dict(theirs)
    for name in mine:
        match = BLOCK.match(name)
        if match is None or match["rest"] != "attn.in_proj_weight" or tower_of(name) not in towers:
            continue
        tower, width = tower_of(name), head_widths[tower_of(name)]
        block = f"{match['tower']}resblocks.{match['index']}"
        source = f"{match['tower']}resblocks.{layers[tower][int(match['index'])]}"
        qkv, out = theirs[f"{source}.attn.in_proj_weight"], theirs[f"{source}.attn.out_proj.weight"]
        heads = qkv.shape[0] // (3 * width)
        head_norms = (qkv.reshape(3, heads, width, -1).square().sum((0, 2, 3))
                      + out.reshape(out.shape[0], heads, width).square().sum((0, 2)))
        fc, proj = theirs[f"{source}.mlp.c_fc.weight"], theirs[f"{source}.mlp.c_proj.weight"]
        neuron_norms = fc.square().sum(1) + proj.square().sum(0)
        kept_heads = largest(head_norms, mine[name].shape[0] // (3 * width))
        kept_neurons = largest(neuron_norms, mine[f"{block}.mlp.c_fc.weight"].shape[0])
        rows = (torch.arange(3)[:, None, None] * heads * width + kept_heads[None, :, None] * width
                + torch.arange(width)).flatten()
        columns = (kept_heads[:, None] * width + torch.arange(width)).flatten()
        for rest, dim, index in (("attn.in_proj_weight", 0, rows), ("attn.in_proj_bias", 0, rows),
                                 ("attn.out_proj.weight", 1, columns), ("mlp.c_fc.weight", 0, kept_neurons),
                                 ("mlp.c_fc.bias", 0, kept_neurons), ("mlp.c_proj.weight", 1, kept_neurons)):
            narrowed[f"{block}@{rest}"] = theirs[f"{source}.{rest}"].index_select(dim, index)
    return narrowed


def largest(norms: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` largest, in order."""
    return torch.topk(norms, min(count, len(norms))).indices.sort().values


def inherited_state(student: nn.Module, teacher: nn.Module, listed: dict[str, list[int]] | None = None,
                    by_norm: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The student's state dict taken from the teacher's (chosen blocks; leading widths, or in the towers
    ``by_norm`` the heads and neurons of largest norm), and the blocks chosen."""
    mine, theirs = student.state_dict(), teacher.state_dict()
    layers = chosen_layers(mine, theirs, listed or {})
    sources = {name: teacher_name(name, layers) for name in mine}
    for name, source_name in sources.items():
        if source_name not in theirs:
            raise ModelLoadError(f"cannot inherit {name}: the teacher has no {source_name} (another family of "
                                 "towers: only open_clip's transformer towers inherit)")
    heads, teacher_heads = head_widths(student), head_widths(teacher)
    for tower, head_width in heads.items():
        if teacher_heads.get(tower) != head_width:
            raise ModelLoadError(f"cannot inherit the {tower} tower: head width {head_width} against the teacher's "
                                 f"{teacher_heads.get(tower)} (heads are inherited whole)")
    if by_norm:  # each student block's own narrowing of its teacher block, keyed "block@rest"
        theirs = by_magnitude(mine, theirs, layers, heads, set(by_norm))
        sources = {name: _narrowed_name(name, sources[name], theirs) for name in mine}
    state = {}
    for name, tensor in mine.items():
        source = theirs[sources[name]]
        kept = EXACT.get(name, ())
        if [tensor.shape[d] for d in kept] != [source.shape[d] for d in kept if d < source.ndim]:
            raise ModelLoadError(f"cannot inherit {name}: {tuple(tensor.shape)} against the teacher's "
                                 f"{tuple(source.shape)} (another patch grid or vocabulary)")
        state[name] = leading(name, source, tensor.shape, heads.get(tower_of(name), 1)).to(tensor.dtype)
    return state, layers


def _narrowed_name(name: str, source: str, narrowed: dict[str, torch.Tensor]) -> str:
    match = BLOCK.match(name)
    key = f"{match['tower']}resblocks.{match['index']}@{match['rest']}" if match else None
    return key if key in narrowed else source
