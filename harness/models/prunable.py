"""TinyCLIP's automatic weight inheritance: masks over attention heads, MLP neurons and embedding dims, learned while
the student distils under a sparsity target, then the masked model made dense.

Wu et al., ICCV 2023, §3.2 (automatic inheritance), after CoFi (Xia et al., ACL 2022), whose form TinyCLIP's
released code takes:

- each mask is hard concrete (Louizos et al. 2018): z = min(1, max(0, σ((log u − log(1−u) + log α)/β)(ζ−γ) + γ)),
  u ~ U(0, 1), β = 2/3, γ = −0.1, ζ = 1.1; P(z > 0) = σ(log α − β log(−γ/ζ)). In evaluation a group keeps its
  round(Σ P(z > 0)) units of largest log α, each at 1, so the masked model in eval mode is the dense model exactly;
- the expected sparsity ŝ is the share of the blocks' attention and MLP weights (4·head_width·heads·dims and
  2·neurons·dims per block) the expected masks remove, of the unpruned model's (a later stage goes on from its
  source's); the target t rises linearly from the source's sparsity to ``sparsity`` over the first ``warmup``
  share of the steps and is then held;
- in place of TinyCLIP's Lagrangian λ₁(ŝ − t) + λ₂(ŝ − t)², after every step all gates' log α are shifted by the
  one offset that puts ŝ at t (``hold``): the projected-gradient form of the same constraint ŝ = t. The
  multipliers need thousands of steps to settle; on a short stage they wind up while the gates travel to their
  working range and then overshoot (measured on clipkd-tiny-teacher, 60 steps, target 0.5 reached at step 30,
  Adam at 0.3: ŝ 0.48 at step 40, 0.80 at step 55). The distillation loss alone orders the gates: which units go
  is learned, how many is the schedule's.

A head's or neuron's mask scales its output; an embedding-dim mask zeroes the dim in the residual stream (at the
towers' input and after every block's attention and MLP) and in every LayerNorm's output, whose mean and variance
are taken over the kept dims alone, so a pruned dim is absent, not a zero among the others. Only open_clip's own
transformer towers (``resblocks`` of ``ResidualAttentionBlock``) are pruned.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from harness.models.names import ModelLoadError

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
ORIGINAL = "unpruned_block_weights"  # on a pruned model: its unpruned ancestor's attention and MLP weights


class HardConcrete(nn.Module):
    """``size`` stochastic gates, one per unit of a group (a block's heads or neurons, a tower's dims)."""

    def __init__(self, size: int, log_alpha: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((size,), log_alpha))

    @staticmethod
    def opening(largest: int) -> float:
        """The log α at which a group of ``largest`` units expects a quarter of one dropped: evaluation keeps every
        unit of every group, so the student starts as its source, and all gates start alike (the shift that
        holds the target moves them alike: only what they learn tells the groups apart)."""
        return math.log(4 * largest - 1) + BETA * math.log(-GAMMA / ZETA)

    def keep_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def kept(self) -> torch.Tensor:
        """The units evaluation keeps: the round(Σ P(z > 0)) of largest log α, as a boolean per unit."""
        count = int(torch.round(self.keep_probability().detach().sum()))
        kept = torch.zeros_like(self.log_alpha, dtype=torch.bool)
        kept[torch.topk(self.log_alpha.detach(), count).indices] = True
        return kept

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.kept().to(self.log_alpha.dtype)
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


@dataclass(frozen=True)
class Tower:
    """Where a tower's parts are: the module that holds its transformer, its first module (where its masks are
    drawn), and its LayerNorms outside the blocks."""
    root: nn.Module
    first: str
    norms: tuple[str, ...]


def towers(model: nn.Module) -> dict[str, Tower]:
    """open_clip's transformer towers of a CLIP model, refused with one message when a tower is another kind."""
    text_root = getattr(model, "text", model)
    found = {"image": Tower(model.visual, "conv1", ("ln_pre", "ln_post")),
             "text": Tower(text_root, "token_embedding", ("ln_final",))}
    for name, tower in found.items():
        blocks = getattr(getattr(tower.root, "transformer", None), "resblocks", None)
        if blocks is None or not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise ModelLoadError(f"cannot prune the {name} tower: only open_clip's transformer towers (resblocks of "
                                 "ResidualAttentionBlock) are pruned")
        projection = getattr(tower.root, "proj" if name == "image" else "text_projection", None)
        if any(not isinstance(b.ls_1, nn.Identity) or hasattr(b, "ln_1_kv") for b in blocks) or \
                getattr(tower.root, "attn_pool", None) is not None or not isinstance(projection, nn.Parameter):
            raise ModelLoadError(f"cannot prune the {name} tower: layer scale, cross attention, attention pooling "
                                 "and a projection other than a matrix are not pruned")
    return found


