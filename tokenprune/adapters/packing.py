"""How image features become LLM tokens, and where the stages before the LLM run on them: the
built-in packings a `Family` picks from.

* `Plain` (LLaVA-1.5): each image is one block of `N(+1)` tokens; stages run in a pre-hook on the
  projector (so `vision:L` stages, budget rules and shared encodings work there).
* `Anyres` (LLaVA-NeXT, OneVision): an image is its base crop then its high-resolution crops tiled
  into one grid with a newline token ending each row; stages run per image over all its crops.
* `Merged` (Qwen2-VL): an image is its merged units (2x2 patches); stages run per image on them.

`Anyres` and `Merged` run per image after the features are packed; images of one layout share one
batched stage call. Each makes an `ImageTokens` for the engine's prompt rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checks import DeferredCheck
from ..errors import InputError
from ..execute import run_stage
from ..flops import signal_flops
from ..pipeline import Stage
from ..reduction import Reduction
from ..strategy import ModelInfo
from ..trace import StageRecord
from .encoder import check_signal_blocks, current_grid
from .engine import ImageTokens, Projected
from .family import resolve

if TYPE_CHECKING:
    from .engine import Engine


def _encode(engine: Engine, kw: dict[str, Any], encoded: Any, **arguments: Any) -> Any:
    """The images' features: `encoded` when `generate` encoded them already, else `get_image_features`."""
    if encoded is not None:
        return encoded
    return engine.core.get_image_features(pixel_values=kw["pixel_values"], return_dict=True, **arguments)


def _square_grid(engine: Engine) -> tuple[int, int]:
    vision = engine.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


@dataclass(frozen=True)
class Plain:
    """LLaVA-1.5 packing: the projector maps each image's `N` patch features (after the [CLS] one
    when the config keeps it) to `N(+1)` placeholder tokens."""

    shares_encodings: bool = True
    unequal: str = "tokens"

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        return _square_grid(engine)

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        check_signal_blocks(stages, info, min(engine.feature_blocks()))

    def attach(self, engine: Engine) -> list[Any]:
        projector: nn.Module = resolve(engine.core, engine.family.layout.projector)
        return [projector.register_forward_pre_hook(partial(self._project, engine))]

    def _project(self, engine: Engine, module: nn.Module, args: tuple) -> tuple:
        """Projector pre-hook: run the stages on the tower's features `[I, N(+1), D]`."""
        features = args[0]
        state, full = engine.state, engine.features_keep_cls()
        tokens = features[:, 1:] if full else features
        signals = dict(engine.shared) if engine.shared is not None else state.probe.values()
        origin = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        # NaN checks read after the LM head has been launched, not here; those of an encoding no
        # prefill consumed (`get_image_features` called alone) go with this one's, or to `finish`
        records: list[StageRecord] = []
        deferred = list(engine.projected.deferred) if engine.projected is not None else []
        encoded = state.encoder.state if state.encoder is not None else None
        if encoded is not None:
            origin, deferred = encoded.origin, deferred + list(encoded.deferred)
            records = [
                _record(stage, n_in, r.k, kept, r.weights, scores, None)
                for stage, n_in, r, scores, kept in encoded.records
            ]
        counts = None  # per image, when a budget rule left images with different counts
        for stage in state.projector_stages:
            n_in = tokens.shape[1]
            info = replace(state.info, grid=current_grid(state.info, n_in))
            reduction, scores = run_stage(stage, tokens, info, signals, deferred)
            origin = origin.gather(1, reduction.index)
            counts = list(reduction.counts) if reduction.counts is not None else None
            records.append(_record(stage, n_in, reduction.k, origin, reduction.weights, scores, counts))
            tokens = reduction.tokens
        slots = origin
        if full:
            tokens = torch.cat([features[:, :1], tokens], dim=1)
            slots = torch.cat([torch.zeros_like(origin[:, :1]), origin + 1], dim=1)
        rows, cols = engine.patch_grid()
        depth = state.info.vision_layers or 0
        block_tokens = state.encoder.tokens_per_block() if state.encoder is not None else [rows * cols + 1] * depth
        hidden = engine.config.vision_config.hidden_size
        scoring = sum(signal_flops(s, block_tokens[s.read_layer() or 0], hidden) for s in state.probe.signals)
        engine.projected = Projected(
            records=records,
            slots=slots,
            block=rows * cols + full,
            origin=origin,
            counts=counts,
            scoring_flops=scoring * features.shape[0],
            vision_tokens=block_tokens,
            vision_tokens_in=rows * cols + 1,
            deferred=deferred,
        )
        return (tokens,) + tuple(args[1:])

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """Encode the images (pruned by the projector hook) unless `generate` already did."""
        extra = {"image_sizes": kw["image_sizes"]} if kw.get("image_sizes") is not None else {}
        given, encoded = encoded is not None, _encode(engine, kw, encoded, **extra)
        reused = engine.memo.get("projected")
        if engine.projected is None and reused is not None and reused[0] is encoded:
            pruned = reused[1]  # generate without a cache: every step feeds its one encoding again
        elif engine.projected is None:
            raise InputError("image features reached the LLM without passing the projector inside tokenprune.apply")
        else:
            pruned, engine.projected = engine.projected, None
            if given:  # generate's own encoding, which it may feed again
                engine.memo["projected"] = (encoded, pruned)
        features = getattr(encoded, "pooler_output", encoded)
        features = torch.cat(list(features), dim=0) if isinstance(features, list | tuple) else features
        features = features.reshape(-1, features.shape[-1])
        slots, block = pruned.slots, pruned.block
        n_images, device = slots.shape[0], kw["input_ids"].device
        slot_keep = torch.zeros(n_images, block, dtype=torch.bool, device=device)
        slot_keep.scatter_(1, slots.to(device), True)  # a ragged row's padding repeats a kept slot
        extra_tokens = slots.shape[1] - pruned.origin.shape[1]  # the [CLS] feature, when the projector keeps it
        counts = [slots.shape[1]] * n_images if pruned.counts is None else [c + extra_tokens for c in pruned.counts]
        if pruned.counts is not None:  # drop each image's padding rows
            rows = [i * slots.shape[1] + j for i, c in enumerate(counts) for j in range(c)]
            features = features[torch.tensor(rows, device=features.device)]
        image = torch.ones(slots.shape, dtype=torch.bool, device=device)
        image[:, :extra_tokens] = False  # the [CLS] token is no image token for llm:K stages
        vision = engine.config.vision_config
        return ImageTokens(
            slots=slot_keep.flatten(),
            features=features,
            blocks=[block] * n_images,
            kept=counts,
            llm_tokens=image.flatten()
            if pruned.counts is None
            else torch.cat([row[:c] for row, c in zip(image, counts, strict=True)]),
            reaching=[c - extra_tokens for c in counts],
            origin=list(pruned.origin),
            records=pruned.records,
            deferred=pruned.deferred,
            scoring_flops=pruned.scoring_flops,
            vision_tokens=pruned.vision_tokens,
            vision_shape=(vision.hidden_size, vision.intermediate_size, pruned.vision_tokens_in),
        )


