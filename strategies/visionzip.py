"""VisionZip (arXiv 2412.04467): dominant tokens by [CLS] attention plus merged contextual tokens."""

from typing import Literal

import torch
from pydantic import Field
from tokenprune.strategies.vtc_cls import VTCCLS

from tokenprune.errors import SignalError
from tokenprune.reduction import Reduction
from tokenprune.registry import register
from tokenprune.signals import ClsAttention, PatchAttention, PatchKeys, Signal
from tokenprune.strategy import ModelInfo, SelectContext, Selector


@register("visionzip")
class VisionZip(VTCCLS):
    """VisionZip's scorer: [CLS] attention of the block the projector reads (the official code:
    `attentions[-2]`, summed over heads, the same ranking as the head mean; default `layer=None`
    reads the block whose output the projector merges, the same block for LLaVA-1.5), paired with
    `visionzip-merge`.

    `dominant="received"` (a deviation, for towers without [CLS]: SigLIP, Qwen's ViT): dominant
    tokens are those that receive the most attention, the mean over all queries of the block's
    post-softmax attention column (`PatchAttention(axis="col", scores="softmax")`). Inside the
    encoder (`vision:L`, an extension: the paper prunes at the projector) give `layer` below `L`.
    """

    layer: int | None = None
    dominant: Literal["cls", "received"] = "cls"
    default_selector = "visionzip-merge"
    places = ("projector", "vision")

    def block(self, info: ModelInfo) -> int:
        if self.dominant == "cls":
            return super().block(info)
        if self.layer is not None:
            return info.vision_block(self.layer)
        if info.feature_layer is None:
            raise SignalError("visionzip(dominant=received) needs a vision block; give layer=, e.g. layer=-1")
        return info.feature_layer

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        if self.dominant == "cls":
            return (ClsAttention(layer=self.block(info)),)
        return (PatchAttention(layer=self.block(info), axis="col", scores="softmax"),)


@register("visionzip-merge")
class VisionZipMerge(Selector):
    """VisionZip's selection: `k - c` dominant tokens (best scores), then `c` contextual tokens from
    the rest: every `step`-th remaining token (`step = max(1, R // c)`, in raster order) is a target,
    each other remaining token joins the target whose head-mean key (block `layer`, default the
    projector's block) is most cosine-similar. `merge="target+mean"` (default, as the official
    code): a contextual token is its target plus the mean of the other members of its group (the
    target alone if none joined); `merge="mean"`: the plain mean of the group, target included.
    `contextual=None` follows the paper's 54+10 / 108+20 / 162+30 split: `c = round(10k/64)`.
    The official code also keeps [CLS] among the dominant tokens; here the stage sees patches only.
    Outputs are in raster order of their representatives (the targets for contextual tokens);
    provenance weights are the mixing weights normalised to sum to 1."""

    contextual: int | None = Field(None, ge=0)
    layer: int | None = None
    merge: Literal["target+mean", "mean"] = "target+mean"

    def _block(self, info: ModelInfo) -> int:
        if self.layer is not None:
            return info.vision_block(self.layer)
        if info.feature_layer is None:
            raise SignalError("visionzip-merge needs a vision block for its keys; give layer=, e.g. layer=-2")
        return info.feature_layer

    def signals(self, info: ModelInfo) -> tuple[Signal, ...]:
        return (PatchKeys(layer=self._block(info), heads="mean"),)

    def select(self, ctx: SelectContext) -> Reduction:
        tokens, k = ctx.tokens, ctx.k
        b, n, _ = tokens.shape
        c = min(round(10 * k / 64) if self.contextual is None else self.contextual, k - 1)
        order = torch.sort(self.scored(ctx.scores), dim=1, descending=True, stable=True).indices
        dominant = order[:, : k - c].sort(dim=1).values  # [B, k - c]
        rest = order[:, k - c :].sort(dim=1).values  # [B, R] raster order
        r = rest.shape[1]
        weights = torch.zeros(b, k, n, device=tokens.device)
        weights[:, : k - c].scatter_(2, dominant[..., None], 1.0)
        index = dominant
        if c:
            targets = torch.arange(0, r, max(1, r // c), device=tokens.device)[:c]
            is_target = torch.zeros(r, dtype=torch.bool, device=tokens.device).index_fill_(0, targets, True)
            keys = torch.nn.functional.normalize(ctx.signal().float(), dim=-1)
            rest_keys = keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))  # [B, R, d]
            group = (rest_keys[:, ~is_target] @ rest_keys[:, targets].transpose(1, 2)).argmax(dim=2)  # [B, R - c]
            member = torch.zeros(b, c, r, device=tokens.device)
            member[:, :, targets] = torch.eye(c, device=tokens.device)
            member[:, :, ~is_target] = torch.nn.functional.one_hot(group, c).transpose(1, 2).float()
            contextual = torch.zeros(b, c, n, device=tokens.device).scatter_(2, rest[:, None].expand(-1, c, -1), member)
            if self.merge == "mean":
                weights[:, k - c :] = contextual / contextual.sum(-1, keepdim=True)
            else:  # the target (weight 1) plus the mean of the others (1 / their count)
                others = (contextual.sum(-1, keepdim=True) - 1).clamp_min(1)
                target = torch.zeros_like(contextual).scatter_(2, rest[:, targets, None], 1.0)
                weights[:, k - c :] = target + (contextual - target) / others
            index = torch.cat([dominant, rest[:, targets]], dim=1)
        merged = weights.to(tokens.dtype) @ tokens
        weights = weights / weights.sum(-1, keepdim=True)
        return Reduction(tokens=merged, index=index, weights=weights).in_index_order()
