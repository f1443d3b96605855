"""LLaVA-1.5 adapter (`LlavaForConditionalGeneration`): CLIP-style tower with [CLS], MLP projector,
decoder-only LLM; each image is a block of placeholder tokens in `input_ids`."""

from __future__ import annotations

import inspect
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..compat import cache_of, full_attention_mask
from ..errors import InputError, ScoreError, SignalError
from ..execute import required_signals, run_stage
from ..flops import signal_flops
from ..pipeline import Pipeline, Stage
from ..registry import register_adapter
from ..signals import Signal
from ..strategy import DeferredCheck, ModelInfo, raise_deferred
from ..trace import ForwardRecord, StageRecord
from .base import Encoding, Handle, ModelAdapter, require_state
from .decoder import DecoderStage, ImageLayout
from .encoder import EncoderStages, check_signal_blocks, current_grid
from .sequence import Compaction, compact
from .vision import VisionProbe, split_vision_signals

if TYPE_CHECKING:
    from ..apply import Run


@dataclass(frozen=True)
class _Prefill:
    """What later forwards of the same generation need to know about a compressed prefill."""

    compaction: Compaction
    attention_mask: Tensor | None  # [B, P'] as given to the LLM
    prompt_mask: Tensor | None  # [B, P] the original prompt's 2D mask


@dataclass(frozen=True)
class Placeholders:
    """A prompt's image placeholders: each row's count read from the device when the prefill starts
    (a batch of several prompts), or not read at all (a single prompt: they are its images'
    blocks, which is checked after the LM head is launched)."""

    mask: Tensor  # [B, P] bool, the placeholder columns
    per_row: list[int] | None  # placeholders in each batch row; None: not read (a single prompt)
    key_mask: Tensor | None  # [B, P] the prompt's 2D attention mask (the one behind a 4D mask), or None
    causal: Tensor | None  # 0-dim bool, whether a 4D mask was causal; None: read already, or no 4D mask


_LATER_CHUNK = "images after the first chunk of a cached prompt are not supported"
_CUSTOM_MASK = (
    "tokenprune maps 2D masks and the causal 4D masks generate builds for static caches; this 4D "
    "attention mask is neither, so it cannot be remapped onto the compressed prompt"
)


def _encoder_layers(vision_tower: Any) -> nn.ModuleList:
    """The blocks of an HF vision tower (`vision_tower`: its submodules are read by name, untyped)."""
    return getattr(vision_tower, "vision_model", vision_tower).encoder.layers


def _has_cls(vision_tower: Any) -> bool:
    embeddings = getattr(vision_tower, "vision_model", vision_tower).embeddings
    return getattr(embeddings, "class_embedding", None) is not None