def _record(
    stage: Stage,
    n_in: int,
    k: int,
    origin: Tensor,
    weights: Tensor | None,
    scores: Tensor | None,
    counts: list[int] | None,
) -> StageRecord:
    """The trace record of a stage run on a batch of images (`origin` `[I, k]`, padded rows when `counts`)."""
    out = counts or [k] * origin.shape[0]
    return StageRecord(
        stage=stage.to_spec(),
        at=stage.at,
        tokens_in=n_in,
        tokens_out=k,
        kept=[row[:c] for row, c in zip(origin.unbind(0), out, strict=True)],
        weights=None if weights is None else [row[:c] for row, c in zip(weights.unbind(0), out, strict=True)],
        scores=None if scores is None else list(scores.unbind(0)),
        counts=None if counts is None else [(n_in, c) for c in out],
    )


@dataclass(frozen=True)
class ImagePass:
    """One image through the stages before the LLM, when images are pruned one layout at a time.

    Attributes:
        slots: `[n]` bool over the image's placeholders: kept or not.
        features: `[m, D]` its kept tokens, in placeholder order.
        llm_tokens: `[m]` bool, which of them `llm:K` stages see as image tokens.
        tokens_in: tokens reaching the stage; kept, weights, scores: the trace's (see `StageRecord`).
    """

    slots: Tensor
    features: Tensor
    llm_tokens: Tensor
    tokens_in: int
    kept: Tensor
    weights: Tensor | None
    scores: Tensor | None


