"""LLaVA-NeXT adapter (`LlavaNextForConditionalGeneration`, anyres): prunes each image's packed tokens
before the LLM.

HF packs an image as the base image's `P` patch tokens, then the high-resolution crops tiled into one
grid, unpadded to the image's aspect ratio, with an `image_newline` token ending each grid row. The
adapter:

* finds which crop and patch each packed token is by running HF's own `pack_image_features` on an
  index tensor (newline tokens: none), so each token gets its crop's signals ([CLS] attention, keys);
* applies the budget per image over all its crops (`k` tokens, a ratio of its non-newline
  tokens, or a budget rule on its scores): with `topk` that is allocation by global score, each
  crop's [CLS] row summing to at most 1;
* keeps a row's newline token while the row keeps at least one token (the base image has none);
* records in `kept` each output's `crop * P + patch` (crop 0 is the base image), in packed order.

Images have different token counts; those of one size and crop count share a layout and run as one
batch. Places: `projector` and `llm:K` (a stage inside the tower would break the crops' grids). In the
LLM, the kept patch tokens are the image tokens (newline tokens stay, like text), and every image must
reach the stage with the same number of them (images of one size, or a projector stage with an
integer budget first), else the stage is refused.

`generate` encodes the images before its first forward and drops `image_sizes`, which the layout
needs; inside the context the core's `get_image_features` is wrapped on the instance to record them
(`CallCapture`, removed on exit like a hook).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from functools import wraps
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InputError, SignalError
from ..execute import required_signals, run_stage
from ..flops import signal_flops
from ..pipeline import Pipeline
from ..reduction import Reduction
from ..registry import register_adapter
from ..strategy import DeferredCheck
from ..trace import ForwardRecord
from .base import Handle, require_state
from .decoder import DecoderStage
from .llava import LlavaAdapter, Placeholders, _encoder_layers
from .vision import VisionProbe, split_vision_signals

if TYPE_CHECKING:
    from ..apply import Run


class CallCapture:
    """Records the arguments a module's `get_image_features` receives (by name), by wrapping it on
    the instance; `remove()` deletes the wrapper, so the class's method shows through again."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.arguments: dict[str, Any] = {}
        core: Any = module  # an HF core model: `get_image_features` is read by name (untyped)
        original = core.get_image_features
        signature = inspect.signature(original)

        @wraps(original)  # generate inspects its signature to pre-encode images
        def recording(*args: Any, **kwargs: Any) -> Any:
            self.arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        object.__setattr__(module, "get_image_features", recording)

    def remove(self) -> None:
        self.module.__dict__.pop("get_image_features", None)


