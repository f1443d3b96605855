"""Qwen2-VL / Qwen2.5-VL adapter: prunes each image's merged tokens (after the 2x2 patch merger)
before the LLM; kept tokens keep their original 3D (M-RoPE) position ids.

* No [CLS] token: [CLS]-based scorers are refused (no substitute score is made up); score-free
  selectors (`divprune`, `tome`, `pool`, `uniform`) and `random` run. Grid selectors use each image's
  merged grid (`h/2 x w/2` for a single frame).
* Budget per image: `k` tokens, a ratio of the image's merged tokens, or a budget rule on its
  scores; images of one grid run as one batch.
* Positions: the model's own `get_rope_index` over the full prompt, gathered at the kept columns
  (or `generate`'s own position ids, gathered likewise); later tokens continue at their original
  position plus the row's M-RoPE delta. The `positions` option of `tp.apply` does not apply: M-RoPE
  positions are always the original ones.
* Places: `projector` and `llm:K`. The decoder layers get M-RoPE already combined into their rotary
  tables, so FastV, DART and VTW run as on LLaMA; an `llm:K` stage needs every image to reach it
  with the same number of tokens (images of one size, or a projector stage with an integer budget),
  else it is refused. Vision signals need Qwen's fused `qkv` projections in the probe: not there
  yet, refused clearly.

`generate` encodes the images before its first forward and drops `image_grid_thw`; it is recorded
from the core's `get_image_features` as for LLaVA-NeXT (`CallCapture`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InputError, SignalError
from ..execute import required_signals, run_stage
from ..pipeline import Pipeline
from ..reduction import Reduction
from ..registry import register_adapter
from ..strategy import DeferredCheck, ModelInfo
from ..trace import ForwardRecord
from .base import Handle, require_state
from .decoder import DecoderStage
from .llava import LlavaAdapter, Placeholders
from .llava_next import CallCapture
from .sequence import Compaction

if TYPE_CHECKING:
    from ..apply import Run


@register_adapter("qwen2-vl")
class Qwen2VLAdapter(LlavaAdapter):
    """Qwen2-VL and Qwen2.5-VL: prunes each image's merged tokens before the LLM, M-RoPE positions kept."""

    shares_encodings: ClassVar[bool] = False

    model_class: ClassVar[str] = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"
    places: ClassVar[tuple[str, ...]] = ("projector", "llm")
    feature_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

        return isinstance(model, Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration)

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        super().__init__(model, positions)
        self.positions = "original"  # M-RoPE: kept tokens always keep their original 3D positions
        self._deltas: Tensor | None = None  # [B, 1] each row's M-RoPE delta, set by the prefill

    def info(self) -> ModelInfo:
        return ModelInfo(
            vision_layers=len(self.core.visual.blocks),
            feature_layer=len(self.core.visual.blocks) - 1,
            has_cls=False,
            grid=None,
            llm_layers=self.config.text_config.num_hidden_layers,
        )

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the sequence rewrite before the LLM (which prunes the merged image tokens)."""
        self._pipeline, self._run, self._prefill, self._encoded = pipeline, run, None, None
        self._info = self.info()
        self._projector_stages = [s for s in pipeline.stages if s.place.kind == "projector"]
        signals = required_signals(self._projector_stages, self._info)
        if signals:
            raise SignalError(
                f"the qwen2-vl adapter provides no vision signals yet (asked for {sorted(map(repr, signals))}); "
                "use score-free selectors (divprune, tome, pool, uniform) or random"
            )
        language_model = self.core.language_model
        self._decoders = [
            DecoderStage(language_model.layers, language_model.norm, s, self._info)
            for s in pipeline.stages
            if s.place.kind == "llm"
        ]
        for before, after in zip(self._decoders, self._decoders[1:], strict=False):
            before.next = after
        self._encoder, self._deltas = None, None
        self._calls = CallCapture(self.core)
        handles: list[Handle] = [self._calls]
        for decoder in self._decoders:
            handles += decoder.attach()
        return handles + self._core_hooks()

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the images unless `generate` already did, prune each image's merged tokens (images
        of one grid together), then shorten the prompt, M-RoPE positions kept."""
        grid = self._image_grid(kw)
        if encoded is None:
            encoded = self.core.get_image_features(
                pixel_values=kw["pixel_values"], image_grid_thw=grid, return_dict=True
            )
        packed = list(getattr(encoded, "pooler_output", encoded))
        ids, mask = kw["input_ids"], kw.get("attention_mask")
        types = kw.get("mm_token_type_ids")
        types = types if types is not None else (ids == self.config.image_token_id).int()
        positions, self._deltas = self.core.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
        if kw.get("position_ids") is None:
            kw["position_ids"] = positions
        merge = self.core.visual.spatial_merge_size
        groups: dict[tuple[int, ...], list[int]] = {}  # images of one merged grid run as one batch
        for i, (t, h, w) in enumerate(grid.tolist()):
            groups.setdefault((t, h // merge, w // merge), []).append(i)
        stage = self._projector_stages[0] if self._projector_stages else None
        model_info = require_state(self._info, "the model info")
        deferred: list[DeferredCheck] = []
        found: dict[int, dict[str, Any]] = {}  # per image, by its index in the prompt
        for (t, rows, cols), members in groups.items():
            info = replace(model_info, grid=(rows, cols) if t == 1 else None)
            tokens = torch.stack([packed[i] for i in members])
            if stage is None:  # only llm:K stages: every image token reaches the LLM
                index = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
                reduction, scores = Reduction.drop(tokens, index), None
            else:
                reduction, scores = run_stage(stage, tokens, info, {}, deferred)
            slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device).scatter_(
                1, reduction.index, True
            )
            counts = reduction.row_counts()  # a ragged row's padding repeats a kept index: the scatter holds
            for g, i in enumerate(members):
                found[i] = {
                    "slots": slots[g],
                    "features": reduction.tokens[g, : counts[g]],
                    "kept": reduction.index[g, : counts[g]],
                    "weights": None if reduction.weights is None else reduction.weights[g, : counts[g]],
                    "scores": None if scores is None else scores[g],
                    "tokens_in": tokens.shape[1],
                }
        results = [found[i] for i in range(len(packed))]
        self._refuse_unequal_images([len(r["kept"]) for r in results], "tokens")
        comp, new_ids, new_image_mask, new_mask, image_sample = self._rewrite_per_image(
            kw, placeholders, results, deferred
        )
        if kw.get("mm_token_type_ids") is not None:
            kw["mm_token_type_ids"] = comp.gather(kw["mm_token_type_ids"])
        text = self.config.text_config
        self._record = ForwardRecord(
            stages=self._per_image_record(stage, results, image_sample),
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
        )
        require_state(self._run, "the run").record(self._record)
        if self._decoders:
            columns = new_image_mask.nonzero()[:, 1].view(len(results), -1)
            self._begin_decoders(columns, image_sample, torch.stack([r["kept"] for r in results]), new_ids, new_mask)
        return kw

    def _image_grid(self, kw: dict[str, Any]) -> Tensor:
        """The prefill's `image_grid_thw` `[I, 3]`: from its kwargs, or recorded from `generate`'s
        own encoding (which drops it from the forward's kwargs).

        Raises:
            InputError: there is none, or the prompt holds videos.
        """
        grid = kw.get("image_grid_thw")
        grid = grid if grid is not None else self._calls.arguments.get("image_grid_thw")
        if grid is None:
            raise InputError(f"{self.name} inputs need image_grid_thw (as the model's processor returns them)")
        if kw.get("pixel_values_videos") is not None:
            raise InputError(f"the {self.name} adapter prunes images; videos are not supported yet")
        return grid

    def _prefill_positions(self, kw: dict[str, Any], comp: Compaction) -> Tensor:
        """The prompt's M-RoPE ids `[R, B, P]` (R = 3, or 4 with generate's text row) at the kept columns."""
        positions = kw["position_ids"]
        index = comp.source[None].expand(positions.shape[0], -1, -1)
        return positions.gather(2, index).masked_fill(~comp.valid[None], 0)

    def _decode_positions(self, mask: Tensor | None, start: int, step: int) -> Tensor:
        """`[3, B, step]`: each row's text position (counted on its original mask, as HF counts it,
        padding excluded) plus its M-RoPE delta."""
        batch = require_state(self._prefill, "the prefill").compaction.source.shape[0]
        deltas = require_state(self._deltas, "the M-RoPE deltas")
        if mask is not None:
            text = (mask.long().cumsum(-1) - 1)[:, -step:].to(deltas.device)
        else:
            text = (torch.arange(step, device=deltas.device) + start)[None].expand(batch, -1)
        return (text + deltas.view(batch, 1))[None].expand(3, -1, -1)