def per_image(
    stage: Stage | None, passes: list[ImagePass], deferred: list[DeferredCheck], **record: Any
) -> ImageTokens:
    """The `ImageTokens` of images pruned one by one (`passes`, in prompt order); `record`: the
    `ImageTokens` fields for the forward record (`scoring_flops`, `vision_tokens`, `vision_shape`)."""
    counts = [(p.tokens_in, len(p.kept)) for p in passes]
    weights = [p.weights for p in passes if p.weights is not None]  # all or none
    scores = [p.scores for p in passes if p.scores is not None]
    records = (
        []
        if stage is None
        else [
            StageRecord(
                stage=stage.to_spec(),
                at=stage.at,
                tokens_in=max(c[0] for c in counts),
                tokens_out=max(c[1] for c in counts),
                kept=[p.kept for p in passes],
                weights=weights or None,
                scores=scores or None,
                counts=counts if len(set(counts)) > 1 else None,
            )
        ]
    )
    return ImageTokens(
        slots=torch.cat([p.slots for p in passes]),
        features=torch.cat([p.features for p in passes]),
        blocks=[len(p.slots) for p in passes],
        kept=[len(p.features) for p in passes],
        llm_tokens=torch.cat([p.llm_tokens for p in passes]),
        reaching=[len(p.kept) for p in passes],
        origin=[p.kept for p in passes],
        records=records,
        deferred=deferred,
        **record,
    )


def _reduce(stage: Stage | None, tokens: Tensor, info: ModelInfo, signals: dict, deferred: list) -> tuple:
    """`stage` on `tokens` `[G, n, D]`; with no stage (only `llm:K` stages), every token is kept."""
    if stage is None:
        index = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return Reduction.drop(tokens, index), None
    return run_stage(stage, tokens, info, signals, deferred)


Packer = Callable[[Any, list[Tensor], Tensor, Tensor], list[Tensor]]
"""`(engine, per-image crop features [crops, P, C], image_sizes, newline [C]) -> per-image packed [n_i, C]`."""
Cropper = Callable[[Any, Tensor, dict[str, Any]], list[int]]
"""`(engine, image_sizes, the encoding call's arguments) -> crops per image`."""