@register_adapter("llava-next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`): prunes each image's packed crops before the LLM."""

    shares_encodings: ClassVar[bool] = False

    model_class: ClassVar[str] = "LlavaNextForConditionalGeneration"
    places: ClassVar[tuple[str, ...]] = ("projector", "llm")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import LlavaNextForConditionalGeneration

        return isinstance(model, LlavaNextForConditionalGeneration)

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the [CLS] probe on the blocks scorers read (every crop), and the sequence rewrite
        before the LLM, which prunes the packed features."""
        self._pipeline, self._run, self._prefill, self._encoded = pipeline, run, None, None
        self._info = self.info()
        if self.features_keep_cls() and self._info.has_cls:
            raise InputError(
                f"the {self.name} adapter needs vision_feature_select_strategy='default' (crops without [CLS])"
            )
        self._projector_stages = [s for s in pipeline.stages if s.place.kind == "projector"]
        signals, unknown = split_vision_signals(required_signals(self._projector_stages, self._info))
        if unknown:
            raise SignalError(f"the llava-next adapter cannot provide {unknown} before the LLM")
        encoder = _encoder_layers(self.core.vision_tower)
        self._probe = VisionProbe({s.layer: encoder[s.layer].self_attn for s in signals}, signals, self._info.has_cls)
        language_model = self.core.language_model
        self._encoder = None
        self._decoders = [
            DecoderStage(language_model.layers, language_model.norm, s, self._info)
            for s in pipeline.stages
            if s.place.kind == "llm"
        ]
        for before, after in zip(self._decoders, self._decoders[1:], strict=False):
            before.next = after
        self._calls = CallCapture(self.core)
        self._layouts: dict[tuple[int, ...], Tensor] = {}
        handles: list[Handle] = [*self._probe.attach(), self._calls]
        for decoder in self._decoders:
            handles += decoder.attach()
        return handles + self._core_hooks()

    def layout(self, image_sizes: Tensor, crops: list[int]) -> list[Tensor]:
        """Per image, `[n_i]` long: the `crop * P + patch` of each packed token (crops numbered
        across the batch, base image first), `-1` for newline tokens. `crops[i]`: crops of image i.

        HF's packing runs on three channels, crop and patch row and column; where it interpolates
        (LLaVA-OneVision's large images), a token's provenance is the nearest patch."""
        rows, cols = self._patch_grid()
        index = []
        for start, n in zip([sum(crops[:i]) for i in range(len(crops))], crops, strict=False):
            crop, row, col = torch.meshgrid(
                torch.arange(start, start + n), torch.arange(rows), torch.arange(cols), indexing="ij"
            )
            index.append(torch.stack([crop, row, col], dim=-1).flatten(1, 2).float().to(image_sizes.device))
        packed = self.pack(index, image_sizes, torch.full((3,), -1.0, device=image_sizes.device))
        out = []
        for tokens in packed:
            crop, row, col = tokens.round().long().unbind(-1)
            out.append(torch.where(crop < 0, -1, (crop * rows + row) * cols + col))
        return out

    def pack(self, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
        """HF's packing of per-image crop features `[crops, P, C]` with `newline` `[C]`."""
        return self.core.pack_image_features(features, image_sizes, "default", image_newline=newline)[0]

    def crops(self, sizes: Tensor, arguments: dict[str, Any]) -> list[int]:
        """Crops the tower encoded per image (anyres tiles plus the base image)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(
                image_size=s,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for s in sizes.tolist()
        ]

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the images unless `generate` already did, prune each image's packed tokens, then
        shorten the prompt to what is kept."""
        self._refuse_feature_overrides(kw)
        arguments = kw if kw.get("image_sizes") is not None else self._calls.arguments
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise InputError(f"{self.model_class} inputs need image_sizes (as the model's processor returns them)")
        if encoded is None:
            extra = {k: kw[k] for k in ("batch_num_images",) if kw.get(k) is not None}
            encoded = self.core.get_image_features(
                pixel_values=kw["pixel_values"], image_sizes=sizes, return_dict=True, **extra
            )
        packed = list(getattr(encoded, "pooler_output", encoded))
        vision = self.config.vision_config
        crops = self.crops(sizes, arguments)
        probe = require_state(self._probe, "the vision probe")
        signals = {s: v.flatten(0, 1) for s, v in probe.values().items()}  # [C * P] or [C * P, d]
        stage = self._projector_stages[0] if self._projector_stages else None
        model_info = require_state(self._info, "the model info")
        info, deferred = replace(model_info, grid=None), list[DeferredCheck]()
        firsts = [sum(crops[:i]) for i in range(len(crops))]
        groups: dict[tuple[int, ...], list[int]] = {}  # images of one size and crop count share a layout
        for i, (size, n_crops) in enumerate(zip(sizes.tolist(), crops, strict=False)):
            groups.setdefault((*size, n_crops), []).append(i)
        results: list[Any] = [None] * len(packed)
        for key, members in groups.items():
            if key not in self._layouts:  # a layout depends on size and crop count only: built once per context
                self._layouts[key] = self.layout(sizes[members[:1]], crops[members[0] : members[0] + 1])[0]
            where = self._layouts[key]  # crops numbered from the image's first
            outputs = self._prune_group(
                stage,
                info,
                torch.stack([packed[i] for i in members]),
                where,
                crops[members[0]],
                [firsts[i] for i in members],
                signals,
                deferred,
            )
            for i, result in zip(members, outputs, strict=False):
                results[i] = result
        self._refuse_unequal_images([len(r["kept"]) for r in results], "patch tokens")
        comp, new_ids, new_image_mask, new_mask, image_sample = self._rewrite_per_image(
            kw, placeholders, results, deferred
        )
        rows, cols = self._patch_grid()
        tokens_per_crop = rows * cols + int(model_info.has_cls)
        text = self.config.text_config
        self._record = ForwardRecord(
            stages=self._per_image_record(stage, results, image_sample),
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
            scoring_flops=sum(signal_flops(s, tokens_per_crop, vision.hidden_size) for s in probe.signals)
            * sum(crops)
            / kw["inputs_embeds"].shape[0],
            vision_tokens=[tokens_per_crop] * model_info.vision_layers,
            vision_shape=(vision.hidden_size, vision.intermediate_size, tokens_per_crop),
        )
        require_state(self._run, "the run").record(self._record)
        if self._decoders:  # the kept patch tokens are the image tokens; newline tokens stay like text
            columns = new_image_mask.nonzero()[:, 1][torch.cat([r["patch_kept"] for r in results])]
            self._begin_decoders(
                columns.view(len(results), -1),
                image_sample,
                torch.stack([r["kept"] for r in results]),
                new_ids,
                new_mask,
            )
        return kw

    def _prune_group(
        self,
        stage: Any,
        info: Any,
        tokens: Tensor,
        where: Tensor,
        n_crops: int,
        firsts: list[int],
        signals: dict[Any, Tensor],
        deferred: list[DeferredCheck],
    ) -> list[dict[str, Any]]:
        """Run `stage` on `G` images of one layout: packed `tokens` `[G, n, D]`, `where` `[n]` their
        `crop * P + patch` counted from the image's first crop (`-1` at newlines), `firsts` each
        image's first crop in the batch. Per image: the kept slots `[n]`, the kept tokens in packed
        order, its tokens in, and the trace's kept provenance, weights and scores."""
        rows, cols = self._patch_grid()
        patches = rows * cols
        patch = (where >= 0).nonzero()[:, 0]  # packed positions of patch tokens
        ids = where[patch][None] + torch.tensor(firsts, device=where.device)[:, None] * patches  # [G, m]
        local = {s: v[ids] for s, v in signals.items()}
        if stage is None:  # only llm:K stages: every image token reaches the LLM
            index = torch.arange(len(patch), device=tokens.device).expand(tokens.shape[0], -1)
            reduction, scores = Reduction.drop(tokens[:, patch], index), None
        else:
            reduction, scores = run_stage(stage, tokens[:, patch], info, local, deferred)
        kept_at = patch[reduction.index]  # [G, k] packed positions
        newline = where < 0
        row = newline.long().cumsum(0) - newline.long()  # each token's grid row (its newline's index)
        if n_crops > 1:
            row = row.masked_fill((where >= 0) & (where < patches), -1)  # the base image has no rows
        kept = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device).scatter_(1, kept_at, True)
        rows_hit = torch.zeros(tokens.shape[0], len(where) + 1, dtype=torch.bool, device=tokens.device)
        rows_hit.scatter_(1, row[kept_at] + 1, True)  # column 0 collects the base image's tokens
        kept[:, newline] |= rows_hit[:, row[newline] + 1]
        out = tokens.clone()
        out.scatter_(1, kept_at[..., None].expand(-1, -1, tokens.shape[-1]), reduction.tokens.to(out.dtype))
        features = out[kept].split(kept.sum(1).tolist())
        counts = reduction.row_counts()  # a ragged row's padding repeats its last output: the scatters above hold
        return [
            {
                "slots": kept[g],
                "features": features[g],
                "tokens_in": len(patch),
                "patch_kept": (where >= 0)[kept[g]],
                "kept": ids[g][reduction.index[g, : counts[g]]],
                "weights": None if reduction.weights is None else reduction.weights[g, : counts[g]],
                "scores": None if scores is None else scores[g],
            }
            for g in range(tokens.shape[0])
        ]
