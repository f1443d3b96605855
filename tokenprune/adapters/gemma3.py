"""Gemma 3 adapter (`Gemma3ForConditionalGeneration`): prunes each image's pooled soft tokens before the LLM.

* Tower: SigLIP, no [CLS]. [CLS]-based scorers (`vtc-cls`, `vtc-cls-ensemble`, `fastervlm`,
  `prumerge`, `visionzip`) are refused, naming what runs instead: score-free selectors (`divprune`,
  `tome`, `pool`, `uniform`), `random`, and `fopru` (patch-to-patch attention, no [CLS] needed).
* Projector: average-pools the patch grid (e.g. 64x64 -> 16x16 = 256 soft tokens), then norms and
  projects. The `projector` stage runs on its output, the soft tokens `[I, T, D]` on their
  `tokens x tokens` grid: a kept token is a soft token, its provenance in the trace is its soft
  token index (`PooledGrid.window` gives its patches). Vision signals are computed per patch by the
  usual probe, then averaged over each soft token's pooling window (`PooledGrid.pool`).
* LLM mask: an image's tokens attend to each other in both directions, read by HF from
  `token_type_ids`. The prompt rewrite shortens `token_type_ids` with the prompt, so HF builds
  that mask over the kept image tokens (padding added by the rewrite is text, type 0), on its
  sliding-window layers too.
* Places: `projector` only. A stage inside the tower would break the pooled grid. `llm:K` is
  refused: Gemma's decoder normalises queries and keys (`q_norm`, `k_norm`) and mixes sliding-window
  layers (whose caches keep a window, not the prompt) with global ones, and the `llm:K` machinery
  assumes neither.

`generate` with a static cache (`cache_implementation="static"`) hands the core a per-layer-type
mask mapping, which cannot be remapped: refused. `generate` encodes the images before its first
forward (`mm_encoder_outputs`) with the probe's hooks in place; a prefill given features encoded
outside the context cannot get the signals its scorer reads and is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import InputError, PlaceError, SignalError
from ..execute import required_signals, run_stage
from ..flops import signal_flops
from ..pipeline import Pipeline
from ..reduction import Reduction
from ..registry import register_adapter
from ..strategy import DeferredCheck, ModelInfo
from ..trace import ForwardRecord
from .base import Handle, require_state
from .llava import LlavaAdapter, Placeholders, _encoder_layers
from .pooled import PooledGrid
from .vision import VisionProbe, split_vision_signals

if TYPE_CHECKING:
    from ..apply import Run

_NO_LLM = (
    "llm:K stages are not supported on Gemma 3: its decoder normalises queries and keys (q_norm, k_norm) "
    "and its sliding-window layers cache a window, not the prompt, which tokenprune's llm:K stages do not "
    "model; prune at the projector (e.g. fopru@64, divprune@64, pool@64)"
)

_MASK_MAPPING = (
    "Gemma 3 received a per-layer-type attention mask mapping (generate builds one for static caches, "
    "cache_implementation='static'), which tokenprune cannot remap onto the compressed prompt; inside "
    "tokenprune.apply use the default dynamic cache and a 2D attention mask"
)


@register_adapter("gemma3")
class Gemma3Adapter(LlavaAdapter):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): prunes each image's pooled soft tokens before the LLM,
    the bidirectional image mask kept over the kept tokens."""

    model_class: ClassVar[str] = "Gemma3ForConditionalGeneration"
    places: ClassVar[tuple[str, ...]] = ("projector",)
    feature_keys: ClassVar[tuple[str, ...]] = ()
    shares_encodings: ClassVar[bool] = False

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import Gemma3ForConditionalGeneration

        return isinstance(model, Gemma3ForConditionalGeneration)

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        super().__init__(model, positions)
        self.grid = PooledGrid.from_config(self.config)
        self._fresh = False  # whether the tower ran since the last prefill (the probe holds this one's signals)

    def info(self) -> ModelInfo:
        depth = len(_encoder_layers(self.core.vision_tower))
        return ModelInfo(
            vision_layers=depth,
            feature_layer=depth - 1,
            feature_index=-1,
            has_cls=False,
            grid=(self.grid.tokens, self.grid.tokens),
            llm_layers=self.config.text_config.num_hidden_layers,
        )

    def check(self, pipeline: Pipeline) -> None:
        if any(s.place.kind == "llm" for s in pipeline.stages):
            raise PlaceError(_NO_LLM)
        super().check(pipeline)

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the patch-attention probe on the blocks scorers read, and the sequence rewrite
        before the LLM, which prunes the soft tokens."""
        self._pipeline, self._run, self._prefill, self._encoded = pipeline, run, None, None
        self._info = self.info()
        self._projector_stages = [s for s in pipeline.stages if s.place.kind == "projector"]
        signals, unknown = split_vision_signals(required_signals(self._projector_stages, self._info))
        if unknown:
            raise SignalError(f"the gemma3 adapter cannot provide {unknown} before the LLM")
        encoder = _encoder_layers(self.core.vision_tower)
        self._probe = VisionProbe({s.layer: encoder[s.layer].self_attn for s in signals}, signals, has_cls=False)
        self._encoder, self._decoders, self._fresh = None, [], False
        tower = self.core.vision_tower.register_forward_hook(lambda *_: setattr(self, "_fresh", True))
        return [*self._probe.attach(), tower, *self._core_hooks()]

    def _read_placeholders(self, kw: dict[str, Any]) -> Placeholders:
        """As for LLaVA, refusing the mask mapping Gemma's `generate` builds for static caches.

        Raises:
            InputError: the attention mask is a mapping of per-layer-type masks.
        """
        if isinstance(kw.get("attention_mask"), dict):
            raise InputError(_MASK_MAPPING)
        return super()._read_placeholders(kw)

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the images unless `generate` already did, prune each image's soft tokens, then
        shorten the prompt and its `token_type_ids`."""
        if encoded is None:
            encoded = self.core.get_image_features(pixel_values=kw["pixel_values"], return_dict=True)
        tokens = getattr(encoded, "pooler_output", encoded)  # [I, T, D]
        tokens = torch.stack(list(tokens)) if isinstance(tokens, list | tuple) else tokens
        probe = require_state(self._probe, "the vision probe")
        patch_signals, fresh, self._fresh = probe.values(), self._fresh, False
        if probe.signals and not fresh:  # the probe holds an earlier encoding's signals, or none
            raise InputError(
                "the scorer reads vision signals, but these image features were not encoded inside "
                "tokenprune.apply; pass pixel_values (or let generate encode them) inside the context"
            )
        stage = self._projector_stages[0] if self._projector_stages else None
        info = require_state(self._info, "the model info")
        deferred: list[DeferredCheck] = []
        if stage is None:
            index = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
            reduction, scores = Reduction.drop(tokens, index), None
        else:
            reduction, scores = run_stage(stage, tokens, info, self.grid.pool_signals(patch_signals), deferred)
        slots = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        slots.scatter_(1, reduction.index, True)  # a ragged row's padding repeats a kept index: the scatter holds
        counts = reduction.row_counts()
        results = [
            {
                "slots": slots[i],
                "features": reduction.tokens[i, : counts[i]],
                "kept": reduction.index[i, : counts[i]],
                "weights": None if reduction.weights is None else reduction.weights[i, : counts[i]],
                "scores": None if scores is None else scores[i],
                "tokens_in": tokens.shape[1],
            }
            for i in range(tokens.shape[0])
        ]
        comp, _, _, _, image_sample = self._rewrite_per_image(kw, placeholders, results, deferred)
        if kw.get("token_type_ids") is not None:  # HF builds the bidirectional image mask from them
            kw["token_type_ids"] = comp.gather(kw["token_type_ids"])
        text, vision = self.config.text_config, self.config.vision_config
        patches = self.grid.n_patches
        self._record = ForwardRecord(
            stages=self._per_image_record(stage, results, image_sample),
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
            scoring_flops=sum(signal_flops(s, patches, vision.hidden_size) for s in probe.signals)
            * tokens.shape[0]
            / kw["inputs_embeds"].shape[0],
            vision_tokens=[patches] * info.vision_layers,
            vision_shape=(vision.hidden_size, vision.intermediate_size, patches),
        )
        require_state(self._run, "the run").record(self._record)
        return kw