@dataclass(frozen=True)
class Anyres:
    """LLaVA-NeXT packing: each image's base crop then its high-resolution crops tiled into one grid,
    unpadded to the image's aspect ratio, an `image_newline` token ending each grid row.

    The packer runs on an index tensor (crop, patch row, patch column) to learn which crop and patch
    each packed token is (newlines: none), so each token gets its crop's signals; the budget applies
    per image over all its crops; a row's newline stays while the row keeps a token.

    Attributes:
        pack: HF's packing of the family (`pack_image_features` with the family's arguments).
        crops: crops the tower encodes per image (anyres tiles plus the base image).
    """

    pack: Packer
    crops: Cropper
    shares_encodings: bool = False
    unequal: str = "patch tokens"

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        return _square_grid(engine)

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        if engine.features_keep_cls() and info.has_cls:
            raise InputError(
                f"the {engine.name} adapter needs vision_feature_select_strategy='default' (crops without [CLS])"
            )

    def attach(self, engine: Engine) -> list[Any]:
        return [engine.capture_calls()]

    def layout(self, engine: Engine, image_sizes: Tensor, crops: list[int]) -> list[Tensor]:
        """Per image, `[n_i]` long: the `crop * P + patch` of each packed token (crops numbered
        across the batch, base image first), `-1` for newline tokens. `crops[i]`: crops of image i.

        The packer runs on three channels, crop and patch row and column; where it interpolates
        (LLaVA-OneVision's large images), a token's provenance is the nearest patch."""
        rows, cols = engine.patch_grid()
        index = []
        for start, n in zip([sum(crops[:i]) for i in range(len(crops))], crops, strict=False):
            crop, row, col = torch.meshgrid(
                torch.arange(start, start + n), torch.arange(rows), torch.arange(cols), indexing="ij"
            )
            index.append(torch.stack([crop, row, col], dim=-1).flatten(1, 2).float().to(image_sizes.device))
        packed = self.pack(engine, index, image_sizes, torch.full((3,), -1.0, device=image_sizes.device))
        out = []
        for tokens in packed:
            crop, row, col = tokens.round().long().unbind(-1)
            out.append(torch.where(crop < 0, -1, (crop * rows + row) * cols + col))
        return out

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        """Encode the images unless `generate` already did, then prune each image's packed tokens
        (images of one size and crop count as one batch)."""
        sizes = engine.image_argument(kw, "image_sizes")
        arguments = kw if kw.get("image_sizes") is not None else (engine.calls.arguments if engine.calls else {})
        if sizes is None:
            raise InputError(f"{engine.model_class} inputs need image_sizes (as the model's processor returns them)")
        extra = {k: kw[k] for k in ("batch_num_images",) if kw.get(k) is not None}
        crops = self.crops(engine, sizes, arguments)  # host reads of image_sizes: before the tower is queued
        groups: dict[tuple[int, ...], list[int]] = {}  # images of one size and crop count share a layout
        for i, (size, n_crops) in enumerate(zip(sizes.tolist(), crops, strict=False)):
            groups.setdefault((*size, n_crops), []).append(i)
        features = _encode(engine, kw, encoded, image_sizes=sizes, **extra)
        packed = list(getattr(features, "pooler_output", features))
        state = engine.state
        signals = {s: v.flatten(0, 1) for s, v in state.probe.values().items()}  # [C * P] or [C * P, d]
        stage = state.projector_stages[0] if state.projector_stages else None
        info, deferred = replace(state.info, grid=None), list[DeferredCheck]()
        firsts = [sum(crops[:i]) for i in range(len(crops))]
        passes: list[ImagePass] = []
        by_image: dict[int, ImagePass] = {}
        for key, members in groups.items():
            if key not in engine.memo:  # a layout depends on size and crop count only: built once per context
                where = self.layout(engine, sizes[members[:1]], crops[members[0] : members[0] + 1])[0]
                rows, cols = engine.patch_grid()
                engine.memo[key] = PackedLayout.of(where, key[-1], rows * cols)
            tokens = torch.stack([packed[i] for i in members])
            firsts_g = [firsts[i] for i in members]
            outputs = self._prune_group(stage, info, tokens, engine.memo[key], firsts_g, signals, deferred)
            by_image.update(zip(members, outputs, strict=True))
        passes = [by_image[i] for i in range(len(packed))]
        rows, cols = engine.patch_grid()
        per_crop = rows * cols + int(state.info.has_cls)
        vision = engine.config.vision_config
        return per_image(
            stage,
            passes,
            deferred,
            scoring_flops=sum(signal_flops(s, per_crop, vision.hidden_size) for s in state.probe.signals) * sum(crops),
            vision_tokens=[per_crop] * (state.info.vision_layers or 0),
            vision_shape=(vision.hidden_size, vision.intermediate_size, per_crop),
        )

    @staticmethod
    def _prune_group(
        stage: Stage | None,
        info: ModelInfo,
        tokens: Tensor,
        layout: PackedLayout,
        firsts: list[int],
        signals: dict[Any, Tensor],
        deferred: list[DeferredCheck],
    ) -> list[ImagePass]:
        """Run `stage` on `G` images of one `layout`: packed `tokens` `[G, n, D]`, `firsts` each
        image's first crop in the batch. One host read (each image's kept count, newlines included)."""
        patch = layout.patch
        offsets = torch.as_tensor(firsts).to(patch.device, non_blocking=True) * layout.patches
        ids = layout.where[patch][None] + offsets[:, None]  # [G, m] the signals' rows
        reduction, scores = _reduce(stage, tokens[:, patch], info, {s: v[ids] for s, v in signals.items()}, deferred)
        kept_at = patch[reduction.index]  # [G, k] packed positions
        kept = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device).scatter_(1, kept_at, True)
        rows_hit = torch.zeros(tokens.shape[0], len(layout.where) + 1, dtype=torch.bool, device=tokens.device)
        rows_hit.scatter_(1, layout.row[kept_at] + 1, True)  # column 0 collects the base image's tokens
        kept[:, layout.newlines] |= rows_hit[:, layout.row[layout.newlines] + 1]
        out = tokens.clone()
        out.scatter_(1, kept_at[..., None].expand(-1, -1, tokens.shape[-1]), reduction.tokens.to(out.dtype))
        order = torch.sort(kept.to(torch.uint8), dim=1, descending=True, stable=True).indices  # kept first, in order
        packed = out.gather(1, order[..., None].expand(-1, -1, out.shape[-1]))
        llm_tokens = layout.where[order] >= 0
        sizes = kept.sum(1).tolist()
        counts = reduction.row_counts()  # a ragged row's padding repeats its last output: the scatters above hold
        return [
            ImagePass(
                slots=kept[g],
                features=packed[g, :size],
                llm_tokens=llm_tokens[g, :size],
                tokens_in=len(patch),
                kept=ids[g][reduction.index[g, : counts[g]]],
                weights=None if reduction.weights is None else reduction.weights[g, : counts[g]],
                scores=None if scores is None else scores[g],
            )
            for g, size in enumerate(sizes)
        ]