def _key_mask(mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The 2D key mask `[B, length]` (1 = attend) behind a causal 4D mask `[B, 1, q, L]`, as
    `generate` builds them for static caches (its last query row sees every earlier valid key),
    and a 0-dim bool tensor: whether the 4D mask is that causal-with-padding mask (read by the
    caller at its host sync; a custom mask cannot be remapped)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    key = allowed[:, 0, -1, :length]
    q, width = allowed.shape[2], allowed.shape[3]
    causal = (
        torch.arange(width, device=mask.device)[None] <= torch.arange(length - q, length, device=mask.device)[:, None]
    )
    expected = causal[None] & torch.nn.functional.pad(key, (0, width - length))[:, None, :]
    real = key[:, length - q :, None]  # queries that are tokens, not padding
    return key.long(), ((allowed[:, 0] == expected) | ~real).all()


_NO_IMAGE_TOKEN = (
    "a prompt without the image token (e.g. '<image>' for LLaVA) cannot take pixel_values: put the token "
    "where the image goes (the processor expands it), or drop pixel_values"
)


def _image_rows(per_row: list[int], blocks: list[int]) -> list[int]:
    """The batch row of each image, from the placeholders per row and per image (prompt order).

    Raises:
        InputError: the counts disagree, or an image's placeholders span two rows.
    """
    if sum(per_row) != sum(blocks):
        raise InputError(
            f"the prompt holds {sum(per_row)} image tokens but its {len(blocks)} image(s) need "
            f"{sum(blocks)} ({', '.join(map(str, blocks))}); build inputs with the model's processor"
            + (f"; {_NO_IMAGE_TOKEN}" if not sum(per_row) else "")
        )
    ends, rows, start = list(accumulate(per_row)), [], 0
    for i, block in enumerate(blocks):
        row = bisect_right(ends, start)
        if start + block > ends[row]:
            raise InputError(
                f"image {i}'s {block} placeholder tokens start in batch row {row} and run past its end; "
                "each image's placeholders must sit in one row, as the model's processor builds them"
            )
        rows.append(row)
        start += block
    return rows


@register_adapter("llava")
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): prunes inside the vision encoder, before the
    projector and inside the LLM."""

    model_class: ClassVar[str] = "LlavaForConditionalGeneration"
    places: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm")
    ragged_places: ClassVar[tuple[str, ...]] = ("projector",)
    feature_keys: ClassVar[tuple[str, ...]] = ("vision_feature_layer", "vision_feature_select_strategy")
    """Config fields that shape the image features; per-call overrides of them are refused."""
    shares_encodings: ClassVar[bool] = True
    """Whether the projector's input alone, fed back through `mm_encoder_outputs`, reproduces a forward
    (no packing after the projector); families that pack crops set it False."""

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        super().__init__(model, positions)
        core: Any = model.model  # the HF core model: its submodules and methods are untyped
        self.core: Any = core
        self.config: Any = model.config
        self._forward_params = list(inspect.signature(core.forward).parameters)
        self._prefill: _Prefill | None = None
        self._encoded: dict[str, Any] | None = None
        self._pipeline: Pipeline | None = None
        self._run: Run | None = None
        self._probe: VisionProbe | None = None
        self._info: ModelInfo | None = None
        self._projector_stages: list[Stage] = []
        self._encoder: EncoderStages | None = None
        self._decoders: list[DecoderStage] = []
        self._record: ForwardRecord | None = None
        self._unread: list[DeferredCheck] = []
        self._in_model = False  # the core runs inside the whole model's forward
        self._shared: Mapping[Signal, Tensor] | None = None  # signals of a reused `Encoding`

    def features_keep_cls(self) -> bool:
        """Whether the projector's input starts with the [CLS] feature (`vision_feature_select_strategy="full"`);
        a subclass for a family that always drops it returns False."""
        return self.config.vision_feature_select_strategy == "full"

    def _feature_blocks(self) -> list[int]:
        """The blocks whose outputs the projector reads (`-1`: the embeddings)."""
        layer = self.config.vision_feature_layer
        depth = len(_encoder_layers(self.core.vision_tower))
        # hidden_states[h] is the output of block h - 1 (hidden_states[0]: the embeddings)
        return [(h % (depth + 1)) - 1 for h in ([layer] if isinstance(layer, int) else layer)]

    def info(self) -> ModelInfo:
        depth = len(_encoder_layers(self.core.vision_tower))
        blocks = self._feature_blocks()
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        return ModelInfo(
            vision_layers=depth,
            feature_layer=max(blocks) if max(blocks) >= 0 else None,
            feature_index=layers[blocks.index(max(blocks))],
            has_cls=_has_cls(self.core.vision_tower),
            grid=(side, side),
            llm_layers=self.config.text_config.num_hidden_layers,
        )

    def _patch_grid(self) -> tuple[int, int]:
        """The patch grid `(rows, cols)` of one image (or crop) in the attached model's tower."""
        return require_state(require_state(self._info, "the model info").grid, "the patch grid")

    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the [CLS] probe on the blocks scorers read, pruning before the projector (so any
        image encoding inside the context is compressed), and the sequence rewrite before the LLM."""
        self._pipeline, self._run, self._prefill, self._encoded = pipeline, run, None, None
        info = self.info()
        vision_stages = [s for s in pipeline.stages if s.place.kind == "vision"]
        self._projector_stages = [s for s in pipeline.stages if s.place.kind == "projector"]
        llm_stages = [s for s in pipeline.stages if s.place.kind == "llm"]
        check_signal_blocks(vision_stages + self._projector_stages, info, min(self._feature_blocks()))
        signals, unknown = split_vision_signals(required_signals(vision_stages + self._projector_stages, info))
        if unknown:
            raise SignalError(
                f"the llava adapter cannot provide {unknown} in the vision encoder or before the projector"
            )
        encoder = _encoder_layers(self.core.vision_tower)
        self._probe = VisionProbe({s.layer: encoder[s.layer].self_attn for s in signals}, signals)
        self._info = info
        handles: list[Handle] = list(self._probe.attach())
        self._encoder = EncoderStages(encoder, vision_stages, info, self._probe) if vision_stages else None
        if self._encoder is not None:
            handles += self._encoder.attach()
        language_model = self.core.language_model
        self._decoders = [DecoderStage(language_model.layers, language_model.norm, s, info) for s in llm_stages]
        for before, after in zip(self._decoders, self._decoders[1:], strict=False):
            before.next = after
        for decoder in self._decoders:
            handles += decoder.attach()
        return handles + [
            self.core.multi_modal_projector.register_forward_pre_hook(self._prune_features),
            *self._core_hooks(),
        ]

    def _core_hooks(self) -> list[Handle]:
        """The hooks every LLaVA-family adapter sets on the model and its core: labels refused,
        the prompt rewritten before the core runs, the prefill's deferred checks read after the
        LM head has been launched (after the core, when the core is called on its own)."""
        return [
            self.model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.model.register_forward_hook(self._after_model, always_call=True),
            self.core.register_forward_pre_hook(self._before_core, with_kwargs=True),
            self.core.register_forward_hook(self._after_core),
        ]

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if kwargs.get("labels") is not None and kwargs.get("pixel_values") is not None:
            raise InputError(
                "labels are not supported inside tokenprune.apply: the LLM sees a shorter sequence "
                "than the labels describe; compute losses outside the context"
            )
        self._in_model = True

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Runs after every forward of the whole model, also one that raised (`output` None)."""
        self._in_model = False
        if output is None:
            self._unread = []
        else:
            self._read_checks()

    def _after_core(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._in_model:
            self._read_checks()

    def _prune_features(self, module: nn.Module, args: tuple) -> tuple:
        """Projector pre-hook: run the stages on the tower's features `[I, N(+1), D]`."""
        features = args[0]
        full = self.features_keep_cls()
        tokens = features[:, 1:] if full else features
        probe, model_info = require_state(self._probe, "the vision probe"), require_state(self._info, "the model info")
        signals = dict(self._shared) if self._shared is not None else probe.values()
        encoded = self._encoder.state if self._encoder is not None else None
        origin = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        # NaN checks read after the LM head has been launched, not here; those of an encoding no
        # prefill consumed (`get_image_features` called alone) go with this one's, or to `finish`
        records: list[tuple[Any, ...]] = []  # per stage: stage, tokens in, k, origin, weights, scores, counts
        deferred = list(self._encoded["deferred"]) if self._encoded is not None else []
        if encoded is not None:
            origin, deferred = encoded.origin, deferred + list(encoded.deferred)
            records = [
                (stage, n_in, r.k, kept, r.weights, scores, None) for stage, n_in, r, scores, kept in encoded.records
            ]
        counts = None  # per image, when a budget rule left images with different counts
        for stage in self._projector_stages:
            n_in = tokens.shape[1]
            info = replace(model_info, grid=current_grid(model_info, n_in))
            reduction, scores = run_stage(stage, tokens, info, signals, deferred)
            origin = origin.gather(1, reduction.index)
            records.append((stage, n_in, reduction.k, origin, reduction.weights, scores, reduction.counts))
            tokens, counts = reduction.tokens, reduction.counts
        slots = origin
        if full:
            tokens = torch.cat([features[:, :1], tokens], dim=1)
            slots = torch.cat([torch.zeros_like(origin[:, :1]), origin + 1], dim=1)
        vision = self.config.vision_config
        rows, cols = self._patch_grid()
        block_tokens = (
            self._encoder.tokens_per_block()
            if self._encoder is not None
            else [rows * cols + 1] * model_info.vision_layers
        )
        scoring = sum(signal_flops(s, block_tokens[s.layer], vision.hidden_size) for s in probe.signals)
        self._encoded = {
            "records": records,
            "slots": slots,
            "block": rows * cols + full,
            "origin": origin,
            "counts": counts,
            "scoring": scoring * features.shape[0],
            "vision_tokens": block_tokens,
            "vision_tokens_in": rows * cols + 1,
            "deferred": deferred,
        }
        return (tokens,) + tuple(args[1:])

    def shares_encoding(self, pipeline: Pipeline | None) -> bool:
        return (
            self.shares_encodings
            and "mm_encoder_outputs" in self._forward_params
            and (pipeline is None or all(s.place.kind != "vision" for s in pipeline.stages))
        )

    def encode(self, inputs: Mapping[str, Any], pipelines: Sequence[Pipeline | None]) -> Encoding | None:
        """The tower once on `inputs["pixel_values"]`: the projector's input, captured by a
        pre-hook, and every vision signal the sharing pipelines' projector stages read, from one
        `VisionProbe`."""
        sharing = [p for p in pipelines if self.shares_encoding(p)]
        if not sharing or inputs.get("pixel_values") is None:
            return None
        stages = [s for p in sharing if p is not None for s in p.stages if s.place.kind == "projector"]
        signals, unknown = split_vision_signals(required_signals(stages, self.info()))
        if unknown:
            return None
        encoder = _encoder_layers(self.core.vision_tower)
        probe = VisionProbe({s.layer: encoder[s.layer].self_attn for s in signals}, signals)
        captured: list[Tensor] = []
        handles = probe.attach() + [
            self.core.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        ]
        extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                self.core.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **extra)
        finally:
            for handle in handles:
                handle.remove()
        return Encoding(captured[0], probe.values(), time.perf_counter() - start)

    def reuse(self, encoding: Encoding, inputs: Mapping[str, Any], compress: bool = True) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if compress:
            if self._encoder is not None:
                raise InputError("a pipeline with stages inside the vision tower needs its own encoding")
            self._shared = encoding.signals
        try:
            features = self.core.multi_modal_projector(encoding.features)
        finally:
            self._shared = None
        # one tensor per image, as HF's own multi-image outputs hold them (typed there as one tensor)
        image = BaseModelOutputWithPooling(pooler_output=list(features))  # type: ignore[arg-type]
        return {k: v for k, v in inputs.items() if k != "pixel_values"} | {"mm_encoder_outputs": {"image": image}}

    def _before_core(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        kw = dict(zip(self._forward_params, args, strict=False)) | kwargs
        cache = cache_of(kw)
        past = cache.get_seq_length() if cache is not None else 0
        encoded = (kw.get("mm_encoder_outputs") or {}).get("image")
        if kw.get("pixel_values") is not None or encoded is not None:
            if kw.get("input_ids") is None:
                raise InputError(
                    "with images, tokenprune needs input_ids holding the image placeholder tokens "
                    "(as the processor builds them), not inputs_embeds"
                )
            first = []
            if isinstance(past, Tensor):  # a static cache counts on the device: checked after the LM head
                started = (past != 0).reshape(1)  # now: the prefill advances the cache's count in place
                first.append(DeferredCheck(lambda: started, _LATER_CHUNK, InputError))
            elif past:
                raise InputError(_LATER_CHUNK)
            kw = self._compress_prefill(kw, encoded, self._read_placeholders(kw))
            self._unread = first + self._unread
            return (), kw
        if self._prefill is not None and past > 0:
            for decoder in self._decoders:
                decoder.begin_decode()
            return (), self._continue(kw, past)
        self._prefill = None
        for decoder in self._decoders:
            decoder.reset()
        return None

    def finish(self) -> None:
        pending, self._encoded = self._encoded, None
        if pending is not None:
            raise_deferred(pending["deferred"])

    def _read_checks(self) -> None:
        """Read the prefill's deferred checks (scores without NaN, kept tokens in distinct slots, and
        a single prompt's `_unread_prompt_checks` and cache length) once the LM head has been
        launched, so that nothing between the vision tower and the LLM waits for the device. A
        failure raises before the forward returns."""
        if self._unread:
            checks, self._unread = self._unread, []
            raise_deferred(checks)

    def _read_placeholders(self, kw: dict[str, Any]) -> Placeholders:
        """Where the prompt's image placeholders are. A batch of several prompts needs each row's
        count on the host (to size the compressed batch): the prefill's one host sync before the
        LM head. A single prompt needs none.

        Raises:
            InputError: a 4D attention mask other than the causal-with-padding one `generate`
                builds for static caches (it cannot be remapped onto the compressed prompt).
        """
        input_ids: Tensor = kw["input_ids"]
        image_mask = input_ids == self.config.image_token_id
        key_mask, causal = full_attention_mask(kw.get("attention_mask")), None
        if key_mask is not None and key_mask.dim() == 4:
            key_mask, causal = _key_mask(key_mask, input_ids.shape[1])
        if input_ids.shape[0] == 1:
            return Placeholders(image_mask, None, key_mask, causal)
        per_row, *causal_read = raise_deferred([], image_mask.sum(dim=1), *([causal] if causal is not None else []))
        if causal_read and not causal_read[0]:
            raise InputError(_CUSTOM_MASK)
        return Placeholders(image_mask, [int(n) for n in per_row], key_mask, None)

    def _compress_prefill(self, kw: dict[str, Any], encoded: Any, placeholders: Placeholders) -> dict[str, Any]:
        """Encode the images (pruned by `_prune_features`) unless `generate` already did, then
        shorten the prompt to the kept image tokens."""
        self._refuse_feature_overrides(kw)
        if encoded is None:
            extra = {"image_sizes": kw["image_sizes"]} if kw.get("image_sizes") is not None else {}
            encoded = self.core.get_image_features(pixel_values=kw["pixel_values"], return_dict=True, **extra)
        if self._encoded is None:
            raise InputError("image features reached the LLM without passing the projector inside tokenprune.apply")
        pruned, self._encoded = self._encoded, None
        features = getattr(encoded, "pooler_output", encoded)
        features = torch.cat(list(features), dim=0) if isinstance(features, list | tuple) else features
        features = features.reshape(-1, features.shape[-1])

        slots, block = pruned["slots"], pruned["block"]
        n_images = slots.shape[0]
        slot_keep = torch.zeros(n_images, block, dtype=torch.bool, device=kw["input_ids"].device)
        slot_keep.scatter_(1, slots.to(slot_keep.device), True)  # a ragged row's padding repeats a kept slot
        extra = slots.shape[1] - pruned["origin"].shape[1]  # the [CLS] feature, when the projector keeps it
        counts = [slots.shape[1]] * n_images if pruned["counts"] is None else [c + extra for c in pruned["counts"]]
        if pruned["counts"] is not None:  # drop each image's padding rows
            rows = [i * slots.shape[1] + j for i, c in enumerate(counts) for j in range(c)]
            features = features[torch.tensor(rows, device=features.device)]
        batch = kw["input_ids"].shape[0]
        comp, new_ids, new_image_mask, mask, image_sample = self._rewrite_prompt(
            kw,
            placeholders,
            slot_keep.flatten(),
            features,
            [block] * n_images,
            counts,
            pruned["deferred"],
        )
        text, vision = self.config.text_config, self.config.vision_config
        self._record = ForwardRecord(
            stages=[
                StageRecord(
                    stage=stage.to_spec(),
                    at=stage.at,
                    tokens_in=n_in,
                    tokens_out=k,
                    kept=[row[:c] for row, c in zip(origin.unbind(0), out, strict=True)],
                    weights=None
                    if weights is None
                    else [row[:c] for row, c in zip(weights.unbind(0), out, strict=True)],
                    scores=None if scores is None else list(scores.unbind(0)),
                    image_sample=image_sample,
                    counts=None if ragged is None else [(n_in, c) for c in out],
                )
                for stage, n_in, k, origin, weights, scores, ragged in pruned["records"]
                for out in [ragged or [k] * origin.shape[0]]
            ],
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
            scoring_flops=pruned["scoring"] / batch,
            vision_tokens=pruned["vision_tokens"],
            vision_shape=(vision.hidden_size, vision.intermediate_size, pruned["vision_tokens_in"]),
        )
        require_state(self._run, "the run").record(self._record)
        if self._decoders:
            columns = new_image_mask.nonzero()[:, 1].view(n_images, -1)
            self._begin_decoders(
                columns[:, 1:] if columns.shape[1] > pruned["origin"].shape[1] else columns,
                image_sample,
                pruned["origin"],
                new_ids,
                mask,
            )
        return kw

    def _begin_decoders(
        self, positions: Tensor, image_sample: list[int], origin: Tensor, new_ids: Tensor, mask: Tensor | None
    ) -> None:
        """Tell the first `llm:K` stage where each image's tokens sit in the compressed prompt:
        `positions` `[I, n]` columns, `origin` `[I, n]` their provenance."""
        self._decoders[0].begin_prefill(
            ImageLayout(
                positions=positions,
                rows=torch.tensor(image_sample, device=positions.device),
                origin=origin,
                key_mask=mask.bool() if mask is not None else torch.ones_like(new_ids, dtype=torch.bool),
                record=self._record_llm_stage,
            )
        )

    def _refuse_unequal_images(self, reaching: list[int], what: str) -> None:
        """`llm:K` stages need every image to bring the same number of `what` (`reaching`, per image).

        Raises:
            InputError: they differ.
        """
        if self._decoders and len(set(reaching)) > 1:
            raise InputError(
                f"{self._decoders[0].stage.to_spec()!r}: llm:K stages on {self.name} need every image to reach "
                f"them with "
                f"the same number of {what}, but they bring {reaching}; use images of one size or a projector stage "
                "with an integer budget first"
            )

    @staticmethod
    def _per_image_record(
        stage: Stage | None, results: list[dict[str, Any]], image_sample: list[int]
    ) -> list[StageRecord]:
        """The trace record of a projector stage run image by image (`results`: per image `tokens_in`,
        `kept`, `weights`, `scores`); none when no stage ran."""
        if stage is None:
            return []
        counts = [(r["tokens_in"], len(r["kept"])) for r in results]
        return [
            StageRecord(
                stage=stage.to_spec(),
                at=stage.at,
                tokens_in=max(c[0] for c in counts),
                tokens_out=max(c[1] for c in counts),
                kept=[r["kept"] for r in results],
                weights=None if results[0]["weights"] is None else [r["weights"] for r in results],
                scores=None if results[0]["scores"] is None else [r["scores"] for r in results],
                image_sample=image_sample,
                counts=counts if len(set(counts)) > 1 else None,
            )
        ]

    def _refuse_feature_overrides(self, kw: dict[str, Any]) -> None:
        for key in self.feature_keys:
            if kw.get(key) is not None and kw[key] != getattr(self.config, key):
                raise InputError(
                    f"{key}={kw[key]!r} differs from the model config ({getattr(self.config, key)!r}); "
                    "per-call overrides are not supported inside tokenprune.apply: set it in the config"
                )

    def _rewrite_prompt(
        self,
        kw: dict[str, Any],
        placeholders: Placeholders,
        slot_keep: Tensor,
        features: Tensor,
        blocks: list[int],
        kept: list[int],
        deferred: list[DeferredCheck],
    ) -> tuple[Compaction, Tensor, Tensor, Tensor | None, list[int]]:
        """Shorten `kw`'s prompt to the kept image slots and put `features` in them; rewrites `kw`
        (embeddings, mask, positions, cache positions) and the decode state. Waits for nothing on
        the device: `deferred`, and the check that the kept slots are distinct, are read after the
        LLM has been launched (`_read_checks`).

        Args:
            placeholders: the prompt's placeholders (`_read_placeholders`).
            slot_keep: `[T]` bool over every image placeholder of the batch, in prompt order.
            features: `[M, D]` the kept image tokens, in prompt order (`M = sum(kept)`).
            blocks: placeholders per image, in prompt order (`sum(blocks) = T`).
            kept: kept tokens per image, in prompt order (each image's count of True in `slot_keep`).
            deferred: device-side checks of the images' pruning.
        Returns:
            the compaction, the new ids `[B, P']`, the new image mask `[B, P']`, the new
            attention mask, and the batch row of each image.

        Raises:
            InputError: the prompt's placeholders do not match the images.
        """
        input_ids: Tensor = kw["input_ids"]
        checks, per_row, image_mask = (
            self._unread_prompt_checks(placeholders, blocks),
            placeholders.per_row,
            placeholders.mask,
        )
        if per_row is None and input_ids.shape[1] < sum(blocks):  # too short to hold them, known on the host
            raise InputError(
                f"the prompt has {input_ids.shape[1]} tokens, too few to hold the {sum(blocks)} image tokens its "
                f"{len(blocks)} image(s) need; {_NO_IMAGE_TOKEN}"
            )
        counts = per_row if per_row is not None else [sum(blocks)]  # unread: one row holds every block
        image_sample = _image_rows(counts, blocks)
        lengths = [input_ids.shape[1] - n for n in counts]
        for row, n in zip(image_sample, kept, strict=True):
            lengths[row] += n
        features = features.to(input_ids.device, self.core.get_input_embeddings().weight.dtype)
        if per_row is None:  # an unread count may exceed the slots: pad the sources so no scatter overruns
            slot_keep = torch.cat([slot_keep, slot_keep.new_zeros(image_mask.numel())])
            features = torch.cat([features, features.new_zeros(image_mask.numel(), features.shape[1])])
        keep = (~image_mask).masked_scatter(image_mask, slot_keep)  # placeholders in prompt order
        total = sum(kept)
        distinct = DeferredCheck(  # each image fills at most `kept` slots: equal totals, equal rows
            lambda: (slot_keep.sum() != total).reshape(1),
            "the kept image tokens do not sit in distinct placeholder slots: a selector's index must "
            "name distinct input tokens",
            ScoreError,
        )
        self._unread = [*checks, *deferred, distinct]
        comp = compact(keep, (max(lengths), min(lengths)))
        new_ids = comp.gather(input_ids)
        embeds = self.core.get_input_embeddings()(new_ids)
        new_image_mask = comp.gather(image_mask, False)
        embeds = embeds.masked_scatter(new_image_mask.unsqueeze(-1), features)
        mask = comp.attention_mask(placeholders.key_mask)
        self._prefill = _Prefill(comp, mask, placeholders.key_mask)
        kw.update(
            input_ids=None,
            pixel_values=None,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=self._prefill_positions(kw, comp),
        )
        kw.pop("mm_encoder_outputs", None)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = torch.arange(comp.length_out, device=embeds.device)
        return comp, new_ids, new_image_mask, mask, image_sample

    def _rewrite_per_image(
        self,
        kw: dict[str, Any],
        placeholders: Placeholders,
        results: list[dict[str, Any]],
        deferred: list[DeferredCheck],
    ) -> tuple[Compaction, Tensor, Tensor, Tensor | None, list[int]]:
        """`_rewrite_prompt` from images pruned one by one (`results`, in prompt order: each image's
        kept placeholder `slots` and `features`)."""
        return self._rewrite_prompt(
            kw,
            placeholders,
            torch.cat([r["slots"] for r in results]),
            torch.cat([r["features"] for r in results]),
            [len(r["slots"]) for r in results],
            [len(r["features"]) for r in results],
            deferred,
        )

    @staticmethod
    def _unread_prompt_checks(placeholders: Placeholders, blocks: list[int]) -> list[DeferredCheck]:
        """The prompt checks a single prompt defers until after the LM head: its placeholder count,
        and that a 4D attention mask is causal."""
        checks = []
        if placeholders.per_row is None:
            mask, need = placeholders.mask, sum(blocks)
            checks.append(
                DeferredCheck(
                    lambda: (mask.sum() != need).reshape(1),
                    f"the prompt's image tokens are not the {need} its {len(blocks)} image(s) need "
                    f"({', '.join(map(str, blocks))}); build inputs with the model's processor ({_NO_IMAGE_TOKEN})",
                    InputError,
                )
            )
        if placeholders.causal is not None:
            causal = placeholders.causal
            checks.append(DeferredCheck(lambda: (~causal).reshape(1), _CUSTOM_MASK, InputError))
        return checks

    def _prefill_positions(self, kw: dict[str, Any], comp: Compaction) -> Tensor | None:
        """Position ids `[B, P']` of the compressed prompt (see `positions`); `None` keeps HF's default."""
        return comp.positions(kw.get("position_ids"), self.positions)

    def _decode_positions(self, mask: Tensor | None, start: int, step: int) -> Tensor:
        """Original-frame position ids `[B, step]` of a later forward's tokens, the first at `start`
        (`mask`: the forward's original-frame 2D attention mask, or `None`)."""
        source = require_state(self._prefill, "the prefill").compaction.source
        return (torch.arange(step, device=source.device) + start).expand(source.shape[0], -1)

    def _record_llm_stage(self, stage: StageRecord, from_layer: int, tokens: int, scoring_flops: float) -> None:
        """An `llm:K` stage ran: decoder layers `from_layer..` now see `tokens` tokens."""
        record = require_state(self._record, "the forward record")
        layers = require_state(record.llm_shape, "the record's LLM shape")[2]
        counts = record.layer_tokens or [record.seq_len_out] * layers
        record.layer_tokens = counts[:from_layer] + [tokens] * (layers - from_layer)
        record.stages.append(stage)
        record.scoring_flops += scoring_flops

    def _continue(self, kw: dict[str, Any], past: int) -> dict[str, Any]:
        """Map a later forward of the same generation (original frame) onto the compressed cache."""
        state = require_state(self._prefill, "the prefill")
        comp = state.compaction
        step = (kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
        batch = comp.source.shape[0]
        generated = past - comp.length_out
        mask = full_attention_mask(kw.get("attention_mask"))
        expected = comp.length_in + generated + step
        if mask is not None and mask.dim() == 4:
            # generate builds a static cache's 4D decode mask for a query at the cache's length,
            # which is the compressed one: its rows do not describe the original frame. Generated
            # tokens are never padding, so the original mask is the prompt's extended by ones.
            prompt = state.prompt_mask if state.prompt_mask is not None else comp.source.new_ones(batch, comp.length_in)
            mask = torch.nn.functional.pad(prompt.long(), (0, expected - comp.length_in), value=1)
        if mask is not None:
            if mask.shape[1] != expected:
                raise InputError(
                    f"this forward continues a cache of {past} tokens, but its attention mask has "
                    f"{mask.shape[1]} columns where {expected} were expected: continue a compressed "
                    "prefill with the original prompt's mask extended by the new tokens"
                )
            prefix = state.attention_mask if state.attention_mask is not None else mask.new_ones(batch, comp.length_out)
            kw["attention_mask"] = torch.cat([prefix.to(mask.dtype), mask[:, comp.length_in :]], dim=1)
        elif state.attention_mask is not None:
            tail = state.attention_mask.new_ones(batch, generated + step)
            kw["attention_mask"] = torch.cat([state.attention_mask, tail], dim=1)
        position_ids = kw.get("position_ids")
        if position_ids is not None:
            kw["position_ids"] = position_ids - comp.position_shift(self.positions).to(position_ids.device)[:, None]
        elif self.positions == "original":
            kw["position_ids"] = self._decode_positions(mask, past + comp.length_in - comp.length_out, step)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] - (comp.length_in - comp.length_out)
        return kw
