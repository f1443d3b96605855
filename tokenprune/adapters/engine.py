"""The family-neutral compression engine: it owns Hugging Face's multimodal `generate` protocol once,
for every family (`tokenprune.adapters.family`).

Per forward of the core model (`model.model`):

1. prefill (images in the call): the family's packing encodes the images (unless `generate` did)
   and runs the stages before the LLM (`vision:L` inside the tower, `projector`), giving an
   `ImageTokens`; the engine shortens the prompt to the kept tokens: ids, embeddings, 2D/4D masks,
   position ids (the family's `PositionRule`), cache positions, per-token type ids; it records one
   `ForwardRecord` and hands the image columns to the `llm:K` stages (`DecoderStage`);
2. a later forward of the same generation (a cache holding the compressed prompt): the engine maps
   its original-frame mask, positions and cache positions onto the shorter cache (`DecodeStep`);
3. anything else (no image, no cache): passes through untouched.

Device-side checks (NaN scores, the placeholder count of a single prompt, distinct kept slots) are
read after the LM head has been launched, so nothing between the tower and the LLM waits for the
device. State is typed and each piece has one owner: `Attached` (attach), `Projected` (the plain
packing's projector hook), `Prefill` (the prompt rewrite), `DecodeStep` (one later forward).
"""

from __future__ import annotations

import inspect
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import wraps
from itertools import accumulate
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..checks import DeferredCheck, raise_deferred
from ..compat import cache_of, full_attention_mask
from ..errors import InputError, ScoreError, SignalError
from ..execute import required_signals
from ..pipeline import Pipeline, Stage
from ..signals import Signal
from ..strategy import ModelInfo
from ..trace import ForwardRecord, StageRecord
from .base import Encoding, Handle, ModelAdapter, require_state
from .decoder import DecoderStage, ImageLayout
from .encoder import EncoderStages
from .family import Family, resolve
from .providers import Probes, Provider, assign, providers_of
from .sequence import Compaction, compact

if TYPE_CHECKING:
    from ..apply import Run

PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Core-forward arguments `[B, P]` with one value per prompt token, gathered at the kept columns."""

_LATER_CHUNK = "images after the first chunk of a cached prompt are not supported"
_CUSTOM_MASK = (
    "tokenprune maps 2D masks and the causal 4D masks generate builds for static caches; this 4D "
    "attention mask is neither, so it cannot be remapped onto the compressed prompt"
)
_MASK_MAPPING = (
    "the core received a mapping of per-layer-type attention masks with sliding-window layers (Gemma 3's "
    "generate builds one for static caches, cache_implementation='static'), which tokenprune cannot remap onto "
    "the compressed prompt; inside tokenprune.apply use the default dynamic cache and a 2D attention mask"
)
_NO_IMAGE_TOKEN = (
    "a prompt without the image token (e.g. '<image>' for LLaVA) cannot take pixel_values: put the token "
    "where the image goes (the processor expands it), or drop pixel_values"
)


@dataclass(frozen=True)
class Attached:
    """What `Engine.attach` set up for one `tp.apply` (owner: attach; read by every hook)."""

    pipeline: Pipeline
    run: Run
    info: ModelInfo
    probe: Probes
    projector_stages: list[Stage]
    encoder: EncoderStages | None
    decoders: list[DecoderStage]


@dataclass(frozen=True)
class Projected:
    """The plain packing's projector input after the stages before the LLM (owner: its projector
    pre-hook; consumed by the next prefill, or checked by `finish`).

    Attributes:
        records: the trace of each stage that ran (image rows filled in by the prefill).
        slots: `[I, n(+1)]` long, the kept placeholder slot of each output (the [CLS] slot 0 first when kept).
        block: placeholders per image.
        origin: `[I, n]` the encoder patch of each output token ([CLS] excluded).
        counts: per image, its outputs when a budget rule left images with different counts; else `None`.
        scoring_flops: the signals' cost for the whole batch of images.
        vision_tokens: per encoder block, the tokens it saw per image; `vision_tokens_in`: unpruned.
        deferred: the stages' device-side checks.
    """

    records: list[StageRecord]
    slots: Tensor
    block: int
    origin: Tensor
    counts: list[int] | None
    scoring_flops: float
    vision_tokens: list[int]
    vision_tokens_in: int
    deferred: list[DeferredCheck]


@dataclass(frozen=True)
class ImageTokens:
    """A prefill's images after the stages before the LLM, in prompt order: what the prompt rewrite
    consumes (made by the family's packing).

    Attributes:
        slots: `[T]` bool over every image placeholder of the batch: kept or not.
        features: `[M, D]` the kept image tokens (`M = sum(kept)`).
        blocks: placeholders per image (`sum(blocks) = T`).
        kept: kept LLM tokens per image.
        llm_tokens: `[M]` bool, which kept tokens `llm:K` stages see as image tokens (not [CLS], not newlines).
        reaching: per image, how many those are (`llm:K` stages need them equal).
        origin: per image, `[n]` the encoder patch of each such token, for the `llm:K` stages.
        records: the trace of each stage that ran (their `image_sample` filled in by the engine).
        deferred: device-side checks of the stages.
        scoring_flops: the signals' cost for the batch; `vision_tokens`, `vision_shape`: as in `ForwardRecord`.
    """

    slots: Tensor
    features: Tensor
    blocks: list[int]
    kept: list[int]
    llm_tokens: Tensor
    reaching: list[int]
    origin: Sequence[Tensor]
    records: list[StageRecord]
    deferred: list[DeferredCheck]
    scoring_flops: float = 0.0
    vision_tokens: list[int] | None = None
    vision_shape: tuple[int, int, int] | None = None

    def select(self, order: list[int]) -> ImageTokens:
        """These images in `order` (indices into them, repeats allowed), e.g. one prompt's images for
        each copy `generate` makes of it: the copies share that prompt's kept tokens."""
        slots, features = self.slots.split(self.blocks), self.features.split(self.kept)
        llm_tokens = self.llm_tokens.split(self.kept)

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in order]

        records = [
            replace(
                r,
                kept=[r.kept[i] for i in order],
                weights=pick(r.weights),
                scores=pick(r.scores),
                counts=pick(r.counts),
            )
            for r in self.records
        ]
        return replace(
            self,
            slots=torch.cat([slots[i] for i in order]),
            features=torch.cat([features[i] for i in order]),
            blocks=[self.blocks[i] for i in order],
            kept=[self.kept[i] for i in order],
            llm_tokens=torch.cat([llm_tokens[i] for i in order]),
            reaching=[self.reaching[i] for i in order],
            origin=[self.origin[i] for i in order],
            records=records,
        )


@dataclass(frozen=True)
class Placeholders:
    """A prompt's image placeholders: each row's count read from the device when the prefill starts
    (a batch of several prompts), or not read at all (a single prompt: they are its images'
    blocks, which is checked after the LM head is launched)."""

    mask: Tensor  # [B, P] bool, the placeholder columns
    per_row: list[int] | None  # placeholders in each batch row; None: not read (a single prompt)
    key_mask: Tensor | None  # [B, P] the prompt's 2D attention mask (the one behind a 4D mask), or None
    causal: Tensor | None  # 0-dim bool, whether a 4D mask was causal; None: read already, or no 4D mask


@dataclass(frozen=True)
class Prefill:
    """What later forwards of the same generation need to know about a compressed prefill (owner:
    the prompt rewrite)."""

    compaction: Compaction
    attention_mask: Tensor | None  # [B, P'] as given to the LLM
    prompt_mask: Tensor | None  # [B, P] the original prompt's 2D mask
    deltas: Tensor | None = None  # [B] per-row offset of later positions (M-RoPE), from the position rule