def image_grid(engine: Engine, kw: dict[str, Any]) -> Any:
    """The `image_grid_thw` `[I, 3]` of a Qwen prefill's core call `kw` (or of `generate`'s encoding call).

    Raises:
        InputError: it is missing, or the prompt has videos, raw (`pixel_values_videos`) or encoded by
            `generate` (`mm_encoder_outputs["video"]`): their tokens would reach the LLM unpruned but
            without their features, and their positions follow another rule.
    """
    grid = engine.image_argument(kw, "image_grid_thw")
    if grid is None:
        raise InputError(f"{engine.model_class} inputs need image_grid_thw (as the model's processor returns them)")
    if kw.get("pixel_values_videos") is not None or (kw.get("mm_encoder_outputs") or {}).get("video") is not None:
        raise InputError(f"the {engine.name} adapter prunes images; videos are not supported yet")
    return grid


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed token of one anyres layout (an image size and crop count) comes from.

    Attributes:
        where: `[n]` long, each packed token's `crop * P + patch` counted from the image's first crop,
            `-1` at newlines.
        patch: `[m]` long, the packed positions of the patch tokens.
        newlines: `[n - m]` long, the packed positions of the newline tokens.
        row: `[n]` long, each token's grid row (its newline's index); `-1` for the base image's
            tokens when the image has high-resolution crops (the base image has no newlines).
        patches: `P`, patches per crop.
    """

    where: Tensor
    patch: Tensor
    newlines: Tensor
    row: Tensor
    patches: int

    @classmethod
    def of(cls, where: Tensor, n_crops: int, patches: int) -> PackedLayout:
        newline = where < 0
        row = newline.long().cumsum(0) - newline.long()
        if n_crops > 1:
            row = row.masked_fill((where >= 0) & (where < patches), -1)
        return cls(where, (~newline).nonzero()[:, 0], newline.nonzero()[:, 0], row, patches)


@dataclass(frozen=True)
class Merged:
    """Qwen2-VL packing: an image's tokens are its merged units (`merge x merge` patches each), in
    the tower's merged grid order; stages run per image (images of one merged grid as one batch),
    grid selectors on the merged grid of a single frame."""

    merge: str = "visual.spatial_merge_size"
    """Where the merge size lives, under the core."""
    shares_encodings: bool = False
    unequal: str = "tokens"

    def grid(self, engine: Engine) -> tuple[int, int] | None:
        return None

    def check(self, engine: Engine, stages: list[Stage], info: ModelInfo) -> None:
        return None

    def attach(self, engine: Engine) -> list[Any]:
        return [engine.capture_calls()]

    def prune(self, engine: Engine, kw: dict[str, Any], encoded: Any) -> ImageTokens:
        grid = image_grid(engine, kw)
        features = _encode(engine, kw, encoded, image_grid_thw=grid)
        packed = list(getattr(features, "pooler_output", features))
        merge = resolve(engine.core, self.merge)
        groups: dict[tuple[int, ...], list[int]] = {}  # images of one merged grid run as one batch
        for i, (t, h, w) in enumerate(grid.tolist()):
            groups.setdefault((t, h // merge, w // merge), []).append(i)
        state = engine.state
        stage = state.projector_stages[0] if state.projector_stages else None
        deferred: list[DeferredCheck] = []
        by_image: dict[int, ImagePass] = {}
        for (t, rows, cols), members in groups.items():
            info = replace(state.info, grid=(rows, cols) if t == 1 else None)
            tokens = torch.stack([packed[i] for i in members])
            reduction, scores = _reduce(stage, tokens, info, {}, deferred)
            slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            slots.scatter_(1, reduction.index, True)
            counts = reduction.row_counts()  # a ragged row's padding repeats a kept index: the scatter holds
            for g, i in enumerate(members):
                by_image[i] = ImagePass(
                    slots=slots[g],
                    features=reduction.tokens[g, : counts[g]],
                    llm_tokens=slots.new_ones(counts[g]),
                    tokens_in=tokens.shape[1],
                    kept=reduction.index[g, : counts[g]],
                    weights=None if reduction.weights is None else reduction.weights[g, : counts[g]],
                    scores=None if scores is None else scores[g],
                )
        return per_image(stage, [by_image[i] for i in range(len(packed))], deferred)