class HeadAttention(nn.Module):
    """Self-attention of ``heads`` heads of ``head_width`` over a residual of ``width`` dims, heads × head_width
    free of width (which nn.MultiheadAttention ties); nn.MultiheadAttention's parameter names and call. ``masks``
    gives the head and dim masks while pruning; the dense model has none."""

    def __init__(self, width: int, heads: int, head_width: int, batch_first: bool,
                 masks: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = width, heads, head_width  # nn.MultiheadAttention's names
        self.batch_first, self.masks = batch_first, masks
        self.in_proj_weight = nn.Parameter(torch.empty(3 * heads * head_width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * heads * head_width))
        self.out_proj = nn.Linear(heads * head_width, width)

    def forward(self, q_x, k_x=None, v_x=None, need_weights: bool = False, attn_mask=None):
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        batch, length, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(
            batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask) if self.num_heads else q
        if self.masks is not None:
            heads = heads * self.masks()[0].to(heads.dtype)[:, None, None]
        out = self.out_proj(heads.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        if self.masks is not None:
            out = out * self.masks()[1].to(out.dtype)
        return (out if self.batch_first else out.transpose(0, 1)), None


class MaskedMLP(nn.Module):
    """open_clip's MLP (same parameter names) with its neurons' and the residual dims' masks."""

    def __init__(self, mlp: nn.Sequential, masks: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj, self.masks = mlp.c_fc, mlp.gelu, mlp.c_proj, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neurons, dims = self.masks()
        return self.c_proj(self.gelu(self.c_fc(x)) * neurons.to(x.dtype)) * dims.to(x.dtype)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the dims ``dims()`` weighs (statistics of the kept dims alone), its output masked."""

    def __init__(self, norm: nn.LayerNorm, dims: Callable[[], torch.Tensor]):
        super().__init__(norm.normalized_shape, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        self.load_state_dict(norm.state_dict())
        self.dims, self.original = dims, type(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        mask = self.dims().to(wide.dtype)
        weights = mask / mask.sum()
        mean = (wide * weights).sum(-1, keepdim=True)
        variance = ((wide - mean) ** 2 * weights).sum(-1, keepdim=True)
        normed = (wide - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias
        return (normed * mask).to(x.dtype)


class PruneMasks(nn.Module):
    """Every mask of a model being pruned, and the sparsity target of the step."""

    def __init__(self, model: nn.Module, sparsity: float):
        super().__init__()
        self.sparsity = sparsity
        found = towers(model)
        sizes = {t: (tower.root.transformer.width, [b.attn.num_heads for b in blocks(tower)],
                     [b.mlp.c_fc.out_features for b in blocks(tower)]) for t, tower in found.items()}
        start = HardConcrete.opening(max(max(d, *h, *n) for d, h, n in sizes.values()))
        self.dims = nn.ModuleDict({t: HardConcrete(d, start) for t, (d, _, _) in sizes.items()})
        self.heads = nn.ModuleDict({t: nn.ModuleList(HardConcrete(n, start) for n in h) for t, (_, h, _) in sizes.items()})
        self.neurons = nn.ModuleDict({t: nn.ModuleList(HardConcrete(n, start) for n in ns)
                                      for t, (_, _, ns) in sizes.items()})
        self.head_widths = {t: blocks(tower)[0].attn.head_dim for t, tower in found.items()}
        # sparsity is of the unpruned ancestor's weights: a stage after another goes on from its source's
        self.original = getattr(model, ORIGINAL, None) or float(self.weights(lambda gate: gate.log_alpha.numel()))
        self.start = 1 - float(self.weights(lambda gate: gate.log_alpha.numel())) / self.original
        if sparsity <= self.start:
            raise ModelLoadError(f"student.inherit.prune.sparsity {sparsity} is not above its source's, "
                                 f"{self.start:.3f} (sparsity is of the unpruned model's weights)")
        self.register_buffer("target", torch.tensor(self.start))
        self.drawn: dict[str, dict[str, object]] = {}
        self.hooks: list = []  # removed when the model is made dense

    def draw(self, tower: str) -> None:
        """The tower's masks for this forward pass: every block and LayerNorm of the tower reads the same ones."""
        self.drawn[tower] = {"dims": self.dims[tower](), "heads": [m() for m in self.heads[tower]],
                             "neurons": [m() for m in self.neurons[tower]]}

    def weights(self, kept: Callable[[HardConcrete], torch.Tensor]) -> torch.Tensor:
        """The blocks' attention and MLP weights, with each group's units counted by ``kept``, on the gates' device."""
        total = torch.zeros((), dtype=torch.float64, device=self.dims[next(iter(self.dims))].log_alpha.device)
        for tower, dims in self.dims.items():
            width = self.head_widths[tower]
            for heads, neurons in zip(self.heads[tower], self.neurons[tower]):
                total = total + kept(dims) * (4 * width * kept(heads) + 2 * kept(neurons))
        return total

    def _expected(self, shift: torch.Tensor | float) -> torch.Tensor:
        """ŝ with every log α moved by ``shift``, a float64 tensor on the gates' device (no host sync)."""
        def kept(gate: HardConcrete) -> torch.Tensor:
            return torch.sigmoid(gate.log_alpha.detach().double() + shift - BETA * math.log(-GAMMA / ZETA)).sum()
        return 1 - self.weights(kept) / self.original

    def expected_sparsity(self, shift: float = 0.0) -> float:
        """ŝ, with every log α moved by ``shift``."""
        return float(self._expected(shift))

    def kept_sparsity(self) -> float:
        """The sparsity of the masks evaluation uses: the dense model's."""
        return float(1 - self.weights(lambda gate: gate.kept().sum()) / self.original)

    def schedule(self, step: int, total_steps: int, warmup: float) -> None:
        """The target of ``step``: from the source's sparsity to ``sparsity``, linearly over the warmup."""
        reached = min(1.0, step / max(1.0, warmup * total_steps))
        self.target.fill_(self.start + (self.sparsity - self.start) * reached)

    @torch.no_grad()
    def hold(self) -> None:
        """Every log α shifted by the one offset that puts ŝ at the target (found by bisection: ŝ falls as the
        offset rises); nothing before the target leaves the source's sparsity. Run every step, so on the gates'
        device throughout: the bisection's choices are tensors, never read on the host."""
        target = self.target.double()
        low, high = torch.full_like(target, -100.0), torch.full_like(target, 100.0)
        for _ in range(60):
            middle = (low + high) / 2
            below = self._expected(middle) < target
            low, high = torch.where(below, low, middle), torch.where(below, middle, high)
        shift = torch.where(target > self.start, (low + high) / 2, torch.zeros_like(target))
        for gate in self.modules():
            if isinstance(gate, HardConcrete):
                gate.log_alpha.add_(shift.to(gate.log_alpha.dtype))


def blocks(tower: Tower) -> nn.ModuleList:
    return tower.root.transformer.resblocks


def make_prunable(model: nn.Module, sparsity: float) -> PruneMasks:
    """Masks put into ``model`` in place (``model.prune_masks``), which then computes what it did until the masks
    move (they start at 1)."""
    masks = PruneMasks(model, sparsity).to(model.logit_scale.device)
    model.prune_masks = masks
    for name, tower in towers(model).items():
        masks.hooks.append(tower.root.get_submodule(tower.first).register_forward_pre_hook(
            lambda *_, t=name: masks.draw(t)))
        dims = lambda t=name: masks.drawn[t]["dims"]  # noqa: E731 - read at call time, after the draw
        masks.hooks.append(tower.root.transformer.register_forward_pre_hook(
            lambda module, args, kwargs, dims=dims: ((args[0] * dims().to(args[0].dtype), *args[1:]), kwargs),
            with_kwargs=True))
        for norm in tower.norms:
            if isinstance(getattr(tower.root, norm), nn.LayerNorm):
                setattr(tower.root, norm, MaskedLayerNorm(getattr(tower.root, norm), dims))
        for i, block in enumerate(blocks(tower)):
            heads = lambda t=name, i=i: (masks.drawn[t]["heads"][i], masks.drawn[t]["dims"])  # noqa: E731
            neurons = lambda t=name, i=i: (masks.drawn[t]["neurons"][i], masks.drawn[t]["dims"])  # noqa: E731
            block.ln_1, block.ln_2 = MaskedLayerNorm(block.ln_1, dims), MaskedLayerNorm(block.ln_2, dims)
            block.attn = _head_attention(block.attn, heads)
            block.mlp = MaskedMLP(block.mlp, neurons)
    return masks


def _head_attention(attention: nn.MultiheadAttention, masks) -> HeadAttention:
    replaced = HeadAttention(attention.embed_dim, attention.num_heads, attention.head_dim, attention.batch_first,
                             masks).to(attention.in_proj_weight)
    replaced.load_state_dict(attention.state_dict())
    return replaced


# {"towers": {tower: {"dims": n, "heads": [n per block], "neurons": [n per block]}}, "unpruned_block_weights": n}
Structure = dict[str, object]


def make_dense(model: nn.Module) -> Structure:
    """The pruned model made dense in place: every unit its masks drop in evaluation removed, the masks taken out;
    returns its structure (stored with its weights: ``narrow`` rebuilds its shape)."""
    masks = model.prune_masks
    keep = {t: {"dims": masks.dims[t].kept(), "heads": [m.kept() for m in masks.heads[t]],
                "neurons": [m.kept() for m in masks.neurons[t]]} for t in masks.dims}
    for hook in masks.hooks:
        hook.remove()
    del model.prune_masks
    _shrink(model, keep)
    setattr(model, ORIGINAL, masks.original)
    return structure(model)


def narrow(model: nn.Module, shape: Structure) -> None:
    """A model of ``shape`` in place (its leading units; the weights are then loaded)."""
    keep = {t: {"dims": _leading(s["dims"]), "heads": [_leading(n) for n in s["heads"]],
                "neurons": [_leading(n) for n in s["neurons"]]} for t, s in shape["towers"].items()}
    _shrink(model, keep)
    setattr(model, ORIGINAL, shape[ORIGINAL])


def _leading(count: int) -> torch.Tensor:
    return torch.arange(count)


def _shrink(model: nn.Module, keep) -> None:
    found = towers(model)
    for name, tower in found.items():
        dims = _indices(keep[name]["dims"])
        root = tower.root
        for norm in tower.norms:
            if isinstance(getattr(root, norm), nn.LayerNorm):
                setattr(root, norm, _layer_norm(getattr(root, norm), dims))
        for parameter in ("class_embedding", "positional_embedding"):
            if isinstance(getattr(root, parameter, None), nn.Parameter):
                setattr(root, parameter, nn.Parameter(getattr(root, parameter).detach()[..., dims].clone()))
        if name == "image":
            conv = root.conv1
            root.conv1 = _sliced(nn.Conv2d(3, len(dims), conv.kernel_size, conv.stride, bias=conv.bias is not None),
                                 conv, {"weight": (dims,), "bias": (dims,)})
            root.proj = nn.Parameter(root.proj.detach()[dims].clone())
        else:
            root.token_embedding = nn.Embedding.from_pretrained(
                root.token_embedding.weight.detach()[:, dims].clone(), freeze=False)
            root.text_projection = nn.Parameter(root.text_projection.detach()[dims].clone())
        root.transformer.width = len(dims)
        for i, block in enumerate(blocks(tower)):
            heads, neurons = _indices(keep[name]["heads"][i]), _indices(keep[name]["neurons"][i])
            block.ln_1, block.ln_2 = _layer_norm(block.ln_1, dims), _layer_norm(block.ln_2, dims)
            block.attn = _dense_attention(block.attn, dims, heads)
            block.mlp = nn.Sequential(OrderedDict([
                ("c_fc", _sliced(nn.Linear(len(dims), len(neurons)), block.mlp.c_fc,
                                 {"weight": (neurons, dims), "bias": (neurons,)})),
                ("gelu", block.mlp.gelu),
                ("c_proj", _sliced(nn.Linear(len(neurons), len(dims)), block.mlp.c_proj,
                                   {"weight": (dims, neurons), "bias": (dims,)}))]))


def structure(model: nn.Module) -> Structure:
    """A dense pruned model's shape: each tower's dims, and each block's heads and MLP neurons."""
    return {"towers": {name: {"dims": tower.root.transformer.width,
                              "heads": [b.attn.num_heads for b in blocks(tower)],
                              "neurons": [b.mlp.c_fc.out_features for b in blocks(tower)]}
                       for name, tower in towers(model).items()},
            ORIGINAL: getattr(model, ORIGINAL)}


def _indices(kept: torch.Tensor) -> torch.Tensor:
    return kept.nonzero().flatten() if kept.dtype == torch.bool else kept


def _take(tensor: torch.Tensor, indices: tuple[torch.Tensor, ...]) -> torch.Tensor:
    for dim, index in enumerate(indices):
        tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor.clone()


def _sliced(new: nn.Module, old: nn.Module, indices: dict[str, tuple[torch.Tensor, ...]]) -> nn.Module:
    new.load_state_dict({name: _take(tensor, indices[name]) for name, tensor in old.state_dict().items()})
    return new.to(next(old.parameters()))


def _layer_norm(norm: nn.LayerNorm, dims: torch.Tensor) -> nn.LayerNorm:
    kind = norm.original if isinstance(norm, MaskedLayerNorm) else type(norm)
    return _sliced(kind(len(dims), eps=norm.eps), norm, {"weight": (dims,), "bias": (dims,)})


def _dense_attention(attention: nn.Module, dims: torch.Tensor, heads: torch.Tensor) -> HeadAttention:
    """Kept heads' rows of q, k and v (and their columns of the output projection), over the kept dims."""
    width = attention.head_dim
    all_heads = attention.in_proj_weight.shape[0] // (3 * width)
    rows = (torch.arange(3)[:, None, None] * all_heads * width + heads[None, :, None] * width
            + torch.arange(width)[None, None, :]).flatten()
    columns = (heads[:, None] * width + torch.arange(width)[None, :]).flatten()
    dense = HeadAttention(len(dims), len(heads), width, attention.batch_first)
    return _sliced(dense, attention, {"in_proj_weight": (rows, dims), "in_proj_bias": (rows,),
                                      "out_proj.weight": (dims, columns), "out_proj.bias": (dims,)})