@dataclass(frozen=True)
class DecodeStep:
    """One later forward of a generation, in the original frame: `past` cached tokens (compressed
    frame), `step` new ones, `mask` its 2D attention mask over the original frame (or `None`)."""

    past: int
    step: int
    mask: Tensor | None

    @classmethod
    def of(cls, kw: dict[str, Any], past: int, prefill: Prefill) -> DecodeStep:
        """The step `kw` (a core call) makes; a 4D mask `generate` built for a static cache (whose
        rows describe the compressed frame) is replaced by the prompt's mask extended by ones.

        Raises:
            InputError: the 2D mask does not span the original prompt plus the generated tokens.
        """
        comp = prefill.compaction
        step = (kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
        expected = comp.length_in + past - comp.length_out + step
        mask = full_attention_mask(kw.get("attention_mask"))
        if mask is not None and mask.dim() == 4:  # generated tokens are never padding
            batch = comp.source.shape[0]
            prompt = (
                prefill.prompt_mask if prefill.prompt_mask is not None else comp.source.new_ones(batch, comp.length_in)
            )
            mask = torch.nn.functional.pad(prompt.long(), (0, expected - comp.length_in), value=1)
        if mask is not None and mask.shape[1] != expected:
            raise InputError(
                f"this forward continues a cache of {past} tokens, but its attention mask has "
                f"{mask.shape[1]} columns where {expected} were expected: continue a compressed "
                "prefill with the original prompt's mask extended by the new tokens"
            )
        return cls(past, step, mask)


class CallCapture:
    """Records the arguments a module's `get_image_features` receives (by name), by wrapping it on
    the instance (`generate` encodes images before its first forward and drops arguments such as
    `image_sizes` that packing needs); `remove()` deletes the wrapper, so the class's method shows
    through again."""

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


class Engine(ModelAdapter):
    """Runs a pipeline on any model of `family` (set by each family's adapter class)."""

    family: ClassVar[Family]
    shares_copies: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that sets `family` takes its model classes and places as class attributes
        (a further subclass may override them)."""
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            cls.model_class = ", ".join(family.model_classes)
            cls.places, cls.ragged_places = family.places, family.ragged_places

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = cls.family.classes()
        return bool(classes) and isinstance(model, classes)

    def __init__(self, model: nn.Module, positions: str = "contiguous") -> None:
        super().__init__(model, positions)
        layout = self.family.layout
        self.positions = self.family.positions.fixed or positions
        self.core: Any = resolve(model, layout.core)  # the HF core model: submodules and methods untyped
        self.config: Any = model.config
        self._forward_params = list(inspect.signature(self.core.forward).parameters)
        self.attached: Attached | None = None
        self.projected: Projected | None = None
        self.prefill: Prefill | None = None
        self.calls: CallCapture | None = None
        self.memo: dict[Any, Any] = {}  # what a packing caches for the attached context (e.g. layouts per size)
        self.order: list[int] | None = None  # this prefill's image of each prompt copy (`generate`'s expansion)
        self.record: ForwardRecord | None = None
        self._unread: list[DeferredCheck] = []
        self._in_model = False  # the core runs inside the whole model's forward
        self.shared: Mapping[Signal, Tensor] | None = None  # signals of a reused `Encoding`

    # -- the model's parts, from the family's layout ------------------------------------------
    @property
    def tower(self) -> Any:
        return resolve(self.core, *self.family.layout.tower)

    @property
    def blocks(self) -> nn.ModuleList:
        """The vision tower's blocks."""
        return resolve(self.tower, *self.family.layout.blocks)

    def attention(self, block: int) -> Any:
        """Block `block`'s self-attention (an HF module: `q_proj`, `k_proj`, `num_heads`, `scale` by name)."""
        return resolve(self.blocks[block], self.family.layout.attention)

    def features_keep_cls(self) -> bool:
        """Whether the projector's input starts with the [CLS] feature."""
        return self.family.keeps_cls(self.config)

    def feature_blocks(self) -> list[int]:
        """The blocks whose outputs the projector reads (`-1`: the embeddings)."""
        depth, key = len(self.blocks), self.family.layout.feature_layer
        layer = getattr(self.config, key) if key is not None else -1
        # hidden_states[h] is the output of block h - 1 (hidden_states[0]: the embeddings)
        return [(h % (depth + 1)) - 1 for h in ([layer] if isinstance(layer, int) else layer)]

    def info(self) -> ModelInfo:
        depth, key = len(self.blocks), self.family.layout.feature_layer
        blocks = self.feature_blocks()
        layers = getattr(self.config, key) if key is not None else None
        layers = None if layers is None else [layers] if isinstance(layers, int) else list(layers)
        embeddings = resolve(self.tower, *self.family.layout.embeddings, default=None)
        return ModelInfo(
            vision_layers=depth,
            feature_layer=max(blocks) if max(blocks) >= 0 else None,
            feature_index=None if layers is None else layers[blocks.index(max(blocks))],
            has_cls=getattr(embeddings, self.family.layout.cls_token, None) is not None,
            grid=self.family.packing.grid(self),
            llm_layers=self.config.text_config.num_hidden_layers,
        )

    def patch_grid(self) -> tuple[int, int]:
        """The patch grid `(rows, cols)` of one image (or crop)."""
        return require_state(self.family.packing.grid(self), "the patch grid")

    # -- attach: one template for every family ---------------------------------------------------
    def attach(self, pipeline: Pipeline, run: Run) -> list[Handle]:
        """Hooks: the vision signals' probe, the family packing's hooks, the `llm:K` stages, and the
        model's and core's hooks that rewrite the prompt."""
        self.prefill, self.projected, self.calls, self.memo = None, None, None, {}
        info = self.info()
        by_kind = {
            kind: [s for s in pipeline.stages if s.place.kind == kind] for kind in ("vision", "projector", "llm")
        }
        before_llm = by_kind["vision"] + by_kind["projector"]
        self.family.packing.check(self, before_llm, info)
        where = "in the vision encoder or before the projector"
        probe = self.probe_for(required_signals(before_llm, info), info, where)
        own = self.family.tower_stages  # the packing runs the tower's stages and signals itself
        encoder = EncoderStages(self.blocks, by_kind["vision"], info, probe) if by_kind["vision"] and not own else None
        llm: Any = resolve(self.core, self.family.layout.llm)
        decoders = [DecoderStage(llm.layers, llm.norm, s, info) for s in by_kind["llm"]]
        for decoder in decoders:
            assign(self.providers, decoder.wanted, "llm", f"at {decoder.stage.to_spec()!r} inside the LLM", self.name)
        for before, after in zip(decoders, decoders[1:], strict=False):
            before.next = after
        self.attached = Attached(pipeline, run, info, probe, by_kind["projector"], encoder, decoders)
        handles: list[Handle] = list(probe.attach())
        if encoder is not None:
            handles += encoder.attach()
        handles += self.family.packing.attach(self)
        for decoder in decoders:
            handles += decoder.attach()
        return handles + [
            self.model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.model.register_forward_hook(self._after_model, always_call=True),
            self.core.register_forward_pre_hook(self._before_core, with_kwargs=True),
            self.core.register_forward_hook(self._after_core),
        ]

    @property
    def providers(self) -> tuple[Provider, ...]:
        """This family's signal providers: its own, then those plugins registered for this adapter."""
        return providers_of(self.name, self.family.providers)

    def probe_for(self, signals: set[Signal], info: ModelInfo, where: str) -> Probes:
        """The probes computing the vision `signals` on this family's tower, one per provider.

        Raises:
            SignalError: no provider of this family computes some signal at the vision place (the
                message names the signal and the types provided), or a provider hooks the tower's
                blocks where the family's packing computes the tower's signals itself.
        """
        plan = assign(self.providers, signals, "vision", where, self.name, self.family.no_signals)
        probes = [(provider, provider.probe(self, wanted, info)) for provider, wanted in plan]
        foreign = [provider for provider, probe in probes if probe is not None and self.family.tower_stages]
        if foreign:
            names = ", ".join(t.__name__ for t in foreign[0].provides)
            raise SignalError(
                f"the {self.name} adapter's packing runs the tower and computes its signals itself, so the "
                f"provider registered for {names} cannot hook its blocks; its packing provides: "
                + ", ".join(t.__name__ for p in self.family.providers if p.place == "vision" for t in p.provides)
            )
        return Probes(probe for _, probe in probes if probe is not None)

    @property
    def state(self) -> Attached:
        return require_state(self.attached, "the attached pipeline")

    def capture_calls(self) -> CallCapture:
        """Record `get_image_features`' arguments while attached (for packings that need `image_sizes`)."""
        self.calls = CallCapture(self.core)
        return self.calls

    def image_argument(self, kw: dict[str, Any], name: str, per_copy: bool = False) -> Any:
        """`name` (e.g. `image_sizes`, one row per image) from the core call `kw`, else from `generate`'s
        encoding call; `per_copy`: one row per image of each prompt copy `generate` made."""
        value = kw[name] if kw.get(name) is not None else self.calls.arguments.get(name) if self.calls else None
        return value[self.order] if per_copy and value is not None and self.order is not None else value

    # -- the hooks --------------------------------------------------------------------------------
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

    def _before_core(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        kw = dict(zip(self._forward_params, args, strict=False)) | kwargs
        cache = cache_of(kw)
        past = cache.get_seq_length() if cache is not None else 0
        encoded = (kw.get("mm_encoder_outputs") or {}).get("image")
        decoders = self.state.decoders
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
            self._refuse_feature_overrides(kw)
            placeholders = self._read_placeholders(kw)
            images = self.family.packing.prune(self, kw, encoded)
            self.order = None
            if self.copies > 1:
                images = self._share_copies(images, placeholders)
            kw = self._compress(kw, images, placeholders)
            self._unread = first + self._unread
            return (), kw
        if self.prefill is not None and past > 0:
            for decoder in decoders:
                decoder.begin_decode()
            return (), self._continue(kw, DecodeStep.of(kw, past, self.prefill))
        self.prefill = None
        for decoder in decoders:
            decoder.reset()
        return None

    def finish(self) -> None:
        pending, self.projected = self.projected, None
        if pending is not None:
            raise_deferred(pending.deferred)

    def _read_checks(self) -> None:
        """Read the prefill's deferred checks (scores without NaN, kept tokens in distinct slots, and
        a single prompt's placeholder count and cache length) once the LM head has been launched, so
        that nothing between the vision tower and the LLM waits for the device. A failure raises
        before the forward returns."""
        if self._unread:
            checks, self._unread = self._unread, []
            raise_deferred(checks)

    def _read_placeholders(self, kw: dict[str, Any]) -> Placeholders:
        """Where the prompt's image placeholders are. A batch of several prompts needs each row's
        count on the host (to size the compressed batch): the prefill's one host sync before the
        LM head. A single prompt needs none.

        Raises:
            InputError: a 4D attention mask other than the causal-with-padding one `generate`
                builds for static caches, or a mapping of per-layer-type masks (neither can be
                remapped onto the compressed prompt).
        """
        input_ids: Tensor = kw["input_ids"]
        image_mask = input_ids == getattr(self.config, self.family.layout.image_token)
        given = kw.get("attention_mask")
        if isinstance(given, Mapping) and set(given) - {"full_attention"}:
            raise InputError(_MASK_MAPPING)
        key_mask, causal = full_attention_mask(given), None
        if key_mask is not None and key_mask.dim() == 4:
            key_mask, causal = _key_mask(key_mask, input_ids.shape[1])
        if input_ids.shape[0] == 1:
            return Placeholders(image_mask, None, key_mask, causal)
        per_row, *causal_read = raise_deferred([], image_mask.sum(dim=1), *([causal] if causal is not None else []))
        if causal_read and not causal_read[0]:
            raise InputError(_CUSTOM_MASK)
        return Placeholders(image_mask, [int(n) for n in per_row], key_mask, None)

    def _refuse_feature_overrides(self, kw: dict[str, Any]) -> None:
        for key in self.family.feature_keys:
            if kw.get(key) is not None and kw[key] != getattr(self.config, key):
                raise InputError(
                    f"{key}={kw[key]!r} differs from the model config ({getattr(self.config, key)!r}); "
                    "per-call overrides are not supported inside tokenprune.apply: set it in the config"
                )

    def _share_copies(self, images: ImageTokens, placeholders: Placeholders) -> ImageTokens:
        """`images` of prompts that `generate` expanded into `copies` adjacent rows each (beams, returned
        sequences), repeated so that each copy holds its prompt's kept tokens.

        Raises:
            InputError: the rows are not whole groups of copies, or the placeholders do not match the images.
        """
        per_row, n = placeholders.per_row, self.copies
        if per_row is not None and sum(per_row) == sum(images.blocks):
            return images  # the images came expanded with the prompts (a model `generate` does not pre-encode for)
        if per_row is None or len(per_row) % n:
            raise InputError(f"generate made {n} copies of each prompt, but the batch has {len(per_row or [1])} rows")
        prompts = _image_rows(per_row[::n], images.blocks)
        self.order = [
            i for p in range(len(per_row) // n) for _ in range(n) for i, row in enumerate(prompts) if row == p
        ]
        return images.select(self.order)

    # -- the prompt rewrite --------------------------------------------------------------------------
    def _compress(self, kw: dict[str, Any], images: ImageTokens, placeholders: Placeholders) -> dict[str, Any]:
        """Shorten the prompt to `images`' kept tokens, record the forward, start the `llm:K` stages."""
        state = self.state
        n_images = len(images.blocks)
        if state.decoders and len(set(images.reaching)) > 1:
            raise InputError(
                f"{state.decoders[0].stage.to_spec()!r}: llm:K stages on {self.name} need every image to reach "
                f"them with the same number of {self.family.packing.unequal}, but they bring {images.reaching}; use "
                "images of one size or a projector stage with an integer budget first"
            )
        comp, new_ids, new_image_mask, mask, image_sample = self._rewrite_prompt(kw, placeholders, images)
        text = self.config.text_config
        self.record = ForwardRecord(
            stages=[replace(r, image_sample=image_sample) for r in images.records],
            seq_len_in=comp.length_in,
            seq_len_out=comp.length_out,
            llm_shape=(text.hidden_size, text.intermediate_size, text.num_hidden_layers),
            scoring_flops=images.scoring_flops / new_ids.shape[0],
            vision_tokens=images.vision_tokens,
            vision_shape=images.vision_shape,
        )
        state.run.record(self.record)
        if state.decoders:
            columns = new_image_mask.nonzero()[:, 1][images.llm_tokens.to(new_ids.device)]
            state.decoders[0].begin_prefill(
                ImageLayout(
                    positions=columns.view(n_images, -1),
                    rows=torch.tensor(image_sample, device=columns.device),
                    origin=torch.stack(list(images.origin)),
                    key_mask=mask.bool() if mask is not None else torch.ones_like(new_ids, dtype=torch.bool),
                    record=self._record_llm_stage,
                )
            )
        return kw

    def _rewrite_prompt(
        self, kw: dict[str, Any], placeholders: Placeholders, images: ImageTokens
    ) -> tuple[Compaction, Tensor, Tensor, Tensor | None, list[int]]:
        """Shorten `kw`'s prompt to the kept image slots and put the kept features in them; rewrites
        `kw` (embeddings, mask, positions, cache positions, per-token ids) and the decode state. Waits
        for nothing on the device: the stages' checks, and the check that the kept slots are
        distinct, are read after the LLM has been launched (`_read_checks`).

        Returns:
            the compaction, the new ids `[B, P']`, the new image mask `[B, P']`, the new attention
            mask, and the batch row of each image.

        Raises:
            InputError: the prompt's placeholders do not match the images.
        """
        input_ids: Tensor = kw["input_ids"]
        blocks, kept, slot_keep = images.blocks, images.kept, images.slots
        per_row, image_mask = placeholders.per_row, placeholders.mask
        checks = self._unread_prompt_checks(placeholders, blocks)
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
        features = images.features.to(input_ids.device, self.core.get_input_embeddings().weight.dtype)
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
        self._unread = [*checks, *images.deferred, distinct]
        comp = compact(keep, (max(lengths), min(lengths)))
        new_ids = comp.gather(input_ids)
        embeds = self.core.get_input_embeddings()(new_ids)
        new_image_mask = comp.gather(image_mask, False)
        embeds = embeds.masked_scatter(new_image_mask.unsqueeze(-1), features)
        mask = comp.attention_mask(placeholders.key_mask)
        # the position rule sees the prompt's 2D key mask (also behind a static cache's 4D masks)
        positions, deltas = self.family.positions.prefill(self, {**kw, "attention_mask": placeholders.key_mask}, comp)
        self.prefill = Prefill(comp, mask, placeholders.key_mask, deltas)
        kw.update(input_ids=None, pixel_values=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        kw.pop("mm_encoder_outputs", None)
        for key in PER_TOKEN_KEYS:
            if isinstance(kw.get(key), Tensor) and kw[key].shape[:2] == input_ids.shape:
                kw[key] = comp.gather(kw[key])
        if kw.get("cache_position") is not None:
            kw["cache_position"] = torch.arange(comp.length_out, device=embeds.device)
        return comp, new_ids, new_image_mask, mask, image_sample

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

    def _record_llm_stage(self, stage: StageRecord, from_layer: int, tokens: int, scoring_flops: float) -> None:
        """An `llm:K` stage ran: decoder layers `from_layer..` now see `tokens` tokens."""
        record = require_state(self.record, "the forward record")
        layers = require_state(record.llm_shape, "the record's LLM shape")[2]
        counts = record.layer_tokens or [record.seq_len_out] * layers
        record.layer_tokens = counts[:from_layer] + [tokens] * (layers - from_layer)
        record.stages.append(stage)
        record.scoring_flops += scoring_flops

    def _continue(self, kw: dict[str, Any], step: DecodeStep) -> dict[str, Any]:
        """Map a later forward of the same generation (original frame) onto the compressed cache."""
        prefill = require_state(self.prefill, "the prefill")
        comp = prefill.compaction
        batch = comp.source.shape[0]
        generated = step.past - comp.length_out
        if step.mask is not None:
            prefix = (
                prefill.attention_mask
                if prefill.attention_mask is not None
                else step.mask.new_ones(batch, comp.length_out)
            )
            kw["attention_mask"] = torch.cat([prefix.to(step.mask.dtype), step.mask[:, comp.length_in :]], dim=1)
        elif prefill.attention_mask is not None:
            tail = prefill.attention_mask.new_ones(batch, generated + step.step)
            kw["attention_mask"] = torch.cat([prefill.attention_mask, tail], dim=1)
        position_ids = kw.get("position_ids")
        if position_ids is not None:
            kw["position_ids"] = position_ids - comp.position_shift(self.positions).to(position_ids.device)[:, None]
        elif self.positions == "original":
            start = step.past + comp.length_in - comp.length_out
            kw["position_ids"] = self.family.positions.decode(prefill, step.mask, start, step.step)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] - (comp.length_in - comp.length_out)
        return kw

    def generation_positions(self, kwargs: dict[str, Any]) -> Tensor | None:
        return self.family.positions.generation(self, kwargs)

    # -- shared encodings (plain packing) ---------------------------------------------------------
    def shares_encoding(self, pipeline: Pipeline | None) -> bool:
        return (
            self.family.packing.shares_encodings
            and "mm_encoder_outputs" in self._forward_params
            and (pipeline is None or all(s.place.kind != "vision" for s in pipeline.stages))
        )

    def encode(self, inputs: Mapping[str, Any], pipelines: Sequence[Pipeline | None]) -> Encoding | None:
        """The tower once on `inputs["pixel_values"]`: the projector's input, captured by a
        pre-hook, and every vision signal the sharing pipelines' projector stages read, from the
        family's providers."""
        sharing = [p for p in pipelines if self.shares_encoding(p)]
        if not sharing or inputs.get("pixel_values") is None:
            return None
        stages = [s for p in sharing if p is not None for s in p.stages if s.place.kind == "projector"]
        info = self.info()
        try:
            probe = self.probe_for(required_signals(stages, info), info, "")
        except SignalError:
            return None
        captured: list[Tensor] = []
        projector = resolve(self.core, self.family.layout.projector)
        handles = probe.attach() + [projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
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
            if self.attached is not None and self.attached.encoder is not None:
                raise InputError("a pipeline with stages inside the vision tower needs its own encoding")
            self.shared = encoding.signals
        try:
            features = resolve(self.core, self.family.layout.projector)(encoding.features)
        finally:
            self.shared = None
        # one tensor per image, as HF's own multi-image outputs hold them (typed there as one tensor)
        image = BaseModelOutputWithPooling(pooler_output=list(features))  # type: ignore[arg-type]
        return {k: v for k, v in inputs.items() if k != "pixel_values"} | {"mm_encoder_outputs": {"image": image}}
